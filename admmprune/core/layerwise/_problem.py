r"""The layer-wise reconstruction problem: Gram matrices, shapes, objective.

A layer computes :math:`y = x W` with a Flax kernel ``W`` of shape
``(..., d_out)``; its leading axes flatten, in C order, into
:math:`d_\mathrm{in}` inputs. With calibration inputs :math:`X`
(:math:`n \times d_\mathrm{in}`) and targets :math:`Y` the problem is

.. math:: \min_{W \in S} \|X W - Y\|_F^2
          = \operatorname{tr}(W^\top H W) - 2\operatorname{tr}(W^\top G)
          + \|Y\|_F^2,\qquad H = X^\top X,\ G = X^\top Y,

so only :math:`H` (:math:`d_\mathrm{in} \times d_\mathrm{in}`) and
:math:`G` (:math:`d_\mathrm{in} \times d_\mathrm{out}`) are kept, summed over
calibration batches in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike


class GramState(NamedTuple):
    """Running sums over calibration batches (see :func:`accumulate`).

    Attributes:
      h: :math:`X^\\top X`, float32 ``(d_in, d_in)``.
      g: :math:`X^\\top Y`, float32 ``(d_in, d_out)``, or ``None`` when no
        targets are accumulated (then :math:`G = H W_0`).
      count: the number of rows of :math:`X` seen (int32).
    """

    h: jax.Array
    g: jax.Array | None
    count: jax.Array


def init_gram(d_in: int, d_out: int | None = None) -> GramState:
    """Zero sums for a layer with ``d_in`` inputs (and ``d_out`` targets if given)."""
    g = None if d_out is None else jnp.zeros((d_in, d_out), jnp.float32)
    return GramState(jnp.zeros((d_in, d_in), jnp.float32), g, jnp.zeros((), jnp.int32))


def _rows(x: ArrayLike, width: int, what: str) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != width:
        raise ValueError(f"{what} must have shape (..., {width}), got {x.shape}")
    return x.reshape(-1, width).astype(jnp.float32)


def accumulate(state: GramState, x: ArrayLike, y: ArrayLike | None = None) -> GramState:
    """Adds one calibration batch to the sums.

    Args:
      state: the sums so far (:func:`init_gram`).
      x: the layer's inputs, ``(..., d_in)``; every leading axis (batch,
        sequence, spatial positions) is a row. For a convolution, pass its
        patches (:func:`conv_patches`).
      y: the targets, ``(..., d_out)`` with the same leading axes; required
        exactly when ``state.g`` is not ``None``.

    Returns:
      The new :class:`GramState`.

    Raises:
      ValueError: if the widths disagree with the state's, or ``y`` is
        missing or unexpected.
    """
    d_in = state.h.shape[0]
    x2 = _rows(x, d_in, "x")
    h = state.h + x2.T @ x2
    g = state.g
    if (g is None) != (y is None):
        raise ValueError("y must be given exactly when the state accumulates X^T Y (init_gram with d_out)")
    if g is not None:
        y2 = _rows(y, g.shape[1], "y")
        if y2.shape[0] != x2.shape[0]:
            raise ValueError(f"x and y must have the same rows, got {jnp.shape(x)} and {jnp.shape(y)}")
        g = g + x2.T @ y2
    return GramState(h, g, state.count + x2.shape[0])


def gram(x: ArrayLike) -> jax.Array:
    """:math:`X^\\top X` of inputs ``x`` of shape ``(..., d_in)``, in float32."""
    x2 = _rows(x, jnp.shape(x)[-1], "x")
    return x2.T @ x2


def conv_patches(
    x: ArrayLike,
    window: Sequence[int],
    *,
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "SAME",
) -> jax.Array:
    """The patches of a channels-last convolution, flattened like its kernel.

    For ``x`` of shape ``(N, *spatial, C)`` and a kernel ``(*window, C,
    d_out)``, returns ``p`` of shape ``(N, *out_spatial, prod(window) * C)``
    with ``p @ kernel.reshape(-1, d_out)`` equal to the convolution
    (``lax.conv_general_dilated`` with the same strides and padding, no
    dilation, one feature group): the features run over the window and then
    the channels, in the kernel's C order.
    """
    x = jnp.asarray(x)
    nd = len(window)
    if x.ndim != nd + 2:
        raise ValueError(f"x must have shape (N, *spatial, C) with {nd} spatial axes, got {x.shape}")
    strides = (1,) * nd if strides is None else tuple(strides)
    spatial = "".join("HWD"[:nd])
    dims = jax.lax.conv_dimension_numbers(
        x.shape, (*window, x.shape[-1], 1), (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
    )
    p = jax.lax.conv_general_dilated_patches(x, tuple(window), strides, padding, dimension_numbers=dims)
    # conv_general_dilated_patches orders the features (C, *window); the kernel's order is (*window, C).
    c = x.shape[-1]
    p = p.reshape(p.shape[:-1] + (c, math.prod(window)))
    return jnp.swapaxes(p, -1, -2).reshape(p.shape[:-2] + (math.prod(window) * c,))


def damp(h: ArrayLike, fraction: ArrayLike = 0.01) -> jax.Array:
    """``h`` plus ``fraction * mean(diag(h))`` on its diagonal (SparseGPT's ``percdamp``).

    Makes a singular :math:`H` (fewer calibration rows than inputs, dead
    inputs) positive definite at a cost that does not depend on its scale.
    """
    h = jnp.asarray(h, jnp.float32)
    diag = jnp.diagonal(h)
    return h + jnp.diag(jnp.full_like(diag, jnp.asarray(fraction, jnp.float32) * jnp.mean(diag)))


# --- shapes ------------------------------------------------------------------------------


def kernel_dims(shape: Sequence[int]) -> tuple[int, int]:
    """``(d_in, d_out)`` of a Flax kernel of ``shape``: the leading axes flatten into ``d_in``."""
    if len(shape) < 2:
        raise ValueError(f"a kernel needs at least 2 axes (..., d_out), got shape {tuple(shape)}")
    return math.prod(shape[:-1]), shape[-1]


def check_problem(h: ArrayLike, w0: ArrayLike, g: ArrayLike | None = None) -> tuple[int, int]:
    """Raises ``ValueError`` unless ``h``, ``w0`` (and ``g``) fit one layer; returns ``(d_in, d_out)``.

    ``h`` is ``(d_in, d_in)``; ``g`` is ``(d_in, d_out)`` or shaped like ``w0``.
    """
    w_shape = tuple(jnp.shape(w0))
    d_in, d_out = kernel_dims(w_shape)
    h_shape = tuple(jnp.shape(h))
    if h_shape != (d_in, d_in):
        raise ValueError(
            f"h must be ({d_in}, {d_in}) for a kernel of shape {w_shape} (d_in = {d_in} inputs), got {h_shape}"
        )
    if g is not None:
        g_shape = tuple(jnp.shape(g))
        if g_shape not in ((d_in, d_out), w_shape):
            raise ValueError(f"g must be ({d_in}, {d_out}) or {w_shape} for a kernel of shape {w_shape}, got {g_shape}")
    return d_in, d_out


def as_matrix(w: ArrayLike) -> jax.Array:
    """A kernel ``(..., d_out)`` viewed as the ``(d_in, d_out)`` matrix of :math:`y = x W`, in float32."""
    w = jnp.asarray(w)
    return w.reshape(kernel_dims(w.shape)).astype(jnp.float32)


def target(h: jax.Array, w0: jax.Array, g: ArrayLike | None) -> jax.Array:
    """:math:`G` as a ``(d_in, d_out)`` float32 matrix: ``g``, or :math:`H W_0` when ``g`` is ``None``."""
    if g is None:
        return h @ as_matrix(w0)
    g = jnp.asarray(g, jnp.float32)
    return g.reshape(h.shape[0], -1)


# --- objective ---------------------------------------------------------------------------


def objective(w: ArrayLike, h: ArrayLike, g: ArrayLike) -> jax.Array:
    r""":math:`\operatorname{tr}(W^\top H W) - 2\operatorname{tr}(W^\top G)`:
    :math:`\|XW - Y\|_F^2` less the constant :math:`\|Y\|_F^2`.

    Args:
      w: a kernel ``(..., d_out)``.
      h: :math:`X^\top X`, ``(d_in, d_in)``.
      g: :math:`X^\top Y`, ``(d_in, d_out)`` or shaped like ``w``.
    """
    check_problem(h, w, g)
    w2 = as_matrix(w)
    h = jnp.asarray(h, jnp.float32)
    g2 = jnp.asarray(g, jnp.float32).reshape(w2.shape)
    return jnp.sum(w2 * (h @ w2)) - 2.0 * jnp.sum(w2 * g2)


def reconstruction_error(w: ArrayLike, w0: ArrayLike, h: ArrayLike) -> jax.Array:
    r"""Relative error of the layer's output: :math:`\|X(W - W_0)\|_F^2 / \|X W_0\|_F^2`.

    .. math:: \frac{\operatorname{tr}((W - W_0)^\top H (W - W_0))}
                   {\operatorname{tr}(W_0^\top H W_0)}
    """
    check_problem(h, w0)
    if jnp.shape(w) != jnp.shape(w0):
        raise ValueError(f"w and w0 must have the same shape, got {jnp.shape(w)} and {jnp.shape(w0)}")
    h = jnp.asarray(h, jnp.float32)
    w0 = as_matrix(w0)
    d = as_matrix(w) - w0
    return jnp.sum(d * (h @ d)) / jnp.sum(w0 * (h @ w0))
