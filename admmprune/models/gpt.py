"""A small decoder-only transformer (GPT) for next-token prediction.

Tokens are embedded, learned position embeddings are added, ``depth``
pre-norm blocks of causal multi-head self-attention and an MLP follow, and a
final norm and the untied ``head`` give one row of logits per position. The
defaults (width 64, 2 blocks of 4 heads with MLPs of 256, 128 positions) have
118,804 parameters with the 84-character vocabulary of ``shakespeare_chars``:
sized for a CPU (a character-level epoch of Shakespeare takes minutes; width
128, 4 blocks and MLPs of 512, 830,164 parameters, took 16 min an epoch on a
2-core machine).

What pruning removes: whole attention heads (each block's query, key, value
and output projections together) and MLP hidden neurons (with ``"swiglu"``,
the gate and up projections' neurons together). The residual stream (``dim``)
stays: every norm reduces over it, so removing one of its channels would
change what the others compute.
"""

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import jax.typing
from flax import nnx

from admmprune._errors import UserError
from admmprune.models.layers import checked_sizes, size

NORMS = ("rms", "layer")
"""The choices of ``norm``: ``nnx.RMSNorm`` or ``nnx.LayerNorm``."""
MLP_KINDS = ("gelu", "swiglu")
"""The choices of ``mlp_kind``: ``down(gelu(up(x)))`` or ``down(silu(gate(x)) * up(x))``."""


def _norm(kind: str, dim: int, rngs: nnx.Rngs) -> nnx.Module:
    return nnx.RMSNorm(dim, rngs=rngs) if kind == "rms" else nnx.LayerNorm(dim, rngs=rngs)


class Block(nnx.Module):
    """``x + attn(norm1(x), causal)``, then ``x + mlp(norm2(x))``: a pre-norm decoder block.

    The MLP is ``down(gelu(up(x)))``, or with ``mlp_kind="swiglu"``
    ``down(silu(gate(x)) * up(x))`` (Shazeer 2020).

    Args:
        dim: width of the residual stream.
        heads: attention heads; ``dim`` is split among them.
        mlp: hidden width of the MLP (``up``'s outputs).
        norm: ``"rms"`` or ``"layer"``.
        mlp_kind: ``"gelu"`` or ``"swiglu"``.
        rngs: random streams for parameter initialisation.
    """

    def __init__(self, dim: int, heads: int, mlp: int, *, norm: str, mlp_kind: str, rngs: nnx.Rngs):
        self.norm1 = _norm(norm, dim, rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
        self.norm2 = _norm(norm, dim, rngs)
        self.gate = nnx.Linear(dim, mlp, rngs=rngs) if mlp_kind == "swiglu" else None
        self.up = nnx.Linear(dim, mlp, rngs=rngs)
        self.down = nnx.Linear(mlp, dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), mask=mask)
        h = self.norm2(x)
        h = nnx.gelu(self.up(h)) if self.gate is None else nnx.silu(self.gate(h)) * self.up(h)
        return x + self.down(h)


