"""VGG-11/16/19 with BatchNorm for 32x32 inputs (the common CIFAR variant).

Five stages of 3x3 conv-BN-ReLU layers (VGG-16: 2, 2, 3, 3, 3 convs with 64,
128, 256, 512, 512 channels), each stage closed by a 2x2 max-pool, then one
dense layer ``512 -> num_classes``: the classifier of the widely used CIFAR
port (``kuangliu/pytorch-cifar``), not ImageNet's three 4096-wide layers. As
there, the convs keep their bias, so the parameter counts are the published
ones: 9,231,114 (VGG-11), 14,728,266 (VGG-16) and 20,040,522 (VGG-19) at 10
classes.

On 32x32 inputs the fifth pool sees a 2x2 map; here it is a global max-pool
instead, which is the same thing there and lets the model run on any
``H, W >= 16`` (e.g. 28x28x1 MNIST: 28 -> 14 -> 7 -> 3 -> 1 after four pools).
"""

from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.typing
from flax import nnx

from admmprune._errors import UserError
from admmprune.models.layers import Conv, PerConvWidths, max_pool_2x2


class VGG(PerConvWidths, nnx.Module):
    """Shared body of the registered VGGs; use :class:`VGG11`, :class:`VGG16` or :class:`VGG19`.

    Layers and parameter paths: ``conv1`` ... ``conv<N>`` (3x3, SAME, with
    bias) each followed by ``bn1`` ... ``bn<N>`` and a ReLU, numbered through
    all stages in data-flow order; then ``head`` (dense, the logits).
    BatchNorm uses momentum 0.9 and epsilon 1e-5 (PyTorch's defaults) and
    follows ``model.train()`` / ``model.eval()``.

    **Widths.** ``widths`` are the output channels of ``conv1`` ... ``conv<N>``
    in order (see :attr:`width_layers`); a plain chain, so every entry is free.
    ``VGG16(**{**model.config, "widths": smaller}, rngs=...)`` rebuilds it.

    Args:
        widths: output channels of each conv; ``None`` for the standard ones.
            Lists are accepted (JSON round trips) and stored as a tuple.
        num_classes: width of the output layer ``head``.
        in_shape: ``(H, W, C)`` of one input; ``C`` shapes the first conv and
            ``H, W`` must be at least 16 (four 2x2 pools before the global one).
        rngs: random streams for parameter initialisation.

    Raises:
        UserError: if the number of widths is wrong, a width is not positive,
            or ``in_shape`` is smaller than 16x16.

    Examples:
        >>> model = VGG11(in_shape=(28, 28, 1), rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 28, 28, 1))).shape
        (2, 10)
    """

    output_layer: ClassVar[str] = "head"
    #: Default conv widths, one tuple per stage (each stage ends with a pool).
    stages: ClassVar[tuple[tuple[int, ...], ...]]

    def __init__(
        self,
        *,
        widths: Sequence[int] | None = None,
        num_classes: int = 10,
        in_shape: Sequence[int] = (32, 32, 3),
        rngs: nnx.Rngs,
    ):
        name = type(self).__name__
        defaults = tuple(w for stage in self.stages for w in stage)
        widths = defaults if widths is None else tuple(int(w) for w in widths)
        in_shape = tuple(int(s) for s in in_shape)
        if len(widths) != len(defaults):
            raise UserError(f"{name} needs {len(defaults)} widths (one per conv), got {len(widths)}")
        if min(widths) < 1 or num_classes < 1:
            raise UserError(f"{name} widths and num_classes must be >= 1, got {widths}, num_classes={num_classes}")
        if len(in_shape) != 3 or in_shape[2] < 1 or min(in_shape[:2]) < 16:
            raise UserError(f"{name} in_shape must be (H, W, C) with H, W >= 16, got {in_shape}")
        self._config = {"widths": widths, "num_classes": int(num_classes), "in_shape": in_shape}
        self._layers = tuple(f"conv{i}" for i in range(1, len(widths) + 1))
        c = in_shape[2]
        for i, w in enumerate(widths, start=1):
            setattr(self, f"conv{i}", Conv(c, w, (3, 3), padding="SAME", rngs=rngs))
            setattr(self, f"bn{i}", nnx.BatchNorm(w, momentum=0.9, epsilon=1e-5, rngs=rngs))
            c = w
        self.head = nnx.Linear(c, int(num_classes), rngs=rngs)

    def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
        """Logits of shape ``(B, num_classes)`` for NHWC images ``(B, H, W, C)``."""
        i = 1
        for s, stage in enumerate(self.stages):
            for _ in stage:
                x = nnx.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
                i += 1
            x = max_pool_2x2(x) if s < len(self.stages) - 1 else x.max(axis=(1, 2))
        return self.head(x)


class VGG11(VGG):
    """VGG-11 ("A"): 8 convs, 9,231,114 parameters at 10 classes."""

    stages = ((64,), (128,), (256, 256), (512, 512), (512, 512))


class VGG16(VGG):
    """VGG-16 ("D"): 13 convs, 14,728,266 parameters at 10 classes."""

    stages = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class VGG19(VGG):
    """VGG-19 ("E"): 16 convs, 20,040,522 parameters at 10 classes."""

    stages = ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512), (512, 512, 512, 512))
