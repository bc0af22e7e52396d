"""Progressive ADMM: the method admmprune is built around."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import optax

from admmprune._errors import UserError
from admmprune._types import Masks, Params, Specs
from admmprune.app.methods._base import Method, Optimizer, Phase, PruneInputs, Target, Values, register
from admmprune.core import admm as admm_lib
from admmprune.core import masking, schedules
from admmprune.structure import budget as budget_lib

RHO_SCHEDULES = ("constant", "geometric", "balancing")
BUDGETS = ("channels", "macs")
PENALTIES = ("all", "pruned")


@register("admm")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Admm(Method):
    """Progressive ADMM stages (:func:`admmprune.core.admm.admm` before the SGD),
    then a hard prune onto the last stage's support, then the retrain.

    Attributes:
      rho: the initial penalty.
      rho_schedule: ``constant``, ``geometric`` (times ``rho_factor`` per dual
        update, up to ``max_rho``) or ``balancing`` (residual balancing, up to
        ``max_rho``).
      rho_factor: the geometric schedule's factor.
      max_rho: the largest rho of the growing schedules.
      interval: SGD steps between projections and dual updates.
      penalty: ``"all"`` or ``"pruned"``: which weights the penalty pulls
        (:func:`admmprune.core.admm.admm`).
      round_to: keep a multiple of this many channels per group.
      budget: what a stage's ratio removes: ``"channels"``, that fraction of
        every group's channels, or ``"macs"``, that fraction of the model's
        conv/dense MACs, the groups competing for what is kept
        (:mod:`admmprune.structure.budget`; ``round_to`` does not apply).
    """

    weight_sparsity = True  # prune.sparsity: ADMM and its hard prune project onto any spec tree

    rho: float
    rho_schedule: str
    rho_factor: float
    max_rho: float
    interval: int
    penalty: str = "all"
    round_to: int = 1
    budget: str = "channels"

    def __post_init__(self):
        if self.rho_schedule not in RHO_SCHEDULES:
            raise UserError(f"admm.rho_schedule must be one of {RHO_SCHEDULES}, got {self.rho_schedule!r}")
        if self.penalty not in PENALTIES:
            raise UserError(f"admm.penalty must be one of {PENALTIES}, got {self.penalty!r}")
        if self.budget not in BUDGETS:
            raise UserError(f"prune.budget must be one of {BUDGETS}, got {self.budget!r}")

    @classmethod
    def from_values(cls, values: Values) -> Admm:
        a = values["admm"]
        return cls(
            rho=a["rho"],
            rho_schedule=a["rho_schedule"],
            rho_factor=a["rho_factor"],
            max_rho=a["max_rho"],
            interval=a["interval"],
            penalty=a.get("penalty", "all"),
            round_to=values["prune"]["round_to"],
            budget=values["prune"].get("budget", "channels"),
        )

    def phases(self, stages: Sequence[float], epochs_per_stage: int, retrain_epochs: int) -> list[Phase]:
        return [*(Phase("admm", epochs_per_stage, r) for r in stages), Phase("retrain", retrain_epochs, stages[-1])]

    def schedule(self) -> schedules.RhoSchedule:
        if self.rho_schedule == "geometric":
            return schedules.geometric_rho(self.rho_factor, max_rho=self.max_rho)
        if self.rho_schedule == "balancing":
            return schedules.residual_balancing_rho(max_rho=self.max_rho)
        return schedules.constant_rho()

    def transform(
        self,
        phase: Phase,
        specs: Specs,
        optimizer: Optimizer,
        learning_rate: optax.ScalarOrSchedule,
        *,
        gated: bool,
        target: Target | None = None,
    ) -> optax.GradientTransformation:
        if phase.kind != "admm":
            return super().transform(phase, specs, optimizer, learning_rate, gated=gated, target=target)
        projection = None
        if self.budget == "macs":
            if target is None:
                raise ValueError("admm with budget='macs' needs the target (its layer MACs)")
            projection = budget_lib.projector(target.layer_macs())  # the stage's keep ratio of the MACs
        return optax.chain(
            admm_lib.admm(
                specs,
                rho=self.rho,
                interval=self.interval,
                penalty=self.penalty,
                rho_schedule=self.schedule(),
                round_to=self.round_to,
                projection=projection,
            ),
            optimizer.weights(learning_rate),
        )

    def prune(self, inputs: PruneInputs, target: Target) -> tuple[Params, Masks]:
        """The projection onto the last stage's set, within the ADMM support."""
        if self.budget == "macs":
            macs = target.layer_macs()
            return budget_lib.project_to_budget(
                inputs.params, target.specs, macs, inputs.keep_ratio * sum(macs.values()), support=inputs.support
            )
        return masking.hard_prune(
            inputs.params, target.specs, inputs.keep_ratio, support=inputs.support, round_to=self.round_to
        )
