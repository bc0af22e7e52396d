"""LeNet-5, the Caffe variant (431,080 parameters on 28x28x1 inputs)."""

from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.typing
from flax import nnx

from admmprune._errors import UserError
from admmprune.models.layers import Conv, flatten, max_pool_2x2

_KERNEL = (5, 5)


def _pooled_size(size: int) -> int:
    """Spatial size after one 5x5 VALID conv and one 2x2 stride-2 pool."""
    return (size - (_KERNEL[0] - 1)) // 2


class LeNet5(nnx.Module):
    """LeNet-5 as in Caffe's ``examples/mnist/lenet_train_test.prototxt``.

    ``conv1`` (5x5, VALID) -> max-pool 2x2 -> ``conv2`` (5x5, VALID) ->
    max-pool 2x2 -> flatten (NHWC order) -> ``fc1`` -> relu -> ``fc2``.
    Caffe's LeNet has no nonlinearity after the convolutions; ``conv_relu=True``
    adds one after each.

    Odd spatial sizes before a pool are cropped by one row/column (VALID).

    A pruned model is rebuilt smaller by passing fewer channels:
    ``LeNet5(**{**model.config, "features": (5, 12, 100)}, rngs=...)``.

    Args:
        features: output channels of ``conv1`` and ``conv2`` and the width
            of ``fc1``. Lists are accepted (JSON round trips) and stored as a
            tuple of ints.
        num_classes: width of the output layer ``fc2``.
        in_shape: ``(H, W, C)`` of one input image, used to size ``fc1``.
        conv_relu: put a ReLU after each convolution (not in Caffe's model).
        rngs: random streams for parameter initialisation.

    Raises:
        UserError: if a width is not positive or ``in_shape`` is too small to
            survive both conv/pool stages.

    Examples:
        >>> model = LeNet5(rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 28, 28, 1))).shape
        (2, 10)
    """

    #: Name of the layer whose outputs are the logits; never prune its outputs.
    output_layer: ClassVar[str] = "fc2"

    def __init__(
        self,
        *,
        features: Sequence[int] = (20, 50, 500),
        num_classes: int = 10,
        in_shape: Sequence[int] = (28, 28, 1),
        conv_relu: bool = False,
        rngs: nnx.Rngs,
    ):
        features = tuple(int(f) for f in features)
        in_shape = tuple(int(s) for s in in_shape)
        if len(features) != 3 or min(features) < 1 or num_classes < 1:
            raise UserError(
                f"LeNet5 needs features=(conv1, conv2, fc1) and num_classes all >= 1, "
                f"got features={features}, num_classes={num_classes}"
            )
        if len(in_shape) != 3:
            raise UserError(f"LeNet5 in_shape must be (H, W, C), got {in_shape}")
        h, w, c = in_shape
        h, w = _pooled_size(_pooled_size(h)), _pooled_size(_pooled_size(w))
        if h < 1 or w < 1:
            raise UserError(f"LeNet5 in_shape {in_shape} is too small; it needs H, W >= 16")
        self._flat_repeat = h * w
        self._config = {
            "features": features,
            "num_classes": int(num_classes),
            "in_shape": in_shape,
            "conv_relu": bool(conv_relu),
        }
        f1, f2, f3 = features
        self.conv1 = Conv(c, f1, _KERNEL, padding="VALID", rngs=rngs)
        self.conv2 = Conv(f1, f2, _KERNEL, padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(h * w * f2, f3, rngs=rngs)
        self.fc2 = nnx.Linear(f3, int(num_classes), rngs=rngs)

    @property
    def widths(self) -> tuple[int, ...]:
        """The prunable widths ``(conv1, conv2, fc1)``: the ``features`` argument."""
        return self._config["features"]

    #: The constructor argument that :attr:`widths` comes from.
    widths_arg: ClassVar[str] = "features"

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (all but ``rngs``); JSON-serialisable."""
        return dict(self._config)

    @property
    def chain(self) -> tuple[tuple[str, int], ...]:
        """Layers in data-flow order with the repeat of their input channels.

        ``fc1`` reads the flattened ``(H, W, conv2)`` map, so each ``conv2``
        channel is ``H * W`` rows of its kernel. See
        :func:`admmprune.structure.graph.chain_specs`.
        """
        return (("conv1", 1), ("conv2", 1), ("fc1", self._flat_repeat), ("fc2", 1))

    def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
        """Logits of shape ``(B, num_classes)`` for NHWC images ``(B, H, W, C)``."""
        relu = nnx.relu if self._config["conv_relu"] else (lambda y: y)
        x = max_pool_2x2(relu(self.conv1(x)))
        x = max_pool_2x2(relu(self.conv2(x)))
        x = nnx.relu(self.fc1(flatten(x)))
        return self.fc2(x)
