r"""ADMM for one layer, and the least-squares refit on a fixed support.

In the normalized variables :math:`V = D W` with :math:`D = \operatorname{diag}(H)^{1/2}`
the problem is :math:`\min_{V \in S} \operatorname{tr}(V^\top \hat H V) - 2\operatorname{tr}(V^\top \hat G)`
with :math:`\hat H = D^{-1} H D^{-1}` (unit diagonal) and :math:`\hat G = D^{-1} G`.
Every set of :mod:`admmprune.core.sparsity` is a condition on the support,
which a positive scaling of the rows does not change, so :math:`V \in S`
exactly when :math:`W \in S`; the normalization makes :math:`\rho` scale-free
(it compares with eigenvalues of a unit-diagonal matrix) and makes the
Euclidean projection of :math:`V` rank weights by
:math:`|W_{ij}| \sqrt{H_{jj}}`, Wanda's score. Scaled-form ADMM on
:math:`\min f(V) + \iota_S(Z)` s.t. :math:`V = Z`:

.. math::
   Z &\leftarrow \Pi_{S}(V + U),\qquad U \leftarrow U + V - Z,\\
   V &\leftarrow (\hat H + \rho I)^{-1}\,(\hat G + \rho (Z - U)),

with the penalty :math:`\rho` taking a few growing values (stages), so that
:math:`V` and :math:`Z` meet. Writing :math:`\hat G = \hat H V_0 + R` (with
:math:`R = 0` when the target is the dense layer's own output),

.. math:: V \leftarrow V_0 + P_\rho\,\bigl(R + \rho (Z - U - V_0)\bigr),
          \qquad P_\rho = (\hat H + \rho I)^{-1},

one product per iteration, with :math:`P_\rho` formed once per stage. The
support of the last :math:`\Pi_S(V + U)` is then refit (:func:`refit`):
exactly for small layers, by a few conjugate gradients on a float32 residual
for large ones.

Why an inverse per stage and not one eigendecomposition: on a 4096 x 4096
layer on two CPU cores, ``eigh`` took 3.0 s, an LU inverse 0.75 s and a
product 0.5 s (0.12 s in bfloat16). Two stages cost two inverses, half an
eigendecomposition, and with an eigendecomposition every iteration at a new
:math:`\rho` would need two products (:math:`Q^\top x`, then :math:`Q y`)
instead of one. Two stages matched a per-iteration geometric schedule on the
test problems (relative error within 2 %), one stage was 5-25 % worse.

The defaults (6 iterations in 2 stages, :math:`\rho` = 0.2 then 0.6, no
gradual schedule, 3 conjugate gradients for a large layer's refit) were
measured on problems like the tests' (256 and 1024 wide): the error is
0.49-0.55 of SparseGPT's over unstructured 50-90 % and 2:4 (12 iterations:
0.51 at 1024, 30: 0.44 at 256), Boža's gradual schedule changed nothing, and
more conjugate gradients under 1 %. Each iteration costs about 0.35 s on a
4096 x 4096 layer on two cores, so that six keep ADMM within 3x of
SparseGPT's time there (``benchmarks/bench_layerwise.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from admmprune.core.layerwise._problem import as_matrix, check_problem, target
from admmprune.core.layerwise._select import check_spec, support
from admmprune.core.sparsity import NofM, Spec

#: Refits whose exact solve needs at most this many matrix entries
#: (``d_out * d_in**2``) are solved exactly; larger ones by conjugate gradients.
EXACT_REFIT_MAX = 1 << 24
#: Conjugate-gradient iterations of the refit of a large layer inside :func:`admm`.
REFIT_CG_ITERATIONS = 3


def normalize(h: jax.Array, g: jax.Array | None) -> tuple[jax.Array, jax.Array | None, jax.Array]:
    r"""``(H_hat, G_hat, d)``: :math:`H` and :math:`G` in the variables :math:`V = \operatorname{diag}(d) W`.

    :math:`d = \sqrt{\operatorname{diag} H}`. A dead input (zero diagonal,
    so a zero row and column of :math:`H`) gets :math:`d = 1` and a unit
    diagonal in :math:`\hat H`: its weight changes no output, and the unit
    diagonal only makes the problem definite by preferring it zero.
    """
    diag = jnp.diagonal(h)
    dead = diag <= 0
    d = jnp.where(dead, 1.0, jnp.sqrt(jnp.where(dead, 1.0, diag)))
    hn = h / d[:, None] / d[None, :] + jnp.diag(dead.astype(h.dtype))
    return hn, None if g is None else g / d[:, None], d


def _product(a: jax.Array, dtype: Any) -> Callable[[jax.Array], jax.Array]:
    """``x -> a @ x`` with both operands in ``dtype``, accumulated in float32."""
    a = a.astype(dtype)
    return lambda x: jnp.dot(a, x.astype(dtype), preferred_element_type=jnp.float32)


def _cg(h: jax.Array, r: jax.Array, mask: jax.Array, iterations: int, dtype=jnp.float32) -> jax.Array:
    """``iterations`` steps of conjugate gradients on every column's ``H_SS x_S = r_S`` at once, from 0."""
    m = mask.astype(jnp.float32)
    mul = _product(h, dtype)
    r = r * m

    def step(_, carry):
        x, r, p, rr = carry
        hp = m * mul(p)
        php = jnp.sum(p * hp, axis=0)
        alpha = jnp.where(php > 0, rr / jnp.where(php > 0, php, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * hp
        rr_new = jnp.sum(r * r, axis=0)
        beta = jnp.where(rr > 0, rr_new / jnp.where(rr > 0, rr, 1.0), 0.0)
        return x, r, r + beta * p, rr_new

    x, *_ = jax.lax.fori_loop(0, iterations, step, (jnp.zeros_like(r), r, r, jnp.sum(r * r, axis=0)))
    return x * m


def _exact(h: jax.Array, g: jax.Array, mask: jax.Array) -> jax.Array:
    """Every column's ``H_SS v_S = g_S`` by a Cholesky factorization, one column after another.

    Not ``vmap``: jaxlib's batched CPU Cholesky waits inside XLA's intra-op
    thread pool for work it queued on that same pool, and deadlocks when
    several devices of one process (sharded outputs) run it at once with no
    thread left over (seen with jax 0.10 on 2 cores, 2 to 8 host devices).
    """

    def column(args):
        m, b = args
        a = h * (m[:, None] * m[None, :]) + jnp.diag(1.0 - m)  # H_SS, and the identity off the support
        return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(a), True), m * b) * m

    return jax.lax.map(column, (mask.astype(h.dtype).T, g.T)).T


