"""U-Net for semantic segmentation (Ronneberger et al. 2015) with BatchNorm and SAME padding.

The encoder has ``depth`` levels of two 3x3 conv-BN-ReLU layers followed by a
2x2 max-pool, doubling the width at each level from ``base``; a bottom block of
two more convs at ``base * 2**depth``; the decoder mirrors the encoder: a 2x2
stride-2 transposed conv halves the width and doubles the size, its output is
concatenated after the encoder's output at that level (the skip), and two
conv-BN-ReLU layers follow. A 1x1 conv maps to ``num_classes`` logits per pixel.

Unlike the paper, convs pad (SAME), so the output has the input's size and no
cropping is needed; this is the common modern variant (e.g.
``milesial/Pytorch-UNet`` with transposed convs). As there, the 3x3 convs have
no bias (BatchNorm follows) while the transposed convs and the output conv
have one. ``base=64, depth=4`` is the paper's size (31.0M parameters).
"""

from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.typing
from flax import nnx

from admmprune._errors import UserError
from admmprune.models.layers import Conv, PerConvWidths, max_pool_2x2

_BN = {"momentum": 0.9, "epsilon": 1e-5}


class DoubleConv(nnx.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))))`` with bias-free 3x3 SAME convs."""

    def __init__(self, in_features: int, widths: Sequence[int], *, rngs: nnx.Rngs):
        w1, w2 = widths
        self.conv1 = Conv(in_features, w1, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(w1, **_BN, rngs=rngs)
        self.conv2 = Conv(w1, w2, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(w2, **_BN, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(self.bn2(self.conv2(x)))


class Up(nnx.Module):
    """``upconv`` (2x2 stride-2 transposed conv), concatenation after the skip, then two conv-BN-ReLU.

    Args:
        in_features: channels of the input from below.
        skip_features: channels of the skip connection.
        widths: output channels of ``upconv``, ``conv1`` and ``conv2``.
        rngs: random streams for parameter initialisation.
    """

    def __init__(self, in_features: int, skip_features: int, widths: Sequence[int], *, rngs: nnx.Rngs):
        wu, w1, w2 = widths
        self.upconv = nnx.ConvTranspose(in_features, wu, (2, 2), strides=(2, 2), padding="VALID", rngs=rngs)
        self.conv1 = Conv(skip_features + wu, w1, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(w1, **_BN, rngs=rngs)
        self.conv2 = Conv(w1, w2, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(w2, **_BN, rngs=rngs)

    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        x = jnp.concatenate([skip, self.upconv(x)], axis=-1)
        x = nnx.relu(self.bn1(self.conv1(x)))
        return nnx.relu(self.bn2(self.conv2(x)))


class UNet(PerConvWidths, nnx.Module):
    """U-Net whose output is ``(B, H, W, num_classes)`` logits.

    Layers and parameter paths: ``down0`` ... ``down<depth-1>`` and ``bottom``
    (:class:`DoubleConv`: ``conv1``, ``bn1``, ``conv2``, ``bn2``), ``up<depth-1>``
    ... ``up0`` (:class:`Up`: ``upconv`` and the same four; ``up<i>`` reads
    the skip from ``down<i>``), and ``head`` (1x1 conv, the logits).
    BatchNorm uses momentum 0.9 and epsilon 1e-5 and follows ``model.train()``
    / ``model.eval()``.

    **Widths.** ``widths`` is a flat tuple with the output channels of every
    conv in data-flow order (:attr:`width_layers`): ``down0/conv1``,
    ``down0/conv2``, ..., ``bottom/conv1``, ``bottom/conv2``, then for ``up<i>``
    from ``i = depth - 1`` down to 0: ``upconv``, ``conv1``, ``conv2``
    (``5 * depth + 2`` entries). Skips are concatenated, never added, so every
    entry is free.

    Args:
        base: width of the first level (each level doubles it); ``None``
            means 64. Give it or ``widths``, not both; it is not part of
            :attr:`config`, whose ``widths`` already reflect it.
        depth: number of 2x2 pools (and of upsamplings).
        widths: output channels of every conv, as above; ``None`` for the
            widths that ``base`` gives. Lists are accepted (JSON round trips).
        num_classes: channels of the output layer ``head``.
        in_shape: ``(H, W, C)`` of one input; ``H`` and ``W`` must be
            multiples of ``2**depth`` (e.g. 28x28 with ``depth <= 2``).
        rngs: random streams for parameter initialisation.

    Raises:
        UserError: if both ``base`` and ``widths`` are given, a width, ``depth``
            or ``num_classes`` is not positive, the number of widths is wrong,
            or ``H``, ``W`` are not multiples of ``2**depth`` (also when called).

    Examples:
        >>> model = UNet(base=8, depth=2, num_classes=3, in_shape=(32, 32, 1), rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 32, 32, 1))).shape
        (2, 32, 32, 3)
    """

    output_layer: ClassVar[str] = "head"

    def __init__(
        self,
        *,
        base: int | None = None,
        depth: int = 4,
        widths: Sequence[int] | None = None,
        num_classes: int = 2,
        in_shape: Sequence[int] = (128, 128, 3),
        rngs: nnx.Rngs,
    ):
        if base is not None and widths is not None:
            raise UserError("UNet takes base or widths, not both")
        base = 64 if base is None else int(base)
        depth = int(depth)
        if depth < 1 or base < 1:
            raise UserError(f"UNet depth and base must be >= 1, got depth={depth}, base={base}")
        layers, defaults = self._layout(depth, base)
        widths = defaults if widths is None else tuple(int(w) for w in widths)
        in_shape = tuple(int(s) for s in in_shape)
        if len(widths) != len(layers):
            raise UserError(f"UNet with depth {depth} needs {len(layers)} widths (5 * depth + 2), got {len(widths)}")
        if min(widths) < 1 or num_classes < 1:
            raise UserError(f"UNet widths and num_classes must be >= 1, got {widths}, num_classes={num_classes}")
        if len(in_shape) != 3 or in_shape[2] < 1:
            raise UserError(f"UNet in_shape must be (H, W, C), got {in_shape}")
        self._check_size(depth, in_shape[:2])
        self._layers = layers
        self._config = {"depth": depth, "widths": widths, "num_classes": int(num_classes), "in_shape": in_shape}

        it = iter(widths)
        c, skips = in_shape[2], []
        for i in range(depth):
            w = (next(it), next(it))
            setattr(self, f"down{i}", DoubleConv(c, w, rngs=rngs))
            c = w[1]
            skips.append(c)
        w = (next(it), next(it))
        self.bottom = DoubleConv(c, w, rngs=rngs)
        c = w[1]
        for i in reversed(range(depth)):
            w = (next(it), next(it), next(it))
            setattr(self, f"up{i}", Up(c, skips[i], w, rngs=rngs))
            c = w[2]
        self.head = Conv(c, int(num_classes), (1, 1), rngs=rngs)

    @staticmethod
    def _layout(depth: int, base: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Conv paths in widths order and the widths ``base`` gives."""
        layers, defaults = [], []
        for i in range(depth):
            layers += [f"down{i}/conv1", f"down{i}/conv2"]
            defaults += [base * 2**i] * 2
        layers += ["bottom/conv1", "bottom/conv2"]
        defaults += [base * 2**depth] * 2
        for i in reversed(range(depth)):
            layers += [f"up{i}/upconv", f"up{i}/conv1", f"up{i}/conv2"]
            defaults += [base * 2**i] * 3
        return tuple(layers), tuple(defaults)

    @staticmethod
    def _check_size(depth: int, hw: Sequence[int]) -> None:
        if min(hw) < 1 or any(s % 2**depth for s in hw):
            raise UserError(
                f"UNet with depth {depth} needs H and W to be positive multiples of {2**depth}, got {tuple(hw)}; "
                "pad or crop the images, or lower depth"
            )

    def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
        """Per-pixel logits ``(B, H, W, num_classes)`` for NHWC images ``(B, H, W, C)``."""
        x = jnp.asarray(x)
        depth = self._config["depth"]
        self._check_size(depth, x.shape[1:3])
        skips = []
        for i in range(depth):
            x = getattr(self, f"down{i}")(x)
            skips.append(x)
            x = max_pool_2x2(x)
        x = self.bottom(x)
        for i in reversed(range(depth)):
            x = getattr(self, f"up{i}")(x, skips[i])
        return self.head(x)
