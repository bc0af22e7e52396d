"""Small pieces shared by the models: pooling, flattening, the widths mixin.

The functions are pure; nothing here owns parameters.
"""

import contextlib
import contextvars
import functools
import operator
from collections.abc import Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import jax.typing
from flax import nnx

_REFERENCE = contextvars.ContextVar("admmprune_reference_forms", default=False)


@contextlib.contextmanager
def reference_forms() -> Iterator[None]:
    """Within the block, :func:`max_pool_2x2` and :func:`conv_general_dilated` trace as lax ops.

    Their fast CPU forms compute the same values out of slices, products and
    maxima, which a reader of the jaxpr (structure discovery, MAC counting,
    XLA's FLOP count) would not recognise as one convolution or pool; those
    readers trace inside this block. A function traced here and jitted keeps
    the reference form in its compiled cache (same values, only slower).
    """
    token = _REFERENCE.set(True)
    try:
        yield
    finally:
        _REFERENCE.reset(token)


def max_pool_2x2(x: jax.typing.ArrayLike) -> jax.Array:
    """Max-pool an NHWC batch with a 2x2 window and stride 2 (VALID padding).

    Equal to ``lax.reduce_window(x, -inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
    "VALID")`` but faster on CPU both ways. The value is the maximum of the
    four strided sub-grids (one fused elementwise loop: at batch 256 it kept
    the collapsed LeNet-5's 2-channel pool at 1.4 ms where a reduction took
    11 ms, fused with its producer). The gradient is that of a reshape
    followed by a max over the two window axes: the backward pass of
    ``reduce_window`` is a ``select_and_scatter`` that measured about 8x
    slower here, and the strided form's backward was about 10% slower in
    LeNet-5's train step.

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
    return _max_pool_2x2(jnp.asarray(x), _REFERENCE.get())  # an argument: jax caches the traced forward


def _reshape_max_pool(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    h2, w2 = h // 2, w // 2
    return x[:, : 2 * h2, : 2 * w2, :].reshape(b, h2, 2, w2, 2, c).max(axis=(2, 4))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_2x2(x: jax.Array, reference: bool) -> jax.Array:
    if reference:
        return _reshape_max_pool(x)
    h, w = 2 * (x.shape[1] // 2), 2 * (x.shape[2] // 2)
    top = jnp.maximum(x[:, 0:h:2, 0:w:2], x[:, 0:h:2, 1:w:2])
    bottom = jnp.maximum(x[:, 1:h:2, 0:w:2], x[:, 1:h:2, 1:w:2])
    return jnp.maximum(top, bottom)


def _max_pool_2x2_fwd(x: jax.Array, reference: bool) -> tuple[jax.Array, jax.Array]:
    return _reshape_max_pool(x), x


def _max_pool_2x2_bwd(reference: bool, x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return jax.vjp(_reshape_max_pool, x)[1](g)


_max_pool_2x2.defvjp(_max_pool_2x2_fwd, _max_pool_2x2_bwd)


#: Examples per chunk of the batch in :func:`conv_general_dilated`'s weight gradient on CPU.
WEIGHT_GRAD_CHUNK = 16
#: At most this many chunks (a larger batch gets larger chunks), to bound the unrolled graph.
MAX_WEIGHT_GRAD_CHUNKS = 16


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Any, padding: Any, **kwargs: Any) -> jax.Array:
    """``jax.lax.conv_general_dilated`` with a weight gradient that is fast on CPU.

    Every argument is lax's, and so is every result up to float rounding. On
    the CPU backend the value of a one-input-channel convolution is a sum over
    kernel taps (:data:`TAPS_MAX_IN_CHANNELS`), the input gradient of a 5x5 or
    tiny convolution is a matmul and a sum of shifted slices
    (:data:`TAP_GRAD_MIN_TAPS`), and the gradient with respect to the kernel is the
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
    # The reference flag is part of the static arguments: jax caches the traced forward by them.
    static = (
        tuple(window_strides),
        _hashable(padding),
        tuple(sorted((k, _hashable(v)) for k, v in kwargs.items())),
        _REFERENCE.get(),
    )
    if jax.default_backend() != "cpu" or kwargs.get("batch_group_count", 1) != 1:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)
    return _chunked_conv(lhs, rhs, static)


