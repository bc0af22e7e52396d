"""ResNets: the CIFAR family (He et al. 2016, section 4.2) and ImageNet ResNet-18/50.

CIFAR ResNet-``6n+2`` (``resnet20``, ``resnet32``, ``resnet56``, ``resnet110``):
a 3x3 stem conv with 16 channels, three stages of ``n`` basic blocks with 16, 32
and 64 channels (the first block of stages 2 and 3 has stride 2), global average
pooling and a dense layer. Shortcuts that change shape use **option B**, a
1x1 conv + BN projection; the paper's CIFAR numbers use option A (zero padding),
which has no parameters, so ours have 2,752 parameters more (ResNet-20: 272,474
instead of 269,722).

ImageNet ResNet-18 (basic blocks) and ResNet-50 (bottleneck blocks), as in
torchvision: a 7x7 stride-2 stem, a 3x3 stride-2 max-pool, four stages of 64,
128, 256 and 512 (times 4 for bottlenecks) channels, global average pooling and
a dense layer; ResNet-50 puts its stride on the 3x3 conv ("v1.5"). They have
11,689,512 and 25,557,032 parameters at 1000 classes, torchvision's counts.

Convs are bias-free, each followed by a BatchNorm (momentum 0.9, epsilon 1e-5,
PyTorch's defaults) whose ``use_running_average`` follows ``model.train()`` /
``model.eval()``. Convs pad ``kernel // 2`` on every side, as PyTorch does, so
a stride-2 layer maps ``H`` to ``ceil(H / 2)``: every model runs on any
``H, W >= 1`` (the spatial size ends in a global average pool), e.g. the CIFAR
models on 28x28x1 MNIST with ``in_shape=(28, 28, 1)``.
"""

import functools
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
import jax.typing
from flax import nnx

from admmprune._errors import UserError
from admmprune.models.layers import Conv, PerConvWidths

_BN = {"momentum": 0.9, "epsilon": 1e-5}


