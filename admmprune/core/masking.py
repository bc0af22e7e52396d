"""Hard pruning and masked retraining (layer L2)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admmprune._types import Masks, Params, Specs, is_none
from admmprune.core.projections import apply_masks, project_tree


def hard_prune(
    params: Params,
    specs: Specs,
    keep_ratio: Any,
    *,
    support: Masks | None = None,
    round_to: int = 1,
) -> tuple[Params, Masks]:
    """Projects the weights onto their sets and returns them with their masks.

    This ends ADMM: the weights themselves, not ``Z``, become exactly sparse.

    Args:
      params: the weights.
      specs: the spec tree (``None`` = not pruned).
      keep_ratio: the final fraction of groups kept, scalar or tree.
      support: optional allowed support, e.g. ``AdmmState.support`` so that
        groups removed in earlier stages stay removed.
      round_to: keep a multiple of this many channels in every coupled group.

    Returns:
      ``(pruned_params, masks)``; ``masks`` is boolean, ``None`` where unpruned.
    """
    return project_tree(params, specs, keep_ratio, support=support, round_to=round_to)


class MaskedState(NamedTuple):
    """State of :func:`keep_masked`: the fixed masks (``None`` = unmasked)."""

    masks: Masks


def keep_masked(masks: Masks) -> optax.GradientTransformationExtraArgs:
    """Keeps masked weights at exactly zero; place it last in the chain.

    It rewrites the final update of a masked weight ``w`` to ``-w``, so that
    ``optax.apply_updates`` leaves exactly ``0`` there whatever the optimizer
    (momentum, weight decay) proposed, and it zeroes weights that were not yet
    zero on the first step. The masks live in the state, so swapping them is
    an edit of state values, not a new program.

    Args:
      masks: a boolean tree shaped like the params (``True`` = kept), ``None``
        for parameters that are not masked, e.g. from :func:`hard_prune`.
    """

    def init_fn(params: Params) -> MaskedState:
        del params
        return MaskedState(
            masks=jax.tree.map(lambda m: None if m is None else jnp.asarray(m, jnp.bool_), masks, is_leaf=is_none)
        )

    def update_fn(updates, state: MaskedState, params: Params | None = None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("keep_masked needs the current parameters: call update(grads, state, params)")
        updates = jax.tree.map(
            lambda m, u, w: u if m is None else jnp.where(m, u, -w),
            state.masks,
            updates,
            params,
            is_leaf=is_none,
        )
        return updates, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def mask_sparsity(masks: Masks) -> float:
    """Fraction of masked-out weights over all masked parameters."""
    leaves = [m for m in jax.tree.leaves(masks) if m is not None]
    total = sum(m.size for m in leaves)
    return 0.0 if total == 0 else 1.0 - sum(int(jnp.sum(m)) for m in leaves) / total


__all__ = ["MaskedState", "apply_masks", "hard_prune", "keep_masked", "mask_sparsity"]