@functools.partial(jax.jit, static_argnames=("iterations",))
def refit(
    h: ArrayLike,
    g: ArrayLike,
    mask: ArrayLike,
    *,
    iterations: int | None = None,
    w_init: ArrayLike | None = None,
) -> jax.Array:
    r"""The least-squares kernel on a fixed support.

    .. math:: \arg\min_W \operatorname{tr}(W^\top H W) - 2\operatorname{tr}(W^\top G)
              \ \text{s.t.}\ W_{ij} = 0 \text{ where mask}_{ij} = 0

    The columns (outputs) are independent: column :math:`c` with support
    :math:`S` solves :math:`H_{SS} w_S = g_S`.

    Args:
      h: :math:`X^\top X`, ``(d_in, d_in)``, positive definite on every
        column's support (:func:`~admmprune.core.layerwise.damp` it if it is singular).
      g: :math:`X^\top Y`, ``(d_in, d_out)`` or shaped like ``mask``.
      mask: the support, a boolean kernel ``(..., d_out)``.
      iterations: ``None``: exact, one Cholesky factorization per column,
        one column after another (for small layers); an int: that many
        iterations of conjugate gradients, preconditioned by
        :math:`\operatorname{diag}(H)`, on all columns at once (one
        ``(d_in, d_in) x (d_in, d_out)`` product each), from ``w_init``.
      w_init: the conjugate gradients' starting point (zeros if ``None``).

    Returns:
      A float32 kernel shaped like ``mask``, exactly zero off the support.

    Raises:
      ValueError: if the shapes disagree.
    """
    mask = jnp.asarray(mask)
    check_problem(h, mask, g)
    h = jnp.asarray(h, jnp.float32)
    hn, gn, d = normalize(h, target(h, mask, g))
    m = as_matrix(mask) > 0
    if iterations is None:
        v = _exact(hn, gn, m)
    else:
        v = jnp.zeros(m.shape, jnp.float32) if w_init is None else jnp.where(m, as_matrix(w_init) * d[:, None], 0.0)
        v = v + _cg(hn, gn - hn @ v, m, iterations)
    return (v / d[:, None]).reshape(mask.shape)


