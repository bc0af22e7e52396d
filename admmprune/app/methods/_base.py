"""What a pruning method is to the pipeline: the :class:`Method` interface, the
values it is given, and the registry that names methods."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from admmprune._errors import UserError
from admmprune._types import Masks, Params, Specs
from admmprune.core import masking
from admmprune.structure import criteria, gates

#: ``{section: {field: value}}``: the plain values (no ConfigDict) of a run's
#: settings that methods are built from, e.g. ``{"prune": {"ratio": 0.9, ...},
#: "admm": {"rho": 1e-3, ...}, "seed": {"value": 0}}``.
Values = Mapping[str, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class Phase:
    """One training phase: ``dense``; ``admm`` (one per stage); ``sparsify`` (the
    regularized training of the other methods); ``finetune`` (one per stage of
    iterative magnitude pruning); ``retrain`` (masks fixed)."""

    kind: str
    epochs: int
    ratio: float | None = None  # the stage's ratio (admm, finetune) or the final one

    @property
    def name(self) -> str:
        return f"{self.kind} {self.ratio:g}" if self.kind in ("admm", "finetune") else self.kind


class Optimizer(NamedTuple):
    """The SGD every phase trains the weights with: momentum and decoupled weight decay."""

    momentum: float
    weight_decay: float

    def weights(self, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
        """SGD with momentum on the weights, with weight decay."""
        return optax.chain(
            optax.add_decayed_weights(self.weight_decay),
            optax.sgd(learning_rate, momentum=self.momentum or None),
        )

    def plain(self, learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformation:
        """SGD with momentum and no weight decay (for gates, which have their own penalty)."""
        return optax.sgd(learning_rate, momentum=self.momentum or None)


@dataclasses.dataclass(frozen=True)
class Target:
    """What a method may ask of the model it prunes, computed only when asked.

    Attributes:
      model_name: the model's name, for messages.
      specs: the spec tree of its parameters.
      layer_macs: ``() -> {kernel path: MACs}`` of one example.
      removable_groups: ``params -> set of groups`` that may keep no channel
        (a residual branch that collapse removes whole).
      taylor_grads: ``params -> gradients`` of a few training batches.
    """

    model_name: str
    specs: Specs
    layer_macs: Callable[[], dict[str, int]]
    removable_groups: Callable[[Params], set[str]]
    taylor_grads: Callable[[Params], Any]


@dataclasses.dataclass(frozen=True)
class PruneInputs:
    """What a method prunes from.

    Attributes:
      params: the trained weights.
      gates: the trained gates (or logits), for a gated method; else ``None``.
      keep_ratio: the fraction of every group's channels kept.
      support: the ADMM state's support, when an ADMM phase came before.
      alive: ``{group: kept channels}`` that earlier prunes left (they stay removed).
    """

    params: Params
    gates: dict[str, jax.Array] | None
    keep_ratio: float
    support: Masks | None = None
    alive: dict[str, np.ndarray] | None = None


class Method:
    """A pruning method: its phases, its training transformations, and how it prunes.

    Subclasses are frozen dataclasses of plain values registered under a name
    with :func:`register`; :func:`build` makes one from a run's values. The
    pipeline loops over :meth:`phases` and asks the method what only it knows;
    it never asks which method it runs.
    """

    name: ClassVar[str]
    #: Whether the method trains a regularized ``sparsify`` phase before the retrain.
    sparsifying: ClassVar[bool] = False
    #: Whether the method also prunes to the sets of ``prune.sparsity`` other
    #: than channels (unstructured, N:M, columns, blocks), by the Euclidean
    #: projection onto the set: the specs it is given are then per kernel.
    weight_sparsity: ClassVar[bool] = False

    @classmethod
    def from_values(cls, values: Values) -> Method:
        """Builds the method from a run's values; raises ``UserError`` for a bad one."""
        raise NotImplementedError

    def phases(self, stages: Sequence[float], epochs_per_stage: int, retrain_epochs: int) -> list[Phase]:
        """The phases after the dense one. Every method trains the same epochs:
        ``epochs_per_stage`` per stage, then ``retrain_epochs`` with the masks fixed."""
        total = epochs_per_stage * len(stages)
        if self.sparsifying:
            return [Phase("sparsify", total, stages[-1]), Phase("retrain", retrain_epochs, stages[-1])]
        # One-shot: prune the dense model at the final ratio and fine-tune for all the epochs.
        return [Phase("retrain", total + retrain_epochs, stages[-1])]

    def check(self, target: Target) -> None:
        """Raises ``UserError`` if the method cannot prune ``target`` (before any training)."""

    def check_sparsity(self, kind: str) -> None:
        """Raises ``UserError`` if the method cannot prune to ``kind`` (``prune.sparsity``)."""
        if kind != "channel" and not self.weight_sparsity:
            able = [name for name, cls in _REGISTRY.items() if cls.weight_sparsity]
            raise UserError(
                f"method {self.name} prunes channels only, not --sparsity {kind}; "
                f"use --method {' or '.join(able)}, or --sparsity channel"
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
        """The optimizer of one of the method's own phases (``admm``, ``sparsify``); ``target``
        is the model being pruned, for a method whose transformation depends on it."""
        raise ValueError(f"{self.name} has no {phase.kind} phase")

    # Gates: methods that learn one multiplier per channel next to the weights.
    def uses_gates(self, specs: Specs) -> bool:
        """Whether the sparsify phase trains per-channel gates next to the weights."""
        return False

    def init_gates(self, params: Params, specs: Specs) -> dict[str, jax.Array]:
        return gates.init(params, specs, 1.0)

    def gate_values(self, g: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The multiplicative gates from what is trained (the gates themselves, or logits)."""
        return dict(g)

    def penalty(self, params: Params, target: Target) -> Callable[[Any], jax.Array]:
        """``gates -> scalar`` added to the loss while gates train."""
        raise ValueError(f"{self.name} trains no gates")

    def sparsify_report(self, g: Mapping[str, jax.Array], params: Params, target: Target) -> dict[str, float]:
        """What the method adds to the report's ``sparsify`` entry about its gates."""
        return {}

    # Pruning.
    def prune(self, inputs: PruneInputs, target: Target) -> tuple[Params, Masks]:
        """The hard prune at ``inputs.keep_ratio``: ``(pruned params, masks)``."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScoredMethod(Method):
    """A method that prunes by channel scores: fold the gates into the weights,
    score every channel, keep the highest (layer-wise or globally)."""

    scope: str = "layer"
    round_to: int = 1

    @staticmethod
    def selection(values: Values) -> dict[str, Any]:
        """The selection settings every scored method takes from a run's values."""
        return {"scope": values["prune"]["scope"], "round_to": values["prune"]["round_to"]}

    def __post_init__(self):
        if self.scope not in criteria.SCOPES:
            raise UserError(f"prune.scope must be one of {criteria.SCOPES}, got {self.scope!r}")

    def scores(self, params: Params, specs: Specs, g: Mapping[str, jax.Array] | None, target: Target):
        """Per-group channel scores (higher = keep)."""
        if g is not None:
            return {k: jnp.abs(v) for k, v in self.gate_values(g).items()}
        return criteria.scores(params, specs, "l2")

    def select(self, scores, params: Params, inputs: PruneInputs, target: Target) -> Masks:
        try:
            return criteria.select(
                scores, target.specs, params, inputs.keep_ratio, scope=self.scope, round_to=self.round_to
            )
        except ValueError as e:
            raise UserError(f"{self.name} cannot prune {target.model_name}: {e}") from None

    def prune(self, inputs: PruneInputs, target: Target) -> tuple[Params, Masks]:
        params = inputs.params
        if inputs.gates is not None:  # fold the trained gates into the weights first
            params = gates.fold(params, self.gate_values(inputs.gates), target.specs)
        scores = without(self.scores(params, target.specs, inputs.gates, target), inputs.alive)
        masks = self.select(scores, params, inputs, target)
        return masking.apply_masks(params, masks), masks


def without(scores: dict[str, Any], alive: dict[str, np.ndarray] | None) -> dict[str, jax.Array]:
    """Scores with channels already removed (``alive`` False) at minus infinity, so they stay removed."""
    if not alive:
        return scores
    return {k: jnp.where(jnp.asarray(alive[k]), v, -jnp.inf) if k in alive else v for k, v in scores.items()}


def keep_at_least_one(
    keep: dict[str, np.ndarray], scores: dict[str, Any], removable: set[str]
) -> dict[str, np.ndarray]:
    """Every group that may not vanish keeps at least its best channel."""
    out = {}
    for k, v in keep.items():
        v = np.asarray(v, bool).copy()
        if not v.any() and k not in removable:
            v[int(np.argmax(np.asarray(scores[k])))] = True
        out[k] = v
    return out


def non_negative(value: Any, name: str) -> float:
    """``value`` as a float, or ``UserError`` if it is not a finite non-negative number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UserError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


# --- the registry ------------------------------------------------------------------

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: registers a :class:`Method` under ``name``."""

    def add(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"a method named {name!r} is registered already")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return add


def registered() -> dict[str, type[Method]]:
    """``{name: Method subclass}`` of every registered method, in registration order."""
    return dict(_REGISTRY)


def names() -> tuple[str, ...]:
    """The registered methods' names, in registration order."""
    return tuple(_REGISTRY)


def build(name: str, values: Values) -> Method:
    """The method ``name``, built from a run's plain values.

    Raises:
      UserError: for an unknown name or a bad value of the method's settings.
    """
    if name not in _REGISTRY:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name].from_values(values)
