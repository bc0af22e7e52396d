"""Small pieces shared by the models: pooling, flattening, the widths mixin.

The functions are pure; nothing here owns parameters.
"""

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import jax.typing


def max_pool_2x2(x: jax.typing.ArrayLike) -> jax.Array:
    """Max-pool an NHWC batch with a 2x2 window and stride 2 (VALID padding).

    Computed as a reshape followed by a max over the two window axes, which is
    equal to ``lax.reduce_window(x, -inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
    "VALID")`` but much faster to differentiate on CPU: the backward pass of
    ``reduce_window`` is a ``select_and_scatter`` that measured about 8x slower
    here than the gradient of a plain reduction.

    An odd height or width is handled as VALID padding does: the last row or
    column is cropped away, so the output is ``(B, H // 2, W // 2, C)``.

    Gradients agree with ``reduce_window`` wherever each window has a unique
    maximum. On ties, ``jnp.max`` splits the gradient evenly among the tied
    elements while ``select_and_scatter`` gives it all to one of them.

    Args:
        x: array of shape ``(B, H, W, C)``.

    Returns:
        Array of shape ``(B, H // 2, W // 2, C)`` and the dtype of ``x``.
    """
    x = jnp.asarray(x)
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    x = x[:, : 2 * h2, : 2 * w2, :]
    return x.reshape(b, h2, 2, w2, 2, c).max(axis=(2, 4))


def flatten(x: jax.typing.ArrayLike) -> jax.Array:
    """Flatten all axes but the first (row-major, so NHWC order for images)."""
    x = jnp.asarray(x)
    return x.reshape(x.shape[0], -1)


class PerConvWidths:
    """Mixin for models with one width per conv (the zoo's convnets).

    The class sets ``self._config`` (its constructor keyword arguments but
    ``rngs``, with the resolved ``widths``) and ``self._layers`` (the path of
    the conv of each ``widths`` entry) in ``__init__``.
    """

    #: The constructor argument that :attr:`widths` comes from.
    widths_arg: ClassVar[str] = "widths"

    @property
    def widths(self) -> tuple[int, ...]:
        """Output channels of every conv, aligned with :attr:`width_layers`: the ``widths`` argument."""
        return self._config["widths"]

    @property
    def width_layers(self) -> tuple[str, ...]:
        """Paths of the convs whose output channels :attr:`widths` lists, in the same order."""
        return self._layers

    @property
    def config(self) -> dict[str, Any]:
        """Constructor keyword arguments (all but ``rngs``, and but shorthands such as
        ``width_mult`` or ``base`` that only choose default widths); JSON-serialisable."""
        return dict(self._config)
