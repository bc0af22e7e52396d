"""MobileNetV2 (Sandler et al. 2018), as in torchvision: 3,504,872 parameters at 1000 classes.

A 3x3 stride-2 stem with 32 channels, 17 inverted residual blocks (1x1 expand
conv, 3x3 depthwise conv via ``feature_group_count``, 1x1 linear projection,
each followed by BatchNorm, the first two by ReLU6), a 1x1 conv to 1280
channels, global average pooling and a dense layer. torchvision's dropout
before the dense layer is left out (it has no parameters; add it in training
code if wanted). BatchNorm uses momentum 0.9 and epsilon 1e-5 and follows
``model.train()`` / ``model.eval()``.

Convs pad ``kernel // 2`` on each side, so any ``H, W >= 1`` works; with
``small_input=True`` the stem and the first 24-channel block have stride 1
(the usual CIFAR port), so a 32x32 input ends at 4x4 instead of 1x1.
"""

from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.typing
from flax import nnx

from admmprune._errors import UserError
from admmprune.models.layers import PerConvWidths
from admmprune.models.resnet import ConvBN

#: ``(expansion t, output channels c, repeats n, stride s)`` of each block group.
_GROUPS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


def _make_divisible(v: float, divisor: int = 8) -> int:
    """Round ``v`` to a multiple of ``divisor``, never more than 10% down (torchvision's rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nnx.Module):
    """``expand`` (1x1, absent when the expansion is 1) -> ``depthwise`` (3x3) -> ``project`` (1x1, linear).

    Each is a :class:`~admmprune.models.resnet.ConvBN`; ``expand`` and
    ``depthwise`` are followed by ReLU6. With ``residual=True`` the input is
    added to the output.

    Args:
        in_features: input channels.
        widths: output channels of ``[expand,] depthwise, project``; the
            depthwise width equals its input width.
        strides: stride of the depthwise conv.
        expand: whether the block has an ``expand`` conv.
        residual: whether the input is added to the output.
        rngs: random streams for parameter initialisation.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        *,
        strides: int,
        expand: bool,
        residual: bool,
        rngs: nnx.Rngs,
    ):
        *hidden, out = widths
        self.expand = ConvBN(in_features, hidden[0], 1, rngs=rngs) if expand else None
        dw = hidden[-1]
        self.depthwise = ConvBN(dw, dw, 3, strides=strides, feature_group_count=dw, rngs=rngs)
        self.project = ConvBN(dw, out, 1, rngs=rngs)
        self.residual = residual

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x if self.expand is None else nnx.relu6(self.expand(x))
        y = self.project(nnx.relu6(self.depthwise(y)))
        return x + y if self.residual else y


