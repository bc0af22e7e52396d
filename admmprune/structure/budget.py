r"""Projection onto a compute budget: keep channels so the collapsed model's MACs fit (layer L3).

A per-layer keep ratio fixes every layer's width; a budget fixes what the
model may cost and lets the layers compete for it. The set is

.. math:: S_B = \{W : \text{every coupled group keeps whole channels, and }
          \mathrm{MACs}(\text{kept}) \le B\}

with :math:`\mathrm{MACs}` the conv/dense multiply-accumulates per example of
the collapsed model (:func:`admmprune.structure.costs.gated_macs` of 0/1 keep
values, exact). The Euclidean projection onto :math:`S_B` removes the set of
channels of least total squared norm whose removal brings the MACs under
:math:`B`: a knapsack over channels whose costs interact (a channel's MACs
depend on how many channels the layers next to it keep), NP-hard in general.

:func:`project_to_budget` solves it greedily, the classic knapsack heuristic:
starting from the kept channels, it removes one channel at a time, the one
with the least squared norm per MAC its removal saves (recomputed after every
removal, as the gradient of the multilinear MAC count, which is the exact
saving of removing that one channel while the neighbours stay), until the
MACs fit; then it adds back, best first, removed channels that still fit
(the last removal may have overshot). Channels that are zero in every member
go before anything else. Every group keeps at least one channel. The loops are
``lax.while_loop``\ s, so the projection runs inside ``jit`` (ADMM's
Z-update); each takes at most as many iterations as there are channels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from admmprune._types import Masks, Params, Specs
from admmprune.core.groups import as_groups
from admmprune.core.projections import apply_masks, group_scores, groups_alive
from admmprune.structure.costs import gated_macs
from admmprune.structure.gates import keep_masks


def budget_keep(
    tree: Params,
    specs: Specs,
    macs: Mapping[str, int],
    budget: float | jax.Array,
    *,
    support: Masks | None = None,
) -> dict[str, jax.Array]:
    """The channels the greedy projection onto ``MACs <= budget`` keeps, per group.

    Args:
      tree: the parameters to project (a pytree of arrays).
      specs: their spec tree; every coupled group (a ``group`` name) takes
        part, other specs are ignored.
      macs: ``{kernel path: MACs per example}`` from
        :func:`admmprune.structure.costs.layer_macs` of the dense model.
      budget: the largest MACs per example the kept channels may cost.
      support: optional masks (a previous projection's); channels they
        removed stay removed.

    Returns:
      ``{group: (C,) bool}``, ``True`` = kept. If even one channel per group
      costs more than ``budget``, that is what is kept (the nearest point
      the set allows; compare :func:`kept_macs` with the budget).
    """
    groups = as_groups(specs, tree)
    leaves = groups.flatten(tree)
    names = groups.names
    sizes = [groups[n].channels for n in names]
    scores = jnp.concatenate(
        [sum(group_scores(leaves[m.leaf], m.spec) for m in groups[n].members).astype(jnp.float32) for n in names]
    )
    alive = jnp.ones(scores.shape, jnp.bool_)
    if support is not None:
        supports = groups.flatten(support)
        alive = jnp.concatenate(
            [jnp.all(jnp.stack([groups_alive(supports[m.leaf], m.spec) for m in groups[n].members]), 0) for n in names]
        )
    owner = jnp.concatenate([jnp.full((c,), i) for i, c in enumerate(sizes)])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]

    def split(flat: jax.Array) -> dict[str, jax.Array]:
        return {n: flat[s : s + c] for n, s, c in zip(names, starts, sizes, strict=True)}

    def cost(keep: jax.Array) -> jax.Array:
        return gated_macs(macs, split(keep), specs, params=tree)

    budget = jnp.asarray(budget, jnp.float32)

    def removable(keep: jax.Array) -> jax.Array:
        # a channel may go while its group keeps another one
        per_group = jax.ops.segment_sum(keep.astype(jnp.int32), owner, num_segments=len(sizes))
        return (keep > 0) & (per_group[owner] > 1)

    def cond(keep: jax.Array) -> jax.Array:
        return (cost(keep) > budget) & jnp.any(removable(keep) & (jax.grad(cost)(keep) > 0))

    def body(keep: jax.Array) -> jax.Array:
        saving = jax.grad(cost)(keep)
        price = jnp.where(removable(keep) & (saving > 0), scores / jnp.maximum(saving, 1e-30), jnp.inf)
        return keep.at[jnp.argmin(price)].set(0.0)

    # Channels that are zero in every member cost MACs and carry no weight: they go first (each
    # group keeps its best channel), so a projected tree projects to itself, masks included.
    start = []
    for a, s0, c in zip(split(alive).values(), starts, sizes, strict=True):
        live = a & (scores[s0 : s0 + c] > 0)
        best = jnp.arange(c) == jnp.argmax(jnp.where(a, scores[s0 : s0 + c], -jnp.inf))
        start.append(jnp.where(live.any(), live, best))
    keep = jax.lax.while_loop(cond, body, jnp.concatenate(start).astype(jnp.float32))

    # The last removal may overshoot: add back, best score per MAC first, what still fits.
    def refill_price(keep: jax.Array) -> jax.Array:
        cost_of = jax.grad(cost)(keep)  # the MACs a removed channel would add, with the others as they are
        fits = (keep == 0) & alive & (scores > 0) & (cost(keep) + cost_of <= budget)
        return jnp.where(fits, scores / jnp.maximum(cost_of, 1e-30), -jnp.inf)

    def refill(keep: jax.Array) -> jax.Array:
        return keep.at[jnp.argmax(refill_price(keep))].set(1.0)

    keep = jax.lax.while_loop(lambda k: jnp.any(refill_price(k) > -jnp.inf), refill, keep)
    return {n: k > 0 for n, k in split(keep).items()}


def kept_macs(macs: Mapping[str, int], keep: Mapping[str, Any], specs: Specs, *, params: Any = None) -> jax.Array:
    """The collapsed model's MACs per example when each group keeps ``keep`` (bool per channel)."""
    return gated_macs(macs, {n: jnp.asarray(k, jnp.float32) for n, k in keep.items()}, specs, params=params)


def project_to_budget(
    tree: Params,
    specs: Specs,
    macs: Mapping[str, int],
    budget: float | jax.Array,
    *,
    support: Masks | None = None,
) -> tuple[Params, Masks]:
    """Projects ``tree`` onto the channels that fit ``budget`` MACs (greedy; see the module docstring).

    Args:
      tree: the parameters to project.
      specs: their spec tree (see :func:`budget_keep`).
      macs: ``{kernel path: MACs per example}`` of the dense model.
      budget: the largest MACs per example the kept channels may cost.
      support: optional masks whose removed channels stay removed.

    Returns:
      ``(projected, masks)`` as :func:`admmprune.core.projections.project_tree`
      returns them: the removed channels zeroed in every member of their
      group, masks ``True`` where kept and ``None`` on leaves outside groups.
    """
    masks = keep_masks(tree, specs, budget_keep(tree, specs, macs, budget, support=support))
    return apply_masks(tree, masks), masks


def projector(macs: Mapping[str, int], budget: float | None = None) -> Callable[..., tuple[Params, Masks]]:
    """:func:`project_to_budget` as ``admm(..., projection=...)`` calls a projection.

    Args:
      macs: ``{kernel path: MACs per example}`` of the dense model.
      budget: the MACs per example to fit. ``None``: the ADMM stage's keep
        ratio (one scalar, as :func:`admmprune.core.admm.set_stage` sets it)
        is the fraction of the dense MACs kept, so progressive stages tighten
        the budget. ``round_to`` is ignored.

    Examples:
        >>> tx = admmprune.admm(specs, projection=budget.projector(costs.layer_macs(model, x), 158_000))
    """
    total = float(sum(macs.values()))

    def project(tree: Params, specs: Specs, keep_ratio: Any = 1.0, *, support: Masks | None = None, round_to: int = 1):
        del round_to
        if budget is not None:
            return project_to_budget(tree, specs, macs, budget, support=support)
        ratio = jax.tree.leaves(keep_ratio)[0] if jax.tree.leaves(keep_ratio) else 1.0
        return project_to_budget(tree, specs, macs, ratio * total, support=support)

    return project


__all__ = ["budget_keep", "kept_macs", "project_to_budget", "projector"]
