"""Multi-layer perceptron with ReLU hidden layers (e.g. LeNet-300-100)."""

import itertools
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.typing
from flax import nnx

from admmprune._errors import UserError
from admmprune.models.layers import flatten


class MLP(nnx.Module):
    """Dense layers with ReLU between them; image inputs are flattened first.

    Hidden layer ``i`` is ``layers[i]`` (parameter paths ``layers/<i>/kernel``
    and ``layers/<i>/bias``); the output layer is ``head`` (``head/kernel``,
    ``head/bias``) and has no activation.

    A pruned model is rebuilt smaller by passing fewer units:
    ``MLP(**{**model.config, "hidden": (120, 40)}, rngs=...)``.

    Args:
        in_features: number of input features after flattening (784 for
            28x28x1 images).
        hidden: widths of the hidden layers; may be empty. Lists are accepted
            (JSON round trips) and stored as a tuple of ints.
        num_classes: width of the output layer ``head``.
        rngs: random streams for parameter initialisation.

    Raises:
        UserError: if a width is not positive.

    Examples:
        >>> model = MLP(in_features=784, hidden=(300, 100), num_classes=10, rngs=nnx.Rngs(0))
        >>> model(jnp.zeros((2, 28, 28, 1))).shape
        (2, 10)
    """

    #: Name of the layer whose outputs are the logits; never prune its outputs.
    output_layer: ClassVar[str] = "head"

    def __init__(
        self,
        *,
        in_features: int = 784,
        hidden: Sequence[int] = (300, 100),
        num_classes: int = 10,
        rngs: nnx.Rngs,
    ):
        hidden = tuple(int(h) for h in hidden)
        if min((in_features, num_classes, *hidden)) < 1:
            raise UserError(
                f"MLP widths must all be >= 1, got in_features={in_features}, "
                f"hidden={hidden}, num_classes={num_classes}"
            )
        self._config = {
            "in_features": int(in_features),
            "hidden": hidden,
            "num_classes": int(num_classes),
        }
        sizes = (int(in_features), *hidden)
        self.layers = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in itertools.pairwise(sizes)])
        self.head = nnx.Linear(sizes[-1], int(num_classes), rngs=rngs)

    @property
    def widths(self) -> tuple[int, ...]:
        """The prunable widths: the ``hidden`` argument."""
        return self._config["hidden"]

    #: The constructor argument that :attr:`widths` comes from.
    widths_arg: ClassVar[str] = "hidden"

    @property
    def chain(self) -> tuple[tuple[str, int], ...]:
        """Layers in data-flow order with the repeat of their input channels
        (see :func:`admmprune.structure.graph.chain_specs`)."""
        return tuple((f"layers/{i}", 1) for i in range(len(self.layers))) + (("head", 1),)

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (all but ``rngs``); JSON-serialisable."""
        return dict(self._config)

    def __call__(self, x: jax.typing.ArrayLike) -> jax.Array:
        """Logits of shape ``(B, num_classes)`` for inputs ``(B, ...)``."""
        x = flatten(x)
        for layer in self.layers:
            x = nnx.relu(layer(x))
        return self.head(x)
