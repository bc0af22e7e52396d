"""Methods that learn a scale per channel: L1-masked training, network
slimming, and the continuous relaxation with a FLOPs target."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from admmprune._errors import UserError
from admmprune._types import Masks, Params, Specs
from admmprune.app.methods._base import (
    Optimizer,
    Phase,
    PruneInputs,
    ScoredMethod,
    Target,
    Values,
    keep_at_least_one,
    non_negative,
    register,
)
from admmprune.core import regularizers
from admmprune.structure import costs, criteria, gates


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Gated(ScoredMethod):
    """Gates trained next to the weights in the sparsify phase, under a penalty."""

    sparsifying = True

    def uses_gates(self, specs: Specs) -> bool:
        return True

    def gate_transform(self, optimizer: Optimizer, learning_rate: optax.ScalarOrSchedule):
        return optimizer.plain(learning_rate)

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
        if phase.kind != "sparsify" or not gated:
            return super().transform(phase, specs, optimizer, learning_rate, gated=gated, target=target)
        # A (params, gates) pair: the gates have their own penalty instead of weight decay.
        return optax.multi_transform(
            {"weights": optimizer.weights(learning_rate), "gates": self.gate_transform(optimizer, learning_rate)},
            _weights_and_gates,
        )


def _weights_and_gates(trainable):
    """Labels of a ``(params, gates)`` pair for ``optax.multi_transform``."""
    params, g = trainable
    return jax.tree.map(lambda _: "weights", params), jax.tree.map(lambda _: "gates", g)


@register("l1_mask")
@dataclasses.dataclass(frozen=True, kw_only=True)
class L1Mask(_Gated):
    """A learnable scale per channel, trained under ``loss + strength * ||m||_1``;
    the channels with the smallest ``|m|`` are removed.

    Attributes:
      strength: the L1 weight.
      delta: the report counts the masks that end below it.
    """

    strength: float
    delta: float

    @classmethod
    def from_values(cls, values: Values) -> L1Mask:
        return cls(
            strength=non_negative(values["l1_mask"]["strength"], "l1_mask.strength"),
            delta=values["l1_mask"]["delta"],
            **cls.selection(values),
        )

    def penalty(self, params: Params, target: Target) -> Callable[[Any], jax.Array]:
        strength = self.strength
        return lambda g: strength * gates.l1(g)

    def sparsify_report(self, g: Mapping[str, jax.Array], params: Params, target: Target) -> dict[str, float]:
        values = np.concatenate([np.asarray(v) for v in self.gate_values(g).values()])
        return {"gates_below_delta": float(np.mean(np.abs(values) < self.delta))}


@register("slimming")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Slimming(L1Mask):
    """Network slimming: L1 on the BatchNorm scales of the groups, then removal by
    the smallest ``|gamma|``. A model without normalization gets gates in their
    place (which makes it ``l1_mask`` with this strength)."""

    @classmethod
    def from_values(cls, values: Values) -> Slimming:
        return cls(
            strength=non_negative(values["slimming"]["strength"], "slimming.strength"),
            delta=values["l1_mask"]["delta"],
            **cls.selection(values),
        )

    def uses_gates(self, specs: Specs) -> bool:
        return not gates.norm_scales(specs)

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
        if phase.kind == "sparsify" and not gated:
            return optax.chain(regularizers.bn_l1(specs, self.strength), optimizer.weights(learning_rate))
        return super().transform(phase, specs, optimizer, learning_rate, gated=gated, target=target)

    def scores(self, params: Params, specs: Specs, g: Mapping[str, jax.Array] | None, target: Target):
        if g is not None:
            return super().scores(params, specs, g, target)
        return criteria.scores(params, specs, "bn_scale")


@register("relaxation")
@dataclasses.dataclass(frozen=True, kw_only=True)
class Relaxation(_Gated):
    """Continuous relaxation of channel gates ``g = sigmoid(s / temperature)``
    with a FLOPs budget term and a polarization term; channels whose gate ends
    below ``threshold`` are removed.

    Attributes:
      ratio: the run's ratio: the target is the MACs of keeping ``1 - ratio``
        of every group.
      temperature: of the sigmoid; lower is closer to 0/1 gates.
      init_logit: every gate's starting logit (3.0: a gate of 0.95).
      gate_learning_rate: Adam's learning rate for the logits.
      flops_weight: the budget term's weight.
      polarization_weight: the polarization term's weight.
      threshold: a channel whose gate ends below it is removed.
    """

    ratio: float
    temperature: float
    init_logit: float
    gate_learning_rate: float
    flops_weight: float
    polarization_weight: float
    threshold: float
    # The budget (gated-MACs model and target) once computed: the layer MACs take a trace.
    _budget: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.threshold < 1:
            raise UserError(f"relaxation.threshold must be in (0, 1), got {self.threshold!r}")

    @classmethod
    def from_values(cls, values: Values) -> Relaxation:
        r = values["relaxation"]
        numbers = {
            k: non_negative(r[k], f"relaxation.{k}")
            for k in ("temperature", "flops_weight", "polarization_weight", "gate_learning_rate")
        }
        return cls(
            ratio=values["prune"]["ratio"],
            init_logit=r["init_logit"],
            threshold=r["threshold"],
            **numbers,
            **cls.selection(values),
        )

    def init_gates(self, params: Params, specs: Specs) -> dict[str, jax.Array]:
        return gates.init(params, specs, self.init_logit)

    def gate_values(self, g: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        return gates.sigmoid_gates(g, self.temperature)

    def gate_transform(self, optimizer: Optimizer, learning_rate: optax.ScalarOrSchedule):
        return optax.adam(self.gate_learning_rate)  # the budget's gradient scale varies by layer

    def budget(self, params: Params, target: Target) -> tuple[Callable[[Any], jax.Array], float]:
        """The gated-MACs model and its target (``1 - ratio`` of every group)."""
        if "value" not in self._budget:
            model = functools.partial(costs.gated_macs, target.layer_macs(), specs=target.specs, params=params)
            uniform = {
                k: jnp.full(v.shape, 1.0 - self.ratio, jnp.float32) for k, v in gates.init(params, target.specs).items()
            }
            self._budget["value"] = (model, float(model(uniform)))
        return self._budget["value"]

    def penalty(self, params: Params, target: Target) -> Callable[[Any], jax.Array]:
        macs_model, budget = self.budget(params, target)

        def relaxation(g):
            v = self.gate_values(g)
            over = jax.nn.relu(jnp.log(macs_model(v) / budget))
            n = sum(x.size for x in v.values())
            return self.flops_weight * jnp.square(over) + self.polarization_weight * gates.polarization(v) / n

        return relaxation

    def sparsify_report(self, g: Mapping[str, jax.Array], params: Params, target: Target) -> dict[str, float]:
        values = self.gate_values(g)
        flat = np.concatenate([np.asarray(v) for v in values.values()])
        macs_model, budget = self.budget(params, target)
        return {
            "gates_open": float(np.mean(flat >= self.threshold)),
            "gated_macs_over_target": float(macs_model(values) / budget),
        }

    def select(self, scores, params: Params, inputs: PruneInputs, target: Target) -> Masks:
        keep = {k: np.asarray(v) >= self.threshold for k, v in self.gate_values(inputs.gates).items()}
        removable = target.removable_groups(inputs.params)
        return gates.keep_masks(params, target.specs, keep_at_least_one(keep, scores, removable))
