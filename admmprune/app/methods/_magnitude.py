"""Magnitude (criterion) pruning: the classic heuristic ADMM is compared with."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax

from admmprune._errors import UserError
from admmprune._types import Masks, Params, Specs
from admmprune.app.methods._base import (
    Phase,
    PruneInputs,
    ScoredMethod,
    Target,
    Values,
    register,
)
from admmprune.core import masking
from admmprune.structure import criteria, gates


@register("magnitude")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Magnitude(ScoredMethod):
    """Filter pruning by a criterion, one-shot or iterative.

    With a ``prune.sparsity`` other than channels it keeps the largest groups
    (weights, N:M entries, columns, blocks) by L2 norm instead: the Euclidean
    projection onto the set, as ADMM's hard prune.

    Attributes:
      criterion: one of :data:`admmprune.structure.criteria.CRITERIA`.
      iterative: prune at each stage's ratio and fine-tune in between,
        instead of once at the final ratio.
      seed: the key of the ``random`` criterion.
      sparsity: ``prune.sparsity``: ``"channel"``, or the kind of the
        per-kernel specs it prunes to.
    """

    weight_sparsity = True

    criterion: str = "l2"
    iterative: bool = False
    seed: int = 0
    sparsity: str = "channel"

    def __post_init__(self):
        if self.criterion not in criteria.CRITERIA:
            raise UserError(f"unknown prune.criterion {self.criterion!r}; choose from {', '.join(criteria.CRITERIA)}")
        super().__post_init__()

    @classmethod
    def from_values(cls, values: Values) -> Magnitude:
        return cls(
            criterion=values["prune"]["criterion"],
            iterative=values["magnitude"]["iterative"],
            seed=values["run"]["seed"],
            sparsity=values["prune"].get("sparsity", "channel"),
            **cls.selection(values),
        )

    def phases(self, stages: Sequence[float], epochs_per_stage: int, retrain_epochs: int) -> list[Phase]:
        if not self.iterative:
            return super().phases(stages, epochs_per_stage, retrain_epochs)
        return [*(Phase("finetune", epochs_per_stage, r) for r in stages), Phase("retrain", retrain_epochs, stages[-1])]

    def check(self, target: Target) -> None:
        if self.criterion == "bn_scale" and not gates.norm_scales(target.specs):
            raise UserError(f"prune.criterion bn_scale needs normalization layers, and {target.model_name} has none")

    def check_sparsity(self, kind: str) -> None:
        super().check_sparsity(kind)
        if kind != "channel" and self.criterion != "l2":
            raise UserError(
                f"magnitude with --sparsity {kind} keeps the groups of largest L2 norm (the Euclidean "
                f"projection); prune.criterion must be l2, not {self.criterion}"
            )

    def prune(self, inputs: PruneInputs, target: Target) -> tuple[Params, Masks]:
        if self.sparsity == "channel":
            return super().prune(inputs, target)
        # Weights removed by an earlier stage (inputs.support) stay removed.
        return masking.hard_prune(inputs.params, target.specs, inputs.keep_ratio, support=inputs.support)

    def scores(self, params: Params, specs: Specs, g: Mapping[str, jax.Array] | None, target: Target):
        if g is not None:
            return super().scores(params, specs, g, target)
        grads = target.taylor_grads(params) if self.criterion == "taylor" else None
        key = jax.random.key(self.seed) if self.criterion == "random" else None
        return criteria.scores(params, specs, self.criterion, grads=grads, key=key)