def _hashable(value: Any) -> Any:
    if isinstance(value, list) or type(value) is tuple:  # not a namedtuple such as ConvDimensionNumbers
        return tuple(_hashable(v) for v in value)
    return value


def _lax_conv(lhs: jax.Array, rhs: jax.Array, static: tuple) -> jax.Array:
    strides, padding, kwargs, _ = static
    return jax.lax.conv_general_dilated(lhs, rhs, strides, padding, **dict(kwargs))


#: On CPU, a 2-D NHWC convolution with at most this many input channels is
#: computed as a sum over kernel taps of broadcast products (one fused loop)
#: instead of XLA's convolution. Measured on this project's 2-core machine at
#: batch 256: 5x5, 1 -> 2 channels on 28x28 took 6.7 ms as a convolution and
#: 0.3 ms as taps; with 2 input channels the convolution was already faster
#: (2 -> 5 on 12x12: 0.9 ms against 2.9 ms), hence 1.
TAPS_MAX_IN_CHANNELS = 1


def _forward(lhs: jax.Array, rhs: jax.Array, static: tuple) -> jax.Array:
    """The convolution's value: as taps where :data:`TAPS_MAX_IN_CHANNELS` says so, else lax's."""
    pads = None if static[3] else _taps_padding(lhs, rhs, static)
    if pads is None:
        return _lax_conv(lhs, rhs, static)
    strides, _, kwargs, _ = static
    dilation = tuple(dict(kwargs).get("rhs_dilation") or (1, 1))
    x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
    kh, kw, cin, _ = rhs.shape
    out_h = (x.shape[1] - dilation[0] * (kh - 1) - 1) // strides[0] + 1
    out_w = (x.shape[2] - dilation[1] * (kw - 1) - 1) // strides[1] + 1
    out = None
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dilation[0], i * dilation[0] + strides[0] * (out_h - 1) + 1, strides[0])
            cols = slice(j * dilation[1], j * dilation[1] + strides[1] * (out_w - 1) + 1, strides[1])
            tap = x[:, rows, cols, :]
            for c in range(cin):
                term = tap[..., c : c + 1] * rhs[i, j, c]
                out = term if out is None else out + term
    return out.astype(jnp.result_type(lhs, rhs))


def _taps_padding(lhs: jax.Array, rhs: jax.Array, static: tuple) -> tuple | None:
    """The explicit padding when the taps form applies to this convolution, else None."""
    if lhs.ndim != 4 or rhs.shape[2] > TAPS_MAX_IN_CHANNELS:
        return None
    return _nhwc_padding(lhs, rhs, static)


