"""Support selection for the layer-wise solvers: the masks of the projections.

:func:`support` is :func:`admmprune.core.projections.projection_mask`, with
the same result bit for bit (ties to the lower index), but two of its cases
are computed without a sort, because the solvers select a support on every
iteration of large layers, where ``projection_mask`` sorts every weight:

- ``Unstructured``: the ``k``-th largest score is found on the bits of the
  float32 scores (non-negative floats order like their bit patterns read as
  integers) by two histogram passes, instead of an argsort of every weight
  (on a 4096 x 4096 kernel on two CPU cores: 0.12 s instead of 6 s);
- ``NofM`` with ``m <= 8``: a weight's rank in its block is the number of
  block mates that beat it, ``m`` comparisons each (instead of two argsorts
  over blocks of ``m``).

Every other spec goes to ``projection_mask`` itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from admmprune.core.projections import num_kept, projection_mask
from admmprune.core.sparsity import Coupled, NofM, Spec, Unstructured, validate

#: The largest ``m`` whose N:M ranks are counted by comparisons (memory grows as ``m``).
_NOFM_COMPARE_MAX = 8


def check_spec(spec: Spec, shape: tuple[int, ...]) -> None:
    """Raises ``ValueError`` unless ``spec`` is one set that fits a kernel of ``shape``."""
    if isinstance(spec, Coupled):
        raise ValueError(f"{spec!r}: a layer-wise solver takes one set, not a Coupled spec")
    validate(spec, shape, "kernel")


def _kth_largest_bits(bits: jax.Array, k: jax.Array) -> jax.Array:
    """The ``k``-th largest of non-negative int32 ``bits`` (flat), by two histogram passes.

    The high 15 bits first: the bin that holds the ``k``-th largest, and how
    many lie in the bins above it; then the low 16 bits of that bin's members.
    """
    hi = jnp.right_shift(bits, 16)
    at_or_above = jnp.cumsum(jnp.bincount(hi, length=1 << 15)[::-1])[::-1]
    b = jnp.sum(at_or_above >= k, dtype=jnp.int32) - 1
    above = jnp.concatenate([at_or_above, jnp.zeros(1, at_or_above.dtype)])[b + 1]
    lo = jnp.where(hi == b, jnp.bitwise_and(bits, 0xFFFF), 1 << 16)
    lo_at_or_above = jnp.cumsum(jnp.bincount(lo, length=(1 << 16) + 1)[: 1 << 16][::-1])[::-1]
    low = jnp.sum(above + lo_at_or_above >= k, dtype=jnp.int32) - 1
    return jnp.left_shift(b, 16) | low


def _kth_largest_bits_along(bits: jax.Array, k: jax.Array, axis: int) -> jax.Array:
    """The ``k``-th largest along ``axis`` (kept, size 1): the largest ``t`` with
    ``count(bits >= t) >= k``, built from the top bit down in 31 counting passes."""

    def step(i, t):
        cand = t | jnp.left_shift(jnp.int32(1), 30 - i)
        return jnp.where(jnp.sum(bits >= cand, axis=axis, keepdims=True, dtype=jnp.int32) >= k, cand, t)

    shape = bits.shape[:axis] + (1,) + bits.shape[axis + 1 :]
    return jax.lax.fori_loop(0, 31, step, jnp.zeros(shape, jnp.int32))


def topk_mask(scores: ArrayLike, k: ArrayLike, *, axis: int | None = None) -> jax.Array:
    """Boolean mask of the ``k`` largest non-negative ``scores``, ties to the lower index.

    Non-negative float32 numbers order like their bit patterns read as
    int32, so the ``k``-th largest is found on the integers, without a sort.

    Args:
      scores: non-negative float scores (their absolute values are used).
      k: how many to keep (may be traced); with ``axis``, an int per slice
        (broadcastable to the shape with ``axis`` of size 1).
      axis: ``None``: the ``k`` largest of the whole array (ties to the
        lower C-order index); an axis: the ``k`` largest of every slice along
        it (ties to the lower position along it).

    Returns:
      A boolean array shaped like ``scores``.
    """
    bits = jax.lax.bitcast_convert_type(jnp.abs(jnp.asarray(scores, jnp.float32)), jnp.int32)
    k = jnp.asarray(k, jnp.int32)
    if axis is None:
        t = _kth_largest_bits(bits.reshape(-1), k)
    else:
        axis = axis % bits.ndim
        t = _kth_largest_bits_along(bits, k, axis)

    def count(x):
        return jnp.sum(x, axis=axis, keepdims=axis is not None, dtype=jnp.int32)

    above = bits > t
    tied = bits == t
    room = k - count(above)

    def break_ties():
        flat = tied if axis is not None else tied.reshape(-1)
        order = jnp.cumsum(flat, axis=0 if axis is None else axis, dtype=jnp.int32).reshape(tied.shape)
        return above | (tied & (order <= room))

    return jax.lax.cond(jnp.all(count(tied) <= room), lambda: above | tied, break_ties)


def nofm_mask(x: ArrayLike, spec: NofM) -> jax.Array:
    """The ``n`` largest ``|x|`` in every block of ``m`` along ``spec.axis``, ties to the lower index."""
    x = jnp.asarray(x)
    axis = spec.axis % x.ndim
    a = jnp.moveaxis(jnp.abs(x).astype(jnp.float32), axis, 0)
    length, m = a.shape[0], spec.m
    blocks = -(-length // m)
    a = jnp.pad(a, [(0, blocks * m - length)] + [(0, 0)] * (a.ndim - 1), constant_values=-2.0)
    a = a.reshape((blocks, m) + a.shape[1:])
    mine = a[:, :, None]
    other = a[:, None, :]
    before = (jnp.arange(m)[None, :] < jnp.arange(m)[:, None]).reshape((1, m, m) + (1,) * (a.ndim - 2))
    rank = jnp.sum((other > mine) | ((other == mine) & before), axis=2, dtype=jnp.int32)
    keep = (rank < spec.n).reshape((blocks * m,) + a.shape[2:])[:length]
    return jnp.moveaxis(keep, 0, axis)


def support(x: ArrayLike, spec: Spec, keep_ratio: ArrayLike = 1.0) -> jax.Array:
    """The mask of the Euclidean projection of ``x`` onto ``spec``'s set (``True`` = kept).

    Equal to ``projection_mask(x, spec, keep_ratio)``; see the module docstring.
    """
    x = jnp.asarray(x)
    if isinstance(spec, Unstructured):
        scores = x.astype(jnp.float32) ** 2  # the projection's scores (squares, which may underflow to ties)
        return topk_mask(scores, num_kept(x.size, keep_ratio))
    if isinstance(spec, NofM) and spec.m <= _NOFM_COMPARE_MAX:
        return nofm_mask(x, spec)
    return projection_mask(x, spec, keep_ratio)