def _keep_at(t, keep_ratio, gradual: int):
    """Boža's cubic schedule: the keep ratio falls from 1 to ``keep_ratio`` over ``gradual`` iterations."""
    if gradual <= 0:
        return keep_ratio
    frac = jnp.minimum((t + 1) / gradual, 1.0)
    return keep_ratio + (1.0 - keep_ratio) * (1.0 - frac) ** 3


@functools.partial(
    jax.jit, static_argnames=("spec", "iterations", "stages", "gradual", "refit_iterations", "matmul_dtype")
)
def admm(
    h: ArrayLike,
    w0: ArrayLike,
    spec: Spec,
    keep_ratio: ArrayLike = 1.0,
    *,
    g: ArrayLike | None = None,
    iterations: int = 6,
    stages: int = 2,
    rho: ArrayLike = 0.2,
    rho_growth: ArrayLike = 3.0,
    gradual: int = 0,
    refit_iterations: int | None = -1,
    matmul_dtype: Any = jnp.bfloat16,
) -> jax.Array:
    r"""Prunes one layer by ADMM on :math:`\min_{W \in S} \|XW - Y\|_F^2`.

    See the module docstring for the iteration. The result lies exactly in
    the set: its support is a projection's, and the refit keeps it.

    Args:
      h: :math:`X^\top X`, ``(d_in, d_in)`` (float32 sums from
        :func:`~admmprune.core.layerwise.accumulate`; any positive scale). It is used as given: if it is
        singular, the refit needs :func:`~admmprune.core.layerwise.damp` ``(h)``.
      w0: the dense kernel ``(..., d_out)``; the starting point, and the
        target :math:`G = H W_0` when ``g`` is ``None``.
      spec: the set, a spec of :mod:`admmprune.core.sparsity` applied to the
        kernel in its own shape (``Unstructured()``, ``NofM(2, 4)``,
        ``Channel()``, ...).
      keep_ratio: the fraction of the spec's groups kept (may be traced;
        unused by ``NofM``).
      g: :math:`X^\top Y`, ``(d_in, d_out)`` or shaped like ``w0``, when the
        target is not the dense layer's output on the same inputs.
      iterations: ADMM iterations (each: one ``(d_in, d_in) x (d_in,
        d_out)`` product and one projection).
      stages: the penalty takes ``stages`` values, ``rho * rho_growth**s``,
        over equal runs of iterations; each costs one ``(d_in, d_in)``
        inverse.
      rho: the first penalty, relative to the unit diagonal of the normalized
        :math:`H`.
      rho_growth: the penalty's factor from one stage to the next.
      gradual: iterations over which the keep ratio falls from 1 to
        ``keep_ratio`` on a cubic schedule (Boža, 2024); 0: the target ratio
        from the start. Ignored by ``NofM``, whose set has no ratio.
      refit_iterations: the refit on the final support: ``-1`` chooses (exact
        when ``d_out * d_in**2 <= EXACT_REFIT_MAX``, else
        ``REFIT_CG_ITERATIONS`` conjugate gradients); ``None``: exact; ``0``:
        none (the projection's values); ``n > 0``: ``n`` conjugate gradients
        on the correction, from a float32 residual.
      matmul_dtype: the operands' dtype in the iterations' products and the
        conjugate gradients (accumulated in float32; the refit's residual is
        float32). ``bfloat16`` is four times faster where the hardware
        multiplies it natively (accelerators, CPUs with AMX: 0.12 s against
        0.5 s for a 4096 x 4096 product on two cores) and changed the error by
        under 0.5 % on the tests' problems. A float32 sum that another split
        of the outputs adds in another order can round to the neighbouring
        bfloat16, so sharded runs swap more weights at the threshold than
        with ``float32`` (see the package docstring), at the same error.

    Returns:
      The pruned kernel, shaped like ``w0`` and of its dtype.

    Raises:
      ValueError: if the shapes disagree or the spec does not fit the kernel.

    References:
      Boža, "Fast and Effective Weight Update for Pruned Large Language
      Models", TMLR 2024 (arXiv:2401.02938).
      Meng et al., "ALPS: Improved Optimization for Highly Sparse One-Shot
      Pruning for Large Language Models", NeurIPS 2024 (arXiv:2406.07831).
    """
    w0 = jnp.asarray(w0)
    d_in, d_out = check_problem(h, w0, g)
    check_spec(spec, w0.shape)
    if stages < 1 or iterations < 0 or (refit_iterations is not None and refit_iterations < -1):
        raise ValueError(
            f"admm needs stages >= 1, iterations >= 0 and refit_iterations None or >= -1, "
            f"got {stages}, {iterations} and {refit_iterations}"
        )
    shape = w0.shape
    h = jnp.asarray(h, jnp.float32)
    hn, gn, d = normalize(h, None if g is None else target(h, w0, g))
    v0 = as_matrix(w0) * d[:, None]
    # G_hat = H_hat V0 + R, and R = 0 when the target is the dense layer's output.
    rg = None if gn is None else gn - hn @ v0
    gradual = 0 if isinstance(spec, NofM) else gradual

    def project(x, keep):
        mask = support(x.reshape(shape), spec, keep).reshape(x.shape)
        return mask, jnp.where(mask, x, 0.0)

    v, u = v0, jnp.zeros_like(v0)
    bounds = [s * iterations // stages for s in range(stages + 1)]
    for s in range(stages):
        if bounds[s] == bounds[s + 1]:
            continue
        r = jnp.asarray(rho, jnp.float32) * jnp.asarray(rho_growth, jnp.float32) ** s
        # (H_hat + r I)^{-1} (G_hat + r (Z - U)) = V0 + P (R + r (Z - U - V0)): one product per iteration.
        solve = _product(jnp.linalg.inv(hn + r * jnp.eye(d_in, dtype=jnp.float32)), matmul_dtype)

        def step(t, carry, r=r, solve=solve):
            v, u = carry
            _, z = project(v + u, _keep_at(t, keep_ratio, gradual))
            u = u + v - z
            c = r * (z - u - v0)
            return v0 + solve(c if rg is None else c + rg), u

        v, u = jax.lax.fori_loop(bounds[s], bounds[s + 1], step, (v, u))

    mask, z = project(v + u, keep_ratio)
    if refit_iterations == -1:
        refit_iterations = None if d_out * d_in * d_in <= EXACT_REFIT_MAX else REFIT_CG_ITERATIONS
    if refit_iterations is None:
        z = _exact(hn, hn @ v0 if rg is None else gn, mask)
    elif refit_iterations > 0:
        residual = hn @ (v0 - z) if rg is None else rg + hn @ (v0 - z)
        z = z + _cg(hn, residual, mask, refit_iterations, matmul_dtype)
    w = jnp.where(mask, z / d[:, None], 0.0)
    return w.reshape(shape).astype(w0.dtype)
