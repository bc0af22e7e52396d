"""Small pieces shared by the models: pooling, flattening, the widths mixin.

The functions are pure; nothing here owns parameters.
"""

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import jax.typing
from flax import nnx


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


#: Examples per chunk of the batch in :func:`conv_general_dilated`'s weight gradient on CPU.
WEIGHT_GRAD_CHUNK = 16
#: At most this many chunks (a larger batch gets larger chunks), to bound the unrolled graph.
MAX_WEIGHT_GRAD_CHUNKS = 16


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any, **kwargs: Any) -> jax.Array:
    """``jax.lax.conv_general_dilated`` with a weight gradient that is fast on CPU.

    The value, the input gradient and every argument are lax's. Only the
    gradient with respect to the kernel differs on the CPU backend: it is the
    sum of the kernel gradients of batch chunks of :data:`WEIGHT_GRAD_CHUNK`
    examples (at most :data:`MAX_WEIGHT_GRAD_CHUNKS` chunks), which is the
    same sum in another order, so equal up to float rounding. XLA:CPU
    computes a convolution's kernel gradient single-threaded and, over a whole
    batch, far off its best speed: on this project's 2-core machine a 3x3,
    16-channel 28x28 layer at batch 128 took 30 ms in one piece and 11 ms in
    chunks of 16 (``benchmarks/bench_vs_torch.py`` has the whole-model
    effect). Other backends, ``batch_group_count > 1`` and batches of at most
    one chunk use lax's gradient unchanged.

    Pass it to ``nnx.Conv(..., conv_general_dilated=conv_general_dilated)``
    (what :func:`Conv` does); parameters and outputs are those of a plain
    ``nnx.Conv``.
    """
    static = (tuple(window_strides), _hashable(padding), tuple(sorted((k, _hashable(v)) for k, v in kwargs.items())))
    if jax.default_backend() != "cpu" or kwargs.get("batch_group_count", 1) != 1:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    return _chunked_conv(lhs, rhs, static)


def _hashable(value: Any) -> Any:
    if isinstance(value, list) or type(value) is tuple:  # not a namedtuple such as ConvDimensionNumbers
        return tuple(_hashable(v) for v in value)
    return value


def _lax_conv(lhs: jax.Array, rhs: jax.Array, static: tuple) -> jax.Array:
    strides, padding, kwargs = static
    return jax.lax.conv_general_dilated(lhs, rhs, strides, padding, **dict(kwargs))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _chunked_conv(lhs: jax.Array, rhs: jax.Array, static: tuple) -> jax.Array:
    return _lax_conv(lhs, rhs, static)


def _chunked_conv_fwd(lhs: jax.Array, rhs: jax.Array, static: tuple) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _lax_conv(lhs, rhs, static), (lhs, rhs)


def _chunked_conv_bwd(static: tuple, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    lhs, rhs = res
    _, vjp_lhs = jax.vjp(lambda x: _lax_conv(x, rhs, static), lhs)
    (d_lhs,) = vjp_lhs(g)
    dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dict(static[2]).get("dimension_numbers"))
    lhs_batch, out_batch = dims.lhs_spec[0], dims.out_spec[0]
    n = lhs.shape[lhs_batch]
    size = max(WEIGHT_GRAD_CHUNK, -(-n // MAX_WEIGHT_GRAD_CHUNKS))
    d_rhs = None
    for start in range(0, n, size):
        x = jax.lax.slice_in_dim(lhs, start, min(start + size, n), axis=lhs_batch)
        gx = jax.lax.slice_in_dim(g, start, min(start + size, n), axis=out_batch)
        _, vjp_rhs = jax.vjp(lambda w, x=x: _lax_conv(x, w, static), rhs)
        (part,) = vjp_rhs(gx)
        d_rhs = part if d_rhs is None else d_rhs + part
    return d_lhs, d_rhs


_chunked_conv.defvjp(_chunked_conv_fwd, _chunked_conv_bwd)


def Conv(*args: Any, **kwargs: Any) -> nnx.Conv:  # noqa: N802 (a constructor, named as one)
    """``nnx.Conv(*args, **kwargs)`` computing with :func:`conv_general_dilated`: the zoo's convs."""
    return nnx.Conv(*args, conv_general_dilated=conv_general_dilated, **kwargs)


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