def _nhwc_padding(lhs: jax.Array, rhs: jax.Array, static: tuple) -> tuple | None:
    """The explicit padding of a plain 2-D NHWC / HWIO convolution (no groups,
    no input dilation, default precision and sharding), else None."""
    strides, padding, kwargs, _ = static
    kwargs = dict(kwargs)
    if lhs.ndim != 4 or rhs.ndim != 4 or rhs.shape[2] != lhs.shape[3]:
        return None
    dims = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, kwargs.get("dimension_numbers"))
    if (dims.lhs_spec, dims.rhs_spec, dims.out_spec) != ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2)):
        return None  # not NHWC / HWIO / NHWC
    if kwargs.get("feature_group_count", 1) != 1 or any(d != 1 for d in kwargs.get("lhs_dilation") or (1, 1)):
        return None
    if kwargs.get("preferred_element_type") is not None or kwargs.get("out_sharding") is not None:
        return None
    if isinstance(padding, str):
        dilation = tuple(kwargs.get("rhs_dilation") or (1, 1))
        window = tuple(d * (k - 1) + 1 for d, k in zip(dilation, rhs.shape[:2], strict=True))
        return tuple(jax.lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding))
    return tuple(tuple(p) for p in padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _chunked_conv(lhs: jax.Array, rhs: jax.Array, static: tuple) -> jax.Array:
    return _forward(lhs, rhs, static)


def _chunked_conv_fwd(lhs: jax.Array, rhs: jax.Array, static: tuple) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return _lax_conv(lhs, rhs, static), (lhs, rhs)


#: On CPU, the input gradient of a stride-1 NHWC convolution whose window has at
#: least this many taps, or whose channels are all at most
#: :data:`TAP_GRAD_MAX_CHANNELS`, is one matmul of the output gradient by the
#: kernel followed by a sum of the taps' shifted slices (one fused loop),
#: instead of XLA's transposed convolution. Measured on this project's 2-core
#: machine (Intel Xeon, 2026-12-03) at batch 128: LeNet-5's conv2 (5x5, 20 -> 50
#: on 12x12) 6.0 -> 2.8 ms, a 3x3 4 -> 4 conv on 28x28 2.6 -> 1.0 ms; for 3x3
#: windows with 8 or more channels XLA's was faster (16 -> 16 on 28x28: 2.7
#: against 16.9 ms), hence both thresholds.
TAP_GRAD_MIN_TAPS = 25
#: See :data:`TAP_GRAD_MIN_TAPS`.
TAP_GRAD_MAX_CHANNELS = 4


def _input_grad(lhs: jax.Array, rhs: jax.Array, static: tuple, g: jax.Array) -> jax.Array:
    """The gradient with respect to the input: lax's, or the matmul form where
    :data:`TAP_GRAD_MIN_TAPS` says so (the same sum in another order)."""
    pads = _nhwc_padding(lhs, rhs, static)
    strides, _, kwargs, _ = static
    kh, kw, cin, cout = rhs.shape
    plain = (
        pads is not None
        and tuple(strides) == (1, 1)
        and all(d == 1 for d in dict(kwargs).get("rhs_dilation") or (1, 1))
        and min(p for pair in pads for p in pair) >= 0
    )
    if not plain or (kh * kw < TAP_GRAD_MIN_TAPS and max(cin, cout) > TAP_GRAD_MAX_CHANNELS):
        _, vjp_lhs = jax.vjp(lambda x: _lax_conv(x, rhs, static), lhs)
        return vjp_lhs(g)[0]
    n, out_h, out_w, _ = g.shape
    (top, bottom), (left, right) = pads
    taps = (g.reshape(-1, cout) @ rhs.reshape(kh * kw * cin, cout).T).reshape(n, out_h, out_w, kh, kw, cin)
    padded = None  # the gradient of the padded input: each tap's products, shifted by the tap
    for i in range(kh):
        for j in range(kw):
            term = jnp.pad(taps[:, :, :, i, j, :], ((0, 0), (i, kh - 1 - i), (j, kw - 1 - j), (0, 0)))
            padded = term if padded is None else padded + term
    return padded[:, top : top + lhs.shape[1], left : left + lhs.shape[2], :].astype(lhs.dtype)


def _chunked_conv_bwd(static: tuple, res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    lhs, rhs = res
    d_lhs = _input_grad(lhs, rhs, static, g)
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


def size(value: Any) -> int | None:
    """``value`` as an int (Python's or NumPy's), or None for anything else (a float, a bool)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def checked_sizes(model: str, **given: Any) -> tuple[int, ...]:
    """The sizes ``given`` to ``model``'s constructor as ints, in order.

    Raises:
        UserError: one is not an integer >= 1 (all such are named).
    """
    from admmprune._errors import UserError

    sizes = {k: size(v) for k, v in given.items()}
    bad = [f"{k}={given[k]!r}" for k, v in sizes.items() if v is None or v < 1]
    if bad:
        raise UserError(f"{model} sizes must be integers >= 1, got {', '.join(bad)}")
    return tuple(sizes.values())