class GPT(nnx.Module):
    """A decoder-only language model: embeddings, causal pre-norm blocks, norm, head.

    Layers and parameter paths: ``embed`` (token embeddings, ``(num_classes,
    dim)``), ``pos`` (position embeddings, ``(seq_len, dim)``), ``blocks/<i>``
    (:class:`Block`: ``norm1``, ``attn`` with ``query``, ``key``, ``value``,
    ``out``, then ``norm2``, ``gate`` (swiglu only), ``up``, ``down``),
    ``norm`` and ``head`` (the logits; not tied to ``embed``). No dropout: the
    model holds no random state, and ``train()`` / ``eval()`` change nothing
    it computes.

    Pruned with :func:`admmprune.structure.discovery.discover_nnx`: each
    block's heads are one group (``blocks/<i>/attn/query``) and its MLP
    neurons another (``blocks/<i>/up``; with swiglu ``blocks/<i>/gate``,
    which holds the up projection's neurons too); the
    residual stream is not pruned (the norms reduce over it). A collapsed
    model keeps ``config`` (the dense model's arguments, from which
    :func:`admmprune.load` rebuilds it before taking the saved arrays' shapes)
    and reports its own sizes in ``widths``.

    Args:
        dim: width of the residual stream (embeddings, attention, MLP outputs).
        depth: number of blocks.
        heads: attention heads per block; must divide ``dim``.
        mlp: hidden width of each block's MLP.
        num_classes: vocabulary size: the token ids ``0 .. num_classes - 1``
            the model reads, and the width of the output layer ``head``.
        in_shape: ``(seq_len,)``: the longest sequence the model reads (the
            number of position embeddings). A list is accepted (JSON round
            trips) and stored as a tuple.
        norm: ``"rms"`` (RMSNorm) or ``"layer"`` (LayerNorm), before each
            attention and MLP and before the head.
        mlp_kind: ``"gelu"`` or ``"swiglu"``.
        rngs: random streams for parameter initialisation.

    Raises:
        UserError: if a size is not positive, ``heads`` does not divide
            ``dim``, or ``norm`` or ``mlp_kind`` is not one of the choices.

    Examples:
        >>> model = GPT(num_classes=84, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 128), jnp.int32)).shape
        (2, 128, 84)
        >>> model.widths  # heads per block, then MLP width per block
        (4, 4, 4, 4, 512, 512, 512, 512)
    """

    #: Name of the layer whose outputs are the logits; never prune its outputs.
    output_layer: ClassVar[str] = "head"
    #: What it reads: token ids (``admmprune.export`` exports it for them).
    input_dtype: ClassVar[str] = "int32"

    def __init__(
        self,
        *,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp: int = 256,
        num_classes: int = 84,
        in_shape: Sequence[int] = (128,),
        norm: str = "rms",
        mlp_kind: str = "gelu",
        rngs: nnx.Rngs,
    ):
        given = {"dim": dim, "depth": depth, "heads": heads, "mlp": mlp, "num_classes": num_classes}
        dim, depth, heads, mlp, num_classes = checked_sizes("GPT", **given)
        shape = tuple(size(s) for s in in_shape) if isinstance(in_shape, Sequence) else ()
        if len(shape) != 1 or shape[0] is None or shape[0] < 1:
            raise UserError(
                f"GPT reads token ids: in_shape must be (seq_len,) with seq_len >= 1, got {in_shape!r} "
                "(train it on a token dataset such as shakespeare_chars)"
            )
        if dim % heads:
            raise UserError(
                f"GPT dim must be divisible by heads (each head gets dim / heads), got dim={dim}, heads={heads}"
            )
        if norm not in NORMS:
            raise UserError(f"GPT norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if mlp_kind not in MLP_KINDS:
            raise UserError(f"GPT mlp_kind must be one of {', '.join(MLP_KINDS)}, got {mlp_kind!r}")
        sizes = dict(zip(given, (dim, depth, heads, mlp, num_classes), strict=True))
        self._config = {**sizes, "in_shape": shape, "norm": norm, "mlp_kind": mlp_kind}
        self.embed = nnx.Embed(num_classes, dim, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (shape[0], dim)))
        self.blocks = nnx.List([Block(dim, heads, mlp, norm=norm, mlp_kind=mlp_kind, rngs=rngs) for _ in range(depth)])
        self.norm = _norm(norm, dim, rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    @property
    def widths(self) -> tuple[int, ...]:
        """Each block's number of heads, then each block's MLP width, as the layers now are
        (a collapsed model's own sizes; ``config`` keeps the dense model's)."""
        return tuple(b.attn.num_heads for b in self.blocks) + tuple(b.up.out_features for b in self.blocks)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (all but ``rngs``); JSON-serialisable."""
        return dict(self._config)

    def __call__(self, tokens: jax.typing.ArrayLike) -> jax.Array:
        """Logits of shape ``(B, T, num_classes)`` for token ids ``(B, T)``, ``T <= seq_len``;
        position ``t``'s logits see the tokens ``0 .. t`` only.

        Raises:
            UserError: the tokens are not ``(B, T)`` integers with ``T <= seq_len``.
        """
        tokens = jnp.asarray(tokens)
        (seq_len,) = self._config["in_shape"]
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer) or tokens.shape[1] > seq_len:
            raise UserError(
                f"GPT reads integer token ids of shape (batch, T) with T <= {seq_len}, "
                f"got {tokens.dtype}{list(tokens.shape)}"
            )
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))
