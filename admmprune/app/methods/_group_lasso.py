"""Group lasso: group-sparsity regularized training, then removal by the group norms."""

from __future__ import annotations

import dataclasses

import optax

from admmprune._types import Specs
from admmprune.app.methods._base import Optimizer, Phase, ScoredMethod, Target, Values, non_negative, register
from admmprune.core import regularizers


@register("group_lasso")
@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupLasso(ScoredMethod):
    """Group-sparsity regularized training: proximal SGD with block soft
    thresholding of every channel group, then removal by the smallest group norms.

    Attributes:
      strength: the group lasso's weight (times the learning rate: the threshold).
    """

    strength: float
    sparsifying = True

    @classmethod
    def from_values(cls, values: Values) -> GroupLasso:
        return cls(
            strength=non_negative(values["group_lasso"]["strength"], "group_lasso.strength"),
            **cls.selection(values),
        )

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
        if phase.kind != "sparsify":
            return super().transform(phase, specs, optimizer, learning_rate, gated=gated, target=target)
        lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
        strength = self.strength
        return optax.chain(
            optimizer.weights(learning_rate), regularizers.group_lasso_prox(specs, lambda count: strength * lr(count))
        )
