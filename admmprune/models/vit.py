"""A small Vision Transformer (Dosovitskiy et al. 2021) for 28x28 images.

Non-overlapping ``patch x patch`` patches are flattened and embedded by a dense
layer, a learned class token is prepended and learned position embeddings are
added; ``depth`` pre-norm blocks of multi-head self-attention and a GELU MLP
follow, and a final LayerNorm and the dense ``head`` read the class token. The
defaults (7x7 patches, 16 tokens plus the class token, width 64, 4 blocks of 4
heads with MLPs of 128) have 139,018 parameters on 28x28x1 inputs.

What pruning removes: whole attention heads (each block's query, key, value
and output projections together) and MLP hidden neurons. The residual stream
(``dim``) stays: every LayerNorm averages over it, so removing one of its
channels would change what the others compute.
"""

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import jax.typing
from flax import nnx

from admmprune._errors import UserError
from admmprune.models.layers import checked_sizes


class Block(nnx.Module):
    """``x + attn(norm1(x))``, then ``x + fc2(gelu(fc1(norm2(x))))``: a pre-norm encoder block.

    Args:
        dim: width of the residual stream.
        heads: attention heads; ``dim`` is split among them.
        mlp: hidden width of the MLP (``fc1``'s outputs).
        rngs: random streams for parameter initialisation.
    """

    def __init__(self, dim: int, heads: int, mlp: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.fc1 = nnx.Linear(dim, mlp, rngs=rngs)
        self.fc2 = nnx.Linear(mlp, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(nnx.gelu(self.fc1(self.norm2(x))))


class ViT(nnx.Module):
    """A Vision Transformer classifier: patch embedding, class token, pre-norm blocks, head.

    Layers and parameter paths: ``embed`` (dense, over flattened patches in
    row-major ``(row, column, channel)`` order), ``cls`` (the class token,
    ``(1, 1, dim)``), ``pos`` (position embeddings, ``(1, 1 + patches, dim)``),
    ``blocks/<i>`` (:class:`Block`: ``norm1``, ``attn`` with ``query``,
    ``key``, ``value``, ``out``, then ``norm2``, ``fc1``, ``fc2``), ``norm``
    and ``head`` (the logits). No dropout: the model holds no random state,
    and ``train()`` / ``eval()`` change nothing it computes.

    Pruned with :func:`admmprune.structure.discovery.discover_nnx`: each
    block's heads are one group (``blocks/<i>/attn/query``) and its MLP
    neurons another (``blocks/<i>/fc1``); the residual stream is not pruned
    (LayerNorm reduces over it). A collapsed model keeps ``config`` (the dense
    model's arguments, from which :func:`admmprune.load` rebuilds it before
    taking the saved arrays' shapes) and reports its own sizes in ``widths``.

    Args:
        patch: side of the square patches; must divide the image's height and
            width.
        dim: width of the residual stream (embedding, attention, MLP outputs).
        depth: number of blocks.
        heads: attention heads per block; must divide ``dim``.
        mlp: hidden width of each block's MLP.
        num_classes: width of the output layer ``head``.
        in_shape: ``(H, W, C)`` of one input image. Lists are accepted (JSON
            round trips) and stored as a tuple of ints.
        rngs: random streams for parameter initialisation.

    Raises:
        UserError: if a size is not positive, ``heads`` does not divide
            ``dim`` or ``patch`` does not divide the image's height and width.

    Examples:
        >>> model = ViT(rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 28, 28, 1))).shape
        (2, 10)
        >>> model.widths  # heads per block, then MLP width per block
        (4, 4, 4, 4, 128, 128, 128, 128)
    """

    #: Name of the layer whose outputs are the logits; never prune its outputs.
    output_layer: ClassVar[str] = "head"

    def __init__(
        self,
        *,
        patch: int = 7,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp: int = 128,
        num_classes: int = 10,
        in_shape: Sequence[int] = (28, 28, 1),
        rngs: nnx.Rngs,
    ):
        in_shape = tuple(int(s) for s in in_shape)
        given = {"patch": patch, "dim": dim, "depth": depth, "heads": heads, "mlp": mlp, "num_classes": num_classes}
        patch, dim, depth, heads, mlp, num_classes = checked_sizes("ViT", **given)
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise UserError(f"ViT in_shape must be (H, W, C) with positive sizes, got {in_shape}")
        if dim % heads:
            raise UserError(
                f"ViT dim must be divisible by heads (each head gets dim / heads), got dim={dim}, heads={heads}"
            )
        h, w, c = in_shape
        if h % patch or w % patch:
            raise UserError(
                f"ViT patch {patch} must divide the image's height and width, got in_shape={in_shape}; "
                f"choose a patch size that divides {h} and {w}"
            )
        sizes = (patch, dim, depth, heads, mlp, num_classes)
        self._config = {**dict(zip(given, sizes, strict=True)), "in_shape": in_shape}
        tokens = (h // patch) * (w // patch)
        self.embed = nnx.Linear(patch * patch * c, dim, rngs=rngs)
        self.cls = nnx.Param(jnp.zeros((1, 1, dim)))
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1 + tokens, dim)))
        self.blocks = nnx.List([Block(dim, heads, mlp, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, rngs=rngs)

    @property
    def widths(self) -> tuple[int, ...]:
        """Each block's number of heads, then each block's MLP width, as the layers now are
        (a collapsed model's own sizes; ``config`` keeps the dense model's)."""
        return tuple(b.attn.num_heads for b in self.blocks) + tuple(b.fc1.out_features for b in self.blocks)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (all but ``rngs``); JSON-serialisable."""
        return dict(self._config)

    def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
        """Logits of shape ``(B, num_classes)`` for NHWC images ``(B, H, W, C)``."""
        x = jnp.asarray(x)
        b, h, w, c = x.shape
        p = self._config["patch"]
        x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.embed(x.reshape(b, (h // p) * (w // p), p * p * c))
        x = jnp.concatenate([jnp.tile(self.cls[...], (b, 1, 1)), x], axis=1) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))
