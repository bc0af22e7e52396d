r"""Baselines for one layer: magnitude, Wanda and SparseGPT.

All take the dense kernel ``w0`` in Flax layout ``(..., d_out)`` and return a
kernel of its shape and dtype that lies exactly in the set of ``spec`` at
``keep_ratio``. Magnitude and Wanda only choose a support; SparseGPT also
updates the kept weights.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from admmprune.core.layerwise._problem import as_matrix, check_problem, damp, kernel_dims
from admmprune.core.layerwise._select import check_spec, nofm_mask, support, topk_mask
from admmprune.core.projections import num_kept
from admmprune.core.sparsity import NofM, Spec, Unstructured


def _keep(w0: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask.reshape(w0.shape), w0, jnp.zeros((), w0.dtype))


@functools.partial(jax.jit, static_argnames=("spec",))
def magnitude(w0: ArrayLike, spec: Spec, keep_ratio: ArrayLike = 1.0) -> jax.Array:
    r"""The Euclidean projection of ``w0`` onto the set: the largest weights (or groups) kept, no update.

    Equal to :func:`admmprune.core.projections.project`.
    """
    w0 = jnp.asarray(w0)
    kernel_dims(w0.shape)
    check_spec(spec, w0.shape)
    return _keep(w0, support(w0, spec, keep_ratio))


@functools.partial(jax.jit, static_argnames=("spec", "per_output"))
def wanda(
    w0: ArrayLike,
    h: ArrayLike,
    spec: Spec,
    keep_ratio: ArrayLike = 1.0,
    *,
    per_output: bool = True,
) -> jax.Array:
    r"""Wanda: keeps the weights of largest :math:`|W_{ij}|\,\|X_j\|_2`, no update.

    :math:`\|X_j\|_2^2 = H_{jj}`, the undamped diagonal. The scores are those
    of the Euclidean projection of :math:`\operatorname{diag}(H)^{1/2} W`, so
    every spec works (a channel's score is :math:`H_{jj}\|W_{j\cdot}\|^2`).

    Args:
      w0: the dense kernel ``(..., d_out)``.
      h: :math:`X^\top X` ``(d_in, d_in)``, or only its diagonal ``(d_in,)``.
      spec: the set (a spec of :mod:`admmprune.core.sparsity`).
      keep_ratio: the fraction of the spec's groups kept.
      per_output: for ``Unstructured``, compare scores within each output
        (each column of the kernel: the same count, up to one, in every
        column, as in the paper) rather than over the whole layer. Other
        specs ignore it.

    Returns:
      The pruned kernel, shaped like ``w0``.

    Raises:
      ValueError: if ``h`` does not fit ``w0``.

    References:
      Sun et al., "A Simple and Effective Pruning Approach for Large Language
      Models", ICLR 2024 (arXiv:2306.11695).
    """
    w0 = jnp.asarray(w0)
    d_in, d_out = kernel_dims(w0.shape)
    h = jnp.asarray(h, jnp.float32)
    if h.shape == (d_in, d_in):
        h = jnp.diagonal(h)
    elif h.shape != (d_in,):
        raise ValueError(f"h must be ({d_in}, {d_in}) or ({d_in},) for a kernel of shape {w0.shape}, got {h.shape}")
    check_spec(spec, w0.shape)
    v = as_matrix(w0) * jnp.sqrt(jnp.maximum(h, 0.0))[:, None]
    if isinstance(spec, Unstructured) and per_output:
        k = num_kept(d_in * d_out, keep_ratio)
        # k split over the columns; the first k mod d_out columns keep one more, so that the total is k.
        per_column = k // d_out + (jnp.arange(d_out) < k % d_out).astype(k.dtype)
        mask = topk_mask(v, per_column[None, :], axis=0)
    else:
        mask = support(v.reshape(w0.shape), spec, keep_ratio)
    return _keep(w0, mask)


def _inverse_cholesky(h: jax.Array) -> jax.Array:
    r"""The upper-triangular :math:`U` with :math:`H^{-1} = U^\top U`.

    With :math:`J` the reversal, :math:`J H J = L L^\top` gives
    :math:`U = J L^{-1} J`: one factorization and one triangular inverse,
    instead of SparseGPT's factorization, inverse and second factorization.
    """
    n = h.shape[0]
    lower = jnp.linalg.cholesky(h[::-1, ::-1])
    inv = jax.scipy.linalg.solve_triangular(lower, jnp.eye(n, dtype=h.dtype), lower=True)
    return jnp.triu(inv[::-1, ::-1])


def _check_sparsegpt(spec: Spec, shape: tuple[int, ...], block_size: int) -> None:
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if isinstance(spec, NofM):
        if spec.axis % len(shape) != len(shape) - 2:
            raise ValueError(f"sparsegpt: {spec!r} must run along the input axis (-2) of a kernel of shape {shape}")
        if len(shape) > 2 and shape[-2] % spec.m:
            raise ValueError(
                f"sparsegpt: {spec!r} on a kernel of shape {shape} needs m to divide the {shape[-2]} input channels"
            )
        if block_size % spec.m:
            raise ValueError(f"sparsegpt: block_size {block_size} must be a multiple of m = {spec.m}")
    elif not isinstance(spec, Unstructured):
        raise ValueError(f"sparsegpt supports Unstructured and NofM specs, got {spec!r}")


@functools.partial(jax.jit, static_argnames=("spec", "block_size"))
def sparsegpt(
    h: ArrayLike,
    w0: ArrayLike,
    spec: Spec,
    keep_ratio: ArrayLike = 1.0,
    *,
    block_size: int = 128,
    damping: ArrayLike = 0.01,
) -> jax.Array:
    r"""SparseGPT: greedy optimal-brain-surgeon pruning, one input at a time.

    The inputs (rows of the Flax kernel) are visited in order. Input :math:`i`
    keeps its selected weights and drops the others; the error
    :math:`e = (w_i - q_i) / U_{ii}` of the drop is compensated on the later
    inputs, :math:`W_{j\cdot} \mathrel{-}= U_{ij}\, e` for :math:`j > i`, with
    :math:`U` the upper Cholesky factor of :math:`(H + \delta I)^{-1}`. The
    updates are lazy: rank one inside a block of ``block_size`` inputs, one
    matrix product for the later inputs after each block. ``Unstructured``
    selects, at the start of each block, the weights of largest
    :math:`w^2 / U_{ii}^2` among the block's (the block's share of the
    layer's count, so that the total is exact); ``NofM`` selects ``n`` of
    every ``m`` inputs when the loop reaches them.

    Args:
      h: :math:`X^\top X`, ``(d_in, d_in)``, undamped.
      w0: the dense kernel ``(..., d_out)``.
      spec: ``Unstructured()``, or ``NofM(n, m)`` on the input axis (-2;
        ``m`` must divide a conv kernel's input channels and ``block_size``).
      keep_ratio: the fraction of weights kept (unused by ``NofM``).
      block_size: inputs per lazy block (need not divide ``d_in``).
      damping: :math:`\delta` as a fraction of :math:`H`'s mean diagonal
        (the paper's ``percdamp``).

    Returns:
      The pruned and updated kernel, shaped like ``w0`` and of its dtype.

    Raises:
      ValueError: if the shapes disagree, or the spec is not supported.

    References:
      Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be
      Accurately Pruned in One-Shot", ICML 2023 (arXiv:2301.00774).
    """
    w0 = jnp.asarray(w0)
    d_in, d_out = check_problem(h, w0)
    check_spec(spec, w0.shape)
    _check_sparsegpt(spec, w0.shape, block_size)
    m = spec.m if isinstance(spec, NofM) else 1
    size = min(block_size, -(-d_in // m) * m)
    blocks = -(-d_in // size)
    rows = blocks * size

    h = jnp.asarray(h, jnp.float32)
    dead = jnp.diagonal(h) == 0
    h = damp(h + jnp.diag(dead.astype(jnp.float32)), damping)
    # Padding to whole blocks: identity rows of H and zero rows of W, which no update reaches.
    h = jnp.pad(h, ((0, rows - d_in), (0, rows - d_in))) + jnp.diag((jnp.arange(rows) >= d_in).astype(jnp.float32))
    u = _inverse_cholesky(h)
    w = jnp.pad(jnp.where(dead[:, None], 0.0, as_matrix(w0)), ((0, rows - d_in), (0, 0)))

    k = num_kept(d_in * d_out, keep_ratio)

    def kept_before(r):
        """The layer's count shared over its inputs: exact integers, summing to k at r = d_in."""
        r = jnp.minimum(r, d_in)
        return (k // d_in) * r + ((k % d_in) * r) // d_in

    def block(b, w):
        start = b * size
        w1 = jax.lax.dynamic_slice(w, (start, 0), (size, d_out))
        u1 = jax.lax.dynamic_slice(u, (start, start), (size, size))
        diag = jnp.diagonal(u1)
        if isinstance(spec, NofM):
            keep1 = jnp.zeros(w1.shape, bool)
        else:
            keep1 = topk_mask(w1 / diag[:, None], kept_before(start + size) - kept_before(start))

        def select(i, w1, keep1):
            rows_i = jax.lax.dynamic_slice(w1, (i, 0), (m, d_out)) / jax.lax.dynamic_slice(diag, (i,), (m,))[:, None]
            return jax.lax.dynamic_update_slice(keep1, nofm_mask(rows_i, NofM(spec.n, m, axis=0)), (i, 0))

        def row(i, carry):
            w1, keep1, q1, e1 = carry
            if isinstance(spec, NofM):
                keep1 = jax.lax.cond(i % m == 0, select, lambda i, w1, keep1: keep1, i, w1, keep1)
            wi = w1[i]
            qi = jnp.where(keep1[i], wi, 0.0)
            ei = (wi - qi) / u1[i, i]
            w1 = w1 - u1[i][:, None] * ei[None, :]  # u1[i, j] = 0 for j < i: only this and later inputs move
            return w1, keep1, q1.at[i].set(qi), e1.at[i].set(ei)

        zeros = jnp.zeros_like(w1)
        _, _, q1, e1 = jax.lax.fori_loop(0, size, row, (w1, keep1, zeros, zeros))
        # The later inputs' lazy update (earlier rows of u's block rows are zero); the block's own rows become q1.
        w = w - jax.lax.dynamic_slice(u, (start, 0), (size, rows)).T @ e1
        return jax.lax.dynamic_update_slice(w, q1, (start, 0))

    w = jax.lax.fori_loop(0, blocks, block, w)
    return w[:d_in].reshape(w0.shape).astype(w0.dtype)