class ConvBN(nnx.Module):
    """A bias-free conv followed by BatchNorm (``conv``, ``bn``); no activation.

    The conv pads ``kernel_size // 2`` on each side (PyTorch style), so with
    stride ``s`` an input of size ``H`` gives ``ceil(H / s)`` for odd kernels.

    Args:
        in_features: input channels.
        out_features: output channels.
        kernel_size: square kernel size.
        strides: stride in both spatial dimensions.
        feature_group_count: 1 for a dense conv, ``in_features`` for depthwise.
        rngs: random streams for parameter initialisation.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        strides: int = 1,
        feature_group_count: int = 1,
        rngs: nnx.Rngs,
    ):
        pad = kernel_size // 2
        self.conv = Conv(
            in_features,
            out_features,
            (kernel_size, kernel_size),
            strides=(strides, strides),
            padding=((pad, pad), (pad, pad)),
            feature_group_count=feature_group_count,
            use_bias=False,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(out_features, **_BN, rngs=rngs)

    def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
        return self.bn(self.conv(x))


def max_pool_3x3_s2(x: jax.typing.ArrayLike) -> jax.Array:
    """Max-pool NHWC with a 3x3 window, stride 2 and one row/column of padding.

    Equal to ``nnx.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`` (PyTorch's
    ``MaxPool2d(3, 2, 1)``), computed as the maximum of the nine strided
    slices of the ``-inf``-padded input, so that its gradient is elementwise
    selects instead of ``reduce_window``'s ``select_and_scatter``, which is
    slow to differentiate on CPU (see :func:`~admmprune.models.layers.max_pool_2x2`).

    Args:
        x: array of shape ``(B, H, W, C)``.

    Returns:
        Array of shape ``(B, ceil(H / 2), ceil(W / 2), C)``.
    """
    x = jnp.asarray(x)
    _, h, w, _ = x.shape
    oh, ow = (h + 1) // 2, (w + 1) // 2
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    windows = (xp[:, i : i + 2 * oh - 1 : 2, j : j + 2 * ow - 1 : 2, :] for i in range(3) for j in range(3))
    return functools.reduce(jnp.maximum, windows)


def _constant_bn(bn: nnx.BatchNorm, x: jax.Array) -> jax.Array:
    """``bn`` applied to a zero feature map, as one ``(B, 1, 1, C)`` row that broadcasts.

    What a residual branch whose inner channels were all pruned computes: a
    per-channel constant, ``bias`` in training mode (the batch statistics of
    zeros are zero, and the running statistics move exactly as the full-size
    map's would) and ``bias - mean * scale / sqrt(var + eps)`` in evaluation mode.
    """
    return bn(jnp.zeros((x.shape[0], 1, 1, bn.num_features), x.dtype))


class BasicBlock(nnx.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``, two 3x3 convs.

    ``widths`` are the output channels of ``conv1``, ``conv2`` and, when the
    block has one, the ``shortcut`` projection (a 1x1 :class:`ConvBN`).
    ``conv1`` carries the stride.

    A ``conv1`` width of 0 is a removed branch (every inner channel pruned):
    ``conv1``, ``bn1`` and ``conv2`` are gone (``None``), and the branch is
    the constant ``bn2(0)`` (see :func:`_constant_bn`), so the block is
    ``relu(shortcut(x) + constant)``.
    """

    #: Convs in the order of their entries in ``widths`` (shortcut last).
    convs: ClassVar[tuple[str, ...]] = ("conv1", "conv2")
    #: Convs whose width may be 0 (a removed branch).
    removable: ClassVar[tuple[str, ...]] = ("conv1",)
    #: Output channels of the block per unit of stage width.
    expansion: ClassVar[int] = 1

    def __init__(self, in_features: int, widths: Sequence[int], *, strides: int, projection: bool, rngs: nnx.Rngs):
        w1, w2 = widths[:2]
        pad = ((1, 1), (1, 1))
        # Each attribute is assigned once: NNX makes an attribute first set to None static.
        self.conv1 = Conv(in_features, w1, (3, 3), strides, padding=pad, use_bias=False, rngs=rngs) if w1 else None
        self.bn1 = nnx.BatchNorm(w1, **_BN, rngs=rngs) if w1 else None
        self.conv2 = Conv(w1, w2, (3, 3), padding=pad, use_bias=False, rngs=rngs) if w1 else None
        self.bn2 = nnx.BatchNorm(w2, **_BN, rngs=rngs)
        self.shortcut = ConvBN(in_features, widths[2], 1, strides=strides, rngs=rngs) if projection else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv1 is None:
            y = _constant_bn(self.bn2, x)
        else:
            y = nnx.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
        return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (with the stride, torchvision's "v1.5"), 1x1 expand, plus shortcut.

    ``widths`` are the output channels of ``conv1``, ``conv2``, ``conv3`` and,
    when the block has one, the ``shortcut`` projection (a 1x1 :class:`ConvBN`).

    Widths of 0 remove what is dead: with ``conv1`` at 0, ``conv2`` reads
    zeros, so ``conv1``, ``bn1`` and ``conv2`` are gone and ``conv3`` reads the
    constant ``relu(bn2(0))`` (one ``(B, 1, 1, C)`` row, exact because
    ``conv3`` is 1x1); with ``conv2`` at 0 the whole branch is the constant
    ``bn3(0)``.
    """

    convs: ClassVar[tuple[str, ...]] = ("conv1", "conv2", "conv3")
    removable: ClassVar[tuple[str, ...]] = ("conv1", "conv2")
    expansion: ClassVar[int] = 4

    def __init__(self, in_features: int, widths: Sequence[int], *, strides: int, projection: bool, rngs: nnx.Rngs):
        w1, w2, w3 = widths[:3]
        live = bool(w1 and w2)  # conv1 and conv2 compute something
        self.conv1 = Conv(in_features, w1, (1, 1), use_bias=False, rngs=rngs) if live else None
        self.bn1 = nnx.BatchNorm(w1, **_BN, rngs=rngs) if live else None
        self.conv2 = (
            Conv(w1, w2, (3, 3), strides, padding=((1, 1), (1, 1)), use_bias=False, rngs=rngs) if live else None
        )
        self.bn2 = nnx.BatchNorm(w2, **_BN, rngs=rngs) if w2 else None
        self.conv3 = Conv(w2, w3, (1, 1), use_bias=False, rngs=rngs) if w2 else None
        self.bn3 = nnx.BatchNorm(w3, **_BN, rngs=rngs)
        self.shortcut = ConvBN(in_features, widths[3], 1, strides=strides, rngs=rngs) if projection else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.conv3 is None:  # conv2 removed: the branch is bn3 of zeros
            y = _constant_bn(self.bn3, x)
        else:
            if self.conv1 is None:  # conv1 removed: conv2 reads zeros, conv3 a constant
                y = nnx.relu(_constant_bn(self.bn2, x))
            else:
                y = nnx.relu(self.bn1(self.conv1(x)))
                y = nnx.relu(self.bn2(self.conv2(y)))
            y = self.bn3(self.conv3(y))
        return nnx.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(PerConvWidths, nnx.Module):
    """Shared body of the registered ResNets; use a subclass such as :class:`ResNet20`.

    Layers and parameter paths: ``stem`` (:class:`ConvBN`: ``stem/conv``,
    ``stem/bn``), then ``stage<s>/block<j>`` for stages ``s = 1, 2, ...`` and
    blocks ``j = 0, 1, ...`` (e.g. ``stage2/block0/conv1``,
    ``stage2/block0/shortcut/conv``), then ``head`` (dense, the logits).

    **Widths.** ``widths`` is a flat tuple with the output channels of every
    conv, in the order of :attr:`width_layers`: ``stem/conv``, then block by
    block ``conv1, conv2[, conv3][, shortcut/conv]``. Which blocks have a
    projection shortcut is fixed by the architecture (the first block of a stage
    whose stride or default channel count changes), never by the widths. Convs
    whose outputs are summed must agree: in each stage, every block's last conv
    and the stage's projection (if any) have the stage's output width, and in a
    stage without a projection that width is the previous stage's (the stem's,
    for stage 1). Entries are therefore repeated; a constructor given widths
    that disagree raises :class:`UserError`. Pruning one channel of such a
    residual stream removes it from every conv on the stream at once.

    Example: ResNet-20's default has 21 entries: ``16`` (stem); stage 1,
    three blocks of ``(conv1, conv2)`` = ``16, 16``; stage 2, block 0
    ``(conv1, conv2, shortcut) = 32, 32, 32`` and two blocks of ``32, 32``;
    stage 3 the same with 64. Halving every entry gives a valid half-width
    ResNet-20.
    """

    output_layer: ClassVar[str] = "head"

    block: ClassVar[type[BasicBlock] | type[Bottleneck]]
    #: Blocks per stage.
    stage_blocks: ClassVar[tuple[int, ...]]
    #: Default width of each stage's inner convs (its output is this times ``block.expansion``).
    stage_widths: ClassVar[tuple[int, ...]]
    stem_width: ClassVar[int]
    #: ``True``: 7x7 stride-2 stem and 3x3 max-pool; ``False``: 3x3 stride-1 stem.
    imagenet_stem: ClassVar[bool]

    def __init__(
        self,
        *,
        widths: Sequence[int] | None,
        num_classes: int,
        in_shape: Sequence[int],
        rngs: nnx.Rngs,
    ):
        name = type(self).__name__
        layers, projections, defaults = self._layout()
        widths = defaults if widths is None else tuple(int(w) for w in widths)
        in_shape = tuple(int(s) for s in in_shape)
        if len(widths) != len(layers):
            raise UserError(f"{name} needs {len(layers)} widths (one per conv, see width_layers), got {len(widths)}")
        removable = set(self._removable(layers))
        if any(w < (0 if layer in removable else 1) for layer, w in zip(layers, widths, strict=True)):
            raise UserError(
                f"{name} widths must be >= 1 (>= 0 for a removed branch's inner convs, see removable_layers), "
                f"got {widths}"
            )
        if num_classes < 1:
            raise UserError(f"{name} num_classes must be >= 1, got {num_classes}")
        if len(in_shape) != 3 or min(in_shape) < 1:
            raise UserError(f"{name} in_shape must be (H, W, C) with positive sizes, got {in_shape}")
        self._check_residual_widths(layers, widths)
        self._layers = layers
        self._config = {"widths": widths, "num_classes": int(num_classes), "in_shape": in_shape}

        it = iter(widths)
        c = next(it)
        if self.imagenet_stem:
            self.stem = ConvBN(in_shape[2], c, 7, strides=2, rngs=rngs)
        else:
            self.stem = ConvBN(in_shape[2], c, 3, rngs=rngs)
        n_convs = len(self.block.convs)
        for s, n_blocks in enumerate(self.stage_blocks):
            blocks = {}
            for j in range(n_blocks):
                projection = projections[s] and j == 0
                bw = [next(it) for _ in range(n_convs + projection)]
                strides = 2 if (s > 0 and j == 0) else 1
                blocks[f"block{j}"] = self.block(c, bw, strides=strides, projection=projection, rngs=rngs)
                c = bw[n_convs - 1]
            setattr(self, f"stage{s + 1}", nnx.Dict(blocks))
        self.head = nnx.Linear(c, int(num_classes), rngs=rngs)

    @classmethod
    def _layout(cls) -> tuple[tuple[str, ...], tuple[bool, ...], tuple[int, ...]]:
        """Conv paths in widths order, whether each stage opens with a projection, default widths."""
        layers, projections, defaults = ["stem/conv"], [], [cls.stem_width]
        c = cls.stem_width
        for s, (n_blocks, w) in enumerate(zip(cls.stage_blocks, cls.stage_widths, strict=True)):
            out = w * cls.block.expansion
            projection = s > 0 or c != out
            projections.append(projection)
            for j in range(n_blocks):
                prefix = f"stage{s + 1}/block{j}"
                layers += [f"{prefix}/{conv}" for conv in cls.block.convs]
                defaults += [w] * (len(cls.block.convs) - 1) + [out]
                if projection and j == 0:
                    layers.append(f"{prefix}/shortcut/conv")
                    defaults.append(out)
            c = out
        return tuple(layers), tuple(projections), tuple(defaults)

    @classmethod
    def _removable(cls, layers: Sequence[str]) -> tuple[str, ...]:
        return tuple(p for p in layers if "/block" in p and p.rsplit("/", 1)[1] in cls.block.removable)

    @property
    def removable_layers(self) -> tuple[str, ...]:
        """Width layers that may have width 0: the inner convs of residual branches.

        A block whose inner channels are all pruned computes a constant on its
        branch; :func:`admmprune.structure.collapse.collapse` then builds it with width 0,
        which drops the branch's convs (see :class:`BasicBlock`, :class:`Bottleneck`).
        """
        return self._removable(self._layers)

    def _check_residual_widths(self, layers: tuple[str, ...], widths: tuple[int, ...]) -> None:
        """Raises UserError where convs summed into one residual stream disagree."""
        by_layer = dict(zip(layers, widths, strict=True))
        last = self.block.convs[-1]
        stream, source = by_layer["stem/conv"], "stem/conv"
        for s, n_blocks in enumerate(self.stage_blocks):
            prefix = f"stage{s + 1}/block0"
            if f"{prefix}/shortcut/conv" in by_layer:
                source = f"{prefix}/shortcut/conv"
                stream = by_layer[source]
            for j in range(n_blocks):
                path = f"stage{s + 1}/block{j}/{last}"
                if by_layer[path] != stream:
                    raise UserError(
                        f"{type(self).__name__} widths: {path} has {by_layer[path]} channels but is added to the "
                        f"residual stream of {source}, which has {stream}; convs summed together need equal widths"
                    )

    def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
        """Logits of shape ``(B, num_classes)`` for NHWC images ``(B, H, W, C)``."""
        x = nnx.relu(self.stem(x))
        if self.imagenet_stem:
            x = max_pool_3x3_s2(x)
        for s, n_blocks in enumerate(self.stage_blocks):
            stage = getattr(self, f"stage{s + 1}")
            for j in range(n_blocks):
                x = stage[f"block{j}"](x)
        return self.head(x.mean(axis=(1, 2)))


class CifarResNet(ResNet):
    """A CIFAR ResNet-``6n+2``: see the module docstring and :class:`ResNet`.

    Args:
        widths: output channels of every conv, see :class:`ResNet`; ``None``
            for the paper's 16/32/64. Lists are accepted (JSON round trips).
        num_classes: width of the output layer ``head``.
        in_shape: ``(H, W, C)`` of one input; only ``C`` shapes the model,
            which runs on any ``H, W >= 1`` (28x28x1 for MNIST works).
        rngs: random streams for parameter initialisation.

    Raises:
        UserError: if the number of widths is wrong, a width is not positive,
            or convs summed into one residual stream disagree.

    Examples:
        >>> model = ResNet20(in_shape=(28, 28, 1), rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 28, 28, 1))).shape
        (2, 10)
    """

    block = BasicBlock
    stage_widths = (16, 32, 64)
    stem_width = 16
    imagenet_stem = False

    def __init__(
        self,
        *,
        widths: Sequence[int] | None = None,
        num_classes: int = 10,
        in_shape: Sequence[int] = (32, 32, 3),
        rngs: nnx.Rngs,
    ):
        super().__init__(widths=widths, num_classes=num_classes, in_shape=in_shape, rngs=rngs)


class ResNet20(CifarResNet):
    """ResNet-20 (3 basic blocks per stage; 272,474 parameters at 10 classes)."""

    stage_blocks = (3, 3, 3)


class ResNet32(CifarResNet):
    """ResNet-32 (5 basic blocks per stage; 466,906 parameters at 10 classes)."""

    stage_blocks = (5, 5, 5)


class ResNet56(CifarResNet):
    """ResNet-56 (9 basic blocks per stage; 855,770 parameters at 10 classes)."""

    stage_blocks = (9, 9, 9)


class ResNet110(CifarResNet):
    """ResNet-110 (18 basic blocks per stage; 1,730,714 parameters at 10 classes)."""

    stage_blocks = (18, 18, 18)


class ImageNetResNet(ResNet):
    """An ImageNet ResNet (7x7 stem + max-pool, four stages): see :class:`ResNet`.

    Args:
        widths: output channels of every conv, see :class:`ResNet`; ``None``
            for torchvision's widths. Lists are accepted (JSON round trips).
        num_classes: width of the output layer ``head``.
        in_shape: ``(H, W, C)`` of one input; only ``C`` shapes the model,
            which runs on any ``H, W >= 1`` (224x224 is the standard size).
        rngs: random streams for parameter initialisation.

    Raises:
        UserError: as for :class:`CifarResNet`.
    """

    stage_widths = (64, 128, 256, 512)
    stem_width = 64
    imagenet_stem = True

    def __init__(
        self,
        *,
        widths: Sequence[int] | None = None,
        num_classes: int = 1000,
        in_shape: Sequence[int] = (224, 224, 3),
        rngs: nnx.Rngs,
    ):
        super().__init__(widths=widths, num_classes=num_classes, in_shape=in_shape, rngs=rngs)


class ResNet18(ImageNetResNet):
    """ResNet-18 (basic blocks 2-2-2-2; 11,689,512 parameters at 1000 classes)."""

    block = BasicBlock
    stage_blocks = (2, 2, 2, 2)


class ResNet50(ImageNetResNet):
    """ResNet-50 (bottleneck blocks 3-4-6-3; 25,557,032 parameters at 1000 classes)."""

    block = Bottleneck
    stage_blocks = (3, 4, 6, 3)
