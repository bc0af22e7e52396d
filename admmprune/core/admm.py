r"""ADMM pruning as an optax gradient transformation (layer L2).

The problem :math:`\min_W f(W)\ \text{s.t.}\ W \in S` is split as
:math:`\min f(W) + g(Z)\ \text{s.t.}\ W = Z`, with :math:`g` the indicator of
the structured set :math:`S`. Scaled-form ADMM alternates

.. math::
   W &\leftarrow \arg\min_W f(W) + \tfrac{\rho}{2}\|W - Z + U\|_2^2
        \quad \text{(SGD steps)}\\
   Z &\leftarrow \Pi_S(W + U)\\
   U &\leftarrow U + W - Z

:func:`admm` supplies the first line as a gradient term,
:math:`\nabla f(W) + \rho (W - Z + U)`, and performs the other two inside the
same jitted step every ``interval`` steps. Chain it *before* the optimizer::

    tx = optax.chain(admmprune.admm(specs, rho=1e-3), optax.sgd(0.01, 0.9))

References:
  Zhang et al., "A Systematic DNN Weight Pruning Framework using Alternating
  Direction Method of Multipliers", ECCV 2018.
  Boyd et al., "Distributed Optimization and Statistical Learning via the
  Alternating Direction Method of Multipliers", 2011.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admmprune._types import Masks, Params, Scalars, Specs, is_none, per_leaf
from admmprune.core.projections import project_tree
from admmprune.core.schedules import RhoSchedule, constant_rho
from admmprune.core.sparsity import is_spec


class AdmmState(NamedTuple):
    """State of :func:`admm`; every tree has ``None`` for unpruned parameters.

    Attributes:
      count: steps taken so far (int32).
      rho: per-parameter penalty (float32 scalars).
      keep_ratio: per-parameter fraction of groups kept in this stage.
      z: the auxiliary variable, ``Z = Proj_S(W + U)`` at the last dual update.
      u: the scaled dual variable.
      mask: the support of the last projection (boolean).
      support: where non-zeros are allowed in this stage: groups removed in an
        earlier stage stay removed (boolean; all ``True`` in the first stage).
      primal_residual: ``||W - Z|| / ||W||`` at the latest step.
      dual_residual: ``rho ||Z - Z_prev|| / ||W||`` at the latest dual update.
    """

    count: jax.Array
    rho: Scalars
    keep_ratio: Scalars
    z: Params
    u: Params
    mask: Masks
    support: Masks
    primal_residual: Scalars
    dual_residual: Scalars


def _scalar_tree(value: Any, specs: Specs, name: str) -> Scalars:
    flat_specs, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    values = per_leaf(value, treedef, len(flat_specs))
    out = []
    for spec, v in zip(flat_specs, values, strict=True):
        if spec is None:
            out.append(None)
            continue
        if v is None:
            raise ValueError(f"{name} is None for a pruned parameter")
        out.append(jnp.asarray(v, jnp.float32))
    return treedef.unflatten(out)


def _map(fn, specs, *trees):
    """Maps ``fn`` over the pruned leaves; ``None`` where ``specs`` is ``None``."""
    return jax.tree.map(lambda s, *xs: None if s is None else fn(*xs), specs, *trees, is_leaf=is_spec)


def _norm(x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    return jnp.sqrt(jnp.sum(x * x))


def _relative(num: jax.Array, w: jax.Array) -> jax.Array:
    return num / jnp.maximum(_norm(w), jnp.finfo(jnp.float32).tiny)


def admm(
    specs: Specs,
    *,
    rho: float | Scalars = 1e-3,
    keep_ratio: float | Scalars = 1.0,
    interval: int = 100,
    rho_schedule: RhoSchedule | None = None,
    round_to: int = 1,
    projection: Callable[..., tuple[Params, Masks]] | None = None,
    penalty: str = "all",
) -> optax.GradientTransformationExtraArgs:
    """ADMM for ``min loss(W) s.t. W in S``, as a gradient transformation.

    Args:
      specs: a spec tree shaped like the params (``None`` = not pruned), e.g.
        from :func:`admmprune.core.sparsity.resolve`. Leaves sharing a ``group``
        name are projected jointly.
      rho: the penalty parameter: a scalar, or a tree of scalars shaped like
        ``specs`` for one rho per parameter.
      keep_ratio: fraction of groups kept (``1 - ratio``): a scalar or a tree.
        The default, 1, prunes nothing until :func:`set_stage` starts a
        stage: call it at the start of every stage, the first included.
      interval: the projection and dual update run every ``interval`` steps.
      rho_schedule: how rho moves at each dual update; see
        :mod:`admmprune.core.schedules`. Default: constant.
      round_to: keep a multiple of this many channels in every coupled group
        (8 suits GPU tensor cores, 128 TPU matrix units).
      projection: the Z-update's projection, called as
        ``projection(v, specs, keep_ratio, support=..., round_to=...)`` and
        returning ``(z, masks)`` like the default,
        :func:`admmprune.core.projections.project_tree`. For a set that is not
        a per-layer ratio, e.g. a MACs budget:
        ``admmprune.budget.projector(macs, budget)``.

    Returns:
      A transformation whose ``update`` needs ``params``. Its state is an
      :class:`AdmmState`.

    Raises:
      ValueError: at ``update`` time, if ``params`` is not given.
    """
    if interval < 1:
        raise ValueError(f"interval must be at least 1, got {interval}")
    if penalty not in ("all", "pruned"):
        raise ValueError(f"penalty must be 'all' or 'pruned', got {penalty!r}")
    schedule = rho_schedule or constant_rho()
    project = project_tree if projection is None else projection

    def init_fn(params: Params) -> AdmmState:
        rhos = _scalar_tree(rho, specs, "rho")
        ratios = _scalar_tree(keep_ratio, specs, "keep_ratio")
        z, mask = project(_map(lambda w: w, specs, params), specs, ratios, support=None, round_to=round_to)
        support = _map(lambda w: jnp.ones(w.shape, jnp.bool_), specs, params)
        return AdmmState(
            count=jnp.zeros((), jnp.int32),
            rho=rhos,
            keep_ratio=ratios,
            z=z,
            u=_map(jnp.zeros_like, specs, params),
            mask=mask,
            support=support,
            primal_residual=_map(lambda w, z: _relative(_norm(w - z), w), specs, params, z),
            dual_residual=_map(lambda r: jnp.zeros((), jnp.float32), specs, rhos),
        )

    def dual_update(params: Params, state: AdmmState) -> AdmmState:
        v = _map(jnp.add, specs, params, state.u)
        z, mask = project(v, specs, state.keep_ratio, support=state.support, round_to=round_to)
        u = _map(lambda u, w, z: u + w - z, specs, state.u, params, z)
        primal = _map(lambda w, z: _relative(_norm(w - z), w), specs, params, z)
        dual = _map(lambda r, w, z, z0: _relative(r * _norm(z - z0), w), specs, state.rho, params, z, state.z)
        new_rho = _map(schedule, specs, state.rho, primal, dual)
        # U is the dual variable divided by rho: rescale it when rho moves.
        u = _map(lambda u, r0, r1: u * (r0 / r1).astype(u.dtype), specs, u, state.rho, new_rho)
        return state._replace(rho=new_rho, z=z, u=u, mask=mask, dual_residual=dual)

    def update_fn(updates, state: AdmmState, params: Params | None = None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("admm needs the current parameters: call update(grads, state, params)")
        due = (state.count > 0) & (state.count % interval == 0)
        state = jax.lax.cond(due, dual_update, lambda p, s: s, params, state)

        def add_penalty(s, g, w, z, u, r, m):
            if s is None:
                return g
            pull = r.astype(w.dtype) * (w - z + u)
            if penalty == "pruned":
                pull = jnp.where(m, jnp.zeros_like(pull), pull)
            return g + pull.astype(g.dtype)

        updates = jax.tree.map(
            add_penalty, specs, updates, params, state.z, state.u, state.rho, state.mask, is_leaf=is_spec
        )
        primal = _map(lambda w, z: _relative(_norm(w - z), w), specs, params, state.z)
        return updates, state._replace(count=state.count + 1, primal_residual=primal)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_admm_state(x: Any) -> bool:
    return isinstance(x, AdmmState)


def find_state(opt_state: Any, kind: type = AdmmState) -> Any:
    """Returns the single state of type ``kind`` inside an optax chain's state.

    Args:
      opt_state: an optimizer state, e.g. of ``optax.chain(admm(...), ...)``.
      kind: the state type to look for: :class:`AdmmState` (default), or e.g.
        :class:`admmprune.MaskedState` to read the masks of retraining.

    Raises:
      ValueError: if there is not exactly one.
    """
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, kind)) if isinstance(s, kind)]
    if len(found) != 1:
        raise ValueError(f"expected one {kind.__name__} in the optimizer state, found {len(found)}")
    return found[0]


def set_stage(opt_state: Any, keep_ratio: float | Scalars, *, rho: float | Scalars | None = None) -> Any:
    """Moves ADMM to the next progressive stage by editing state values only.

    The new stage warm-starts from the current ``Z`` and ``U``; the groups the
    last projection removed stay removed (``support`` shrinks to ``mask``);
    every array keeps its shape and dtype, so the jitted step does not
    recompile. Runs on the host, between steps.

    Args:
      opt_state: the optimizer state that contains an :class:`AdmmState` (the
        whole chain's state is fine).
      keep_ratio: the new stage's fraction of groups kept, scalar or tree.
      rho: optionally reset rho (scalar or tree), rescaling ``U`` to match; by
        default rho carries on from the last stage.

    Returns:
      The optimizer state with the :class:`AdmmState` replaced.
    """

    def edit(s: Any) -> Any:
        if not _is_admm_state(s):
            return s
        specs_like = s.keep_ratio  # None exactly where a parameter is unpruned

        def like(value, old):
            flat, treedef = jax.tree.flatten(old, is_leaf=is_none)
            values = per_leaf(value, treedef, len(flat))
            return treedef.unflatten(
                [None if o is None else jnp.asarray(v, o.dtype) for o, v in zip(flat, values, strict=True)]
            )

        support = jax.tree.map(
            lambda r, m, sup: None if r is None else m & sup,
            specs_like,
            s.mask,
            s.support,
            is_leaf=is_none,
        )
        new_rho, u = s.rho, s.u
        if rho is not None:
            new_rho = like(rho, s.rho)
            # U is the dual variable divided by rho: rescale it with rho.
            u = jax.tree.map(
                lambda r0, r1, u: None if r0 is None else u * (r0 / r1).astype(u.dtype),
                s.rho,
                new_rho,
                s.u,
                is_leaf=is_none,
            )
        return s._replace(keep_ratio=like(keep_ratio, s.keep_ratio), rho=new_rho, u=u, support=support)

    return jax.tree.map(edit, opt_state, is_leaf=_is_admm_state)


def residuals(state: AdmmState) -> dict[str, float]:
    """Mean, max primal residual and mean dual residual over pruned parameters."""
    primal = [float(x) for x in jax.tree.leaves(state.primal_residual)]
    dual = [float(x) for x in jax.tree.leaves(state.dual_residual)]
    if not primal:
        return {"primal_residual": 0.0, "primal_residual_max": 0.0, "dual_residual": 0.0}
    return {
        "primal_residual": sum(primal) / len(primal),
        "primal_residual_max": max(primal),
        "dual_residual": sum(dual) / len(dual),
    }


__all__ = ["AdmmState", "admm", "find_state", "residuals", "set_stage"]
