"""Schedules: the penalty parameter rho, and the progressive pruning stages (L2).

A rho schedule is a pure function ``(rho, primal, dual) -> rho`` applied to
each parameter's rho after every dual update, where ``primal`` and ``dual``
are that parameter's relative residuals (see :class:`admmprune.AdmmState`).
Because it runs inside the jitted step it must use ``jnp`` operations only.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

RhoSchedule = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def constant_rho() -> RhoSchedule:
    """rho never changes."""

    def schedule(rho, primal, dual):
        del primal, dual
        return rho

    return schedule


def geometric_rho(factor: float = 1.3, max_rho: float | None = None) -> RhoSchedule:
    """rho is multiplied by ``factor`` at every dual update, up to ``max_rho``.

    Growing rho by about 1.3 per dual update is the usual choice in ADMM
    pruning (Zhang et al., "A Systematic DNN Weight Pruning Framework using
    ADMM", ECCV 2018): early updates let the weights move, late ones force
    ``W = Z``.
    """
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")

    def schedule(rho, primal, dual):
        del primal, dual
        new = rho * factor
        return new if max_rho is None else jnp.minimum(new, max_rho)

    return schedule


def residual_balancing_rho(
    mu: float = 10.0,
    tau_incr: float = 2.0,
    tau_decr: float = 2.0,
    min_rho: float = 1e-8,
    max_rho: float = 1e4,
) -> RhoSchedule:
    """Residual balancing (Boyd et al., "Distributed Optimization and Statistical
    Learning via ADMM", 2011, section 3.4.1).

    If the primal residual exceeds ``mu`` times the dual residual, rho grows by
    ``tau_incr``; if the dual residual exceeds ``mu`` times the primal one, rho
    shrinks by ``tau_decr``; otherwise it stays. It is kept in
    ``[min_rho, max_rho]``.
    """
    if mu <= 1 or tau_incr <= 1 or tau_decr <= 1:
        raise ValueError("residual balancing needs mu > 1, tau_incr > 1 and tau_decr > 1")

    def schedule(rho, primal, dual):
        new = jnp.where(primal > mu * dual, rho * tau_incr, jnp.where(dual > mu * primal, rho / tau_decr, rho))
        return jnp.clip(new, min_rho, max_rho)

    return schedule


def stage_ratios(target: float, stages: Sequence[float] | None = None) -> tuple[float, ...]:
    """The pruning ratio of each progressive stage, ending at ``target``.

    A ratio is the fraction of groups removed (channels, for structured specs).
    By default the removed fraction goes 0.5, 0.75, 0.875, ... (half of what is
    left each stage) while it stays more than 0.05 below the target, and the
    last stage is the target: 0.9 gives ``(0.5, 0.75, 0.9)``, 0.7 gives
    ``(0.5, 0.7)``, 0.5 gives ``(0.5,)`` and 0.99 gives
    ``(0.5, 0.75, 0.875, 0.9375, 0.99)``.

    Args:
      target: the final ratio, in ``(0, 1)``.
      stages: an explicit list, strictly increasing, in ``(0, 1)``, ending at
        ``target``.

    Raises:
      ValueError: if the target or the stages are not as above.
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"the pruning ratio must be in (0, 1), got {target}")
    if stages is not None:
        stages = tuple(float(s) for s in stages)
        if not stages or any(not 0.0 < s < 1.0 for s in stages):
            raise ValueError(f"stages must be ratios in (0, 1), got {list(stages)}")
        if any(b <= a for a, b in itertools.pairwise(stages)):
            raise ValueError(f"stages must be strictly increasing, got {list(stages)}")
        if abs(stages[-1] - target) > 1e-9:
            raise ValueError(f"the last stage {stages[-1]} must equal the ratio {target}")
        return stages
    out = []
    removed = 0.5
    while removed < target - 0.05:
        out.append(removed)
        removed = 1.0 - (1.0 - removed) / 2.0
    return tuple(out) + (float(target),)


__all__ = [
    "RhoSchedule",
    "constant_rho",
    "geometric_rho",
    "residual_balancing_rho",
    "stage_ratios",
]