class MobileNetV2(PerConvWidths, nnx.Module):
    """MobileNetV2 with an optional width multiplier and a small-input stride option.

    Layers and parameter paths: ``stem`` (``stem/conv``, ``stem/bn``),
    ``block0`` ... ``block16`` (:class:`InvertedResidual`, e.g.
    ``block3/expand/conv``, ``block3/depthwise/conv``, ``block3/project/conv``;
    ``block0`` has no ``expand``), ``last`` (1x1 :class:`ConvBN`) and ``head``
    (dense, the logits). Blocks that are not the first of their group add
    their input to their output (blocks 2, 4, 5, 7, 8, 9, 11, 12, 14, 15);
    which blocks do is fixed by the architecture, never by the widths.

    **Widths.** ``widths`` is a flat tuple with the output channels of every
    conv, in the order of :attr:`width_layers`: ``stem/conv``, then per block
    ``[expand/conv,] depthwise/conv, project/conv``, then ``last/conv`` (52
    entries). A depthwise conv maps each channel to itself, so its entry must
    equal its input's (the block's ``expand``, or for ``block0`` the stem);
    a residual block's ``project`` must equal its input's width (the previous
    block's ``project``). Widths that disagree raise :class:`UserError`.

    Args:
        widths: output channels of every conv; ``None`` for the standard ones
            scaled by ``width_mult``. Lists are accepted (JSON round trips).
        width_mult: multiplier of the standard widths (rounded to multiples of
            8 as torchvision does; ``last`` is never made narrower than 1280);
            ``None`` means 1.0. Give it or ``widths``, not both; it is not
            part of :attr:`config`, whose ``widths`` already reflect it.
        num_classes: width of the output layer ``head``.
        in_shape: ``(H, W, C)`` of one input; only ``C`` shapes the model.
        small_input: stride 1 in the stem and in ``block1`` (for 32x32 inputs).
        rngs: random streams for parameter initialisation.

    Raises:
        UserError: if both ``widths`` and ``width_mult`` are given, the number
            of widths is wrong, a width is not positive, or widths disagree as
            described above.

    Examples:
        >>> model = MobileNetV2(width_mult=0.5, num_classes=10, in_shape=(32, 32, 3),
        ...                     small_input=True, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 32, 32, 3))).shape
        (2, 10)
    """

    output_layer: ClassVar[str] = "head"

    def __init__(
        self,
        *,
        widths: Sequence[int] | None = None,
        width_mult: float | None = None,
        num_classes: int = 1000,
        in_shape: Sequence[int] = (224, 224, 3),
        small_input: bool = False,
        rngs: nnx.Rngs,
    ):
        if widths is not None and width_mult is not None:
            raise UserError("MobileNetV2 takes widths or width_mult, not both")
        width_mult = 1.0 if width_mult is None else float(width_mult)
        if width_mult <= 0:
            raise UserError(f"MobileNetV2 width_mult must be > 0, got {width_mult}")
        layers, blocks, defaults = self._layout(width_mult)
        widths = defaults if widths is None else tuple(int(w) for w in widths)
        in_shape = tuple(int(s) for s in in_shape)
        if len(widths) != len(layers):
            raise UserError(
                f"MobileNetV2 needs {len(layers)} widths (one per conv, see width_layers), got {len(widths)}"
            )
        if min(widths) < 1 or num_classes < 1:
            raise UserError(f"MobileNetV2 widths and num_classes must be >= 1, got {widths}, num_classes={num_classes}")
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise UserError(f"MobileNetV2 in_shape must be (H, W, C) with positive sizes, got {in_shape}")
        it = iter(widths)
        stem = next(it)
        block_widths = [[next(it) for _ in range(2 + expand)] for expand, _, _ in blocks]
        last = next(it)
        c = stem
        for i, ((expand, _, residual), bw) in enumerate(zip(blocks, block_widths, strict=True)):
            self._check_block(i, c, bw, expand, residual)
            c = bw[-1]
        self._layers = layers
        self._blocks = blocks
        self._config = {
            "widths": widths,
            "num_classes": int(num_classes),
            "in_shape": in_shape,
            "small_input": bool(small_input),
        }

        self.stem = ConvBN(in_shape[2], stem, 3, strides=1 if small_input else 2, rngs=rngs)
        c = stem
        for i, ((expand, strides, residual), bw) in enumerate(zip(blocks, block_widths, strict=True)):
            strides = 1 if small_input and i == 1 else strides
            block = InvertedResidual(c, bw, strides=strides, expand=expand, residual=residual, rngs=rngs)
            setattr(self, f"block{i}", block)
            c = bw[-1]
        self.last = ConvBN(c, last, 1, rngs=rngs)
        self.head = nnx.Linear(last, int(num_classes), rngs=rngs)

    @staticmethod
    def _layout(
        width_mult: float,
    ) -> tuple[tuple[str, ...], tuple[tuple[bool, int, bool], ...], tuple[int, ...]]:
        """Conv paths in widths order, ``(expand, stride, residual)`` per block, default widths."""
        c = _make_divisible(32 * width_mult)
        layers, blocks, defaults = ["stem/conv"], [], [c]
        for t, out, n, s in _GROUPS:
            out = _make_divisible(out * width_mult)
            for j in range(n):
                i = len(blocks)
                hidden = round(c * t)
                if t != 1:
                    layers.append(f"block{i}/expand/conv")
                    defaults.append(hidden)
                layers += [f"block{i}/depthwise/conv", f"block{i}/project/conv"]
                defaults += [hidden, out]
                blocks.append((t != 1, s if j == 0 else 1, j > 0))
                c = out
        layers.append("last/conv")
        defaults.append(_make_divisible(1280 * max(1.0, width_mult)))
        return tuple(layers), tuple(blocks), tuple(defaults)

    @staticmethod
    def _check_block(i: int, c: int, bw: Sequence[int], expand: bool, residual: bool) -> None:
        """Raises UserError where a block's widths cannot fit together."""
        dw_in = bw[0] if expand else c
        if bw[-2] != dw_in:
            raise UserError(
                f"MobileNetV2 widths: block{i}/depthwise/conv has {bw[-2]} channels but its input has {dw_in}; "
                "a depthwise conv keeps its input's width"
            )
        if residual and bw[-1] != c:
            raise UserError(
                f"MobileNetV2 widths: block{i}/project/conv has {bw[-1]} channels but is added to its input, "
                f"which has {c}; convs summed together need equal widths"
            )

    def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
        """Logits of shape ``(B, num_classes)`` for NHWC images ``(B, H, W, C)``."""
        x = nnx.relu6(self.stem(x))
        for i in range(len(self._blocks)):
            x = getattr(self, f"block{i}")(x)
        x = nnx.relu6(self.last(x))
        return self.head(x.mean(axis=(1, 2)))
