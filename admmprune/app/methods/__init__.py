"""The pruning methods the pipeline runs, side by side with ADMM (L5 helpers).

Every method starts from the same trained dense model, trains for the same
number of epochs (``admm.epochs_per_stage`` per stage of ``prune.stages``,
then ``retrain.epochs`` with the masks fixed), prunes the same coupled
channel groups and ends in the same collapse and report:

``admm``
  Progressive ADMM stages, hard prune, retrain (:func:`admmprune.core.admm.admm`).
``magnitude``
  Filter pruning by a criterion (``prune.criterion``, default ``l2``: the
  classic "prune filters by norm" baseline of Li et al. 2017, on the whole
  group), layer-wise or global (``prune.scope``). One-shot: prune the dense
  model at the final ratio and fine-tune for all the epochs. Iterative
  (``magnitude.iterative``): prune at each stage's ratio and fine-tune
  ``admm.epochs_per_stage`` epochs in between.
``l1_mask``
  A learnable scale per channel of every group (:mod:`admmprune.structure.gates`),
  trained jointly with the weights under ``loss + strength * ||m||_1``; the
  channels with the smallest ``|m|`` are removed (``prune.ratio`` of each
  group, or ranked globally), the masks are folded into the weights, and the
  rest retrains. How many masks end below ``l1_mask.delta`` is reported.
``slimming``
  Network slimming (Liu et al. 2017): L1 on the BatchNorm scales of the
  groups (:func:`admmprune.core.regularizers.bn_l1`), then removal by the
  smallest ``|gamma|``. A model without normalization (LeNet-5) gets gates
  in their place, which makes it ``l1_mask``.
``relaxation``
  Continuous relaxation of channel gates: ``g = sigmoid(s / temperature)``
  per channel (logits trained with Adam), with a budget term ``flops_weight * relu(log(MACs(g)
  / target))^2`` (gated MACs from :func:`admmprune.structure.costs.gated_macs`) and a
  polarization term ``polarization_weight * mean(g (1 - g))`` that pushes
  gates to 0 or 1. The target is the MACs of the model that keeps ``1 -
  ratio`` of every group, so the method spends the same compute as the
  others but chooses the widths itself; channels whose gate ends below
  ``relaxation.threshold`` are removed (every group keeps at least its best
  channel, except a residual branch's inner group, which may close: collapse
  then removes the branch).
``group_lasso``
  Group-sparsity regularized training: proximal SGD with block soft
  thresholding of every channel group (:func:`admmprune.core.regularizers.group_lasso_prox`),
  then removal by the smallest group norms.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from ml_collections import ConfigDict

from admmprune.structure import costs, criteria, gates
from admmprune.core import regularizers
from admmprune._errors import UserError

METHODS = ("admm", "magnitude", "l1_mask", "slimming", "relaxation", "group_lasso")
#: Methods with a regularized training phase ("sparsify") before the retrain.
SPARSIFYING = ("l1_mask", "slimming", "relaxation", "group_lasso")


def check(config: ConfigDict) -> None:
    """Validates the method-specific config fields; raises UserError."""
    method = config.prune.method
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if config.prune.criterion not in criteria.CRITERIA:
        raise UserError(f"unknown prune.criterion {config.prune.criterion!r}; choose from {', '.join(criteria.CRITERIA)}")
    if config.prune.scope not in criteria.SCOPES:
        raise UserError(f"prune.scope must be one of {criteria.SCOPES}, got {config.prune.scope!r}")
    for field in ("l1_mask.strength", "slimming.strength", "group_lasso.strength", "relaxation.temperature",
                  "relaxation.flops_weight", "relaxation.polarization_weight", "relaxation.gate_learning_rate"):
        section, key = field.split(".")
        value = config[section][key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
            raise UserError(f"{field} must be a non-negative number, got {value!r}")
    if not 0 < config.relaxation.threshold < 1:
        raise UserError(f"relaxation.threshold must be in (0, 1), got {config.relaxation.threshold!r}")


def uses_gates(config: ConfigDict, specs: Any) -> bool:
    """Whether the sparsify phase trains per-channel gates next to the weights."""
    method = config.prune.method
    if method in ("l1_mask", "relaxation"):
        return True
    return method == "slimming" and not gates.norm_scales(specs)


def init_gates(config: ConfigDict, params: Any, specs: Any) -> dict[str, jax.Array]:
    value = config.relaxation.init_logit if config.prune.method == "relaxation" else 1.0
    return gates.init(params, specs, value)


def gate_values(config: ConfigDict, g: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The multiplicative gates: the trained values, or ``sigmoid(s / T)`` for the relaxation."""
    if config.prune.method == "relaxation":
        return gates.sigmoid_gates(g, config.relaxation.temperature)
    return g


def budget(config: ConfigDict, params: Any, specs: Any, macs: dict[str, int]) -> tuple[Any, float]:
    """The gated-MACs model and its target for the relaxation (``1 - ratio`` of every group)."""
    model = functools.partial(costs.gated_macs, macs, specs=specs, params=params)
    uniform = {k: jnp.full(v.shape, 1.0 - config.prune.ratio, jnp.float32) for k, v in gates.init(params, specs).items()}
    return model, float(model(uniform))


def penalty(config: ConfigDict, macs_model=None, target: float | None = None):
    """``gates -> scalar`` added to the loss in the sparsify phase (gated methods)."""
    method = config.prune.method
    if method == "relaxation":
        rc = config.relaxation

        def relaxation(g):
            v = gate_values(config, g)
            over = jax.nn.relu(jnp.log(macs_model(v) / target))
            n = sum(x.size for x in v.values())
            return rc.flops_weight * jnp.square(over) + rc.polarization_weight * gates.polarization(v) / n

        return relaxation
    strength = config.l1_mask.strength if method == "l1_mask" else config.slimming.strength
    return lambda g: strength * gates.l1(g)


def sparsify_tx(config: ConfigDict, specs: Any, sgd: optax.GradientTransformation, learning_rate) -> Any:
    """The optimizer of the sparsify phase for the methods without gates."""
    method = config.prune.method
    if method == "group_lasso":
        lr = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
        strength = config.group_lasso.strength
        return optax.chain(sgd, regularizers.group_lasso_prox(specs, lambda count: strength * lr(count)))
    if method == "slimming":
        return optax.chain(regularizers.bn_l1(specs, config.slimming.strength), sgd)
    raise ValueError(f"{method} trains gates; it has no plain sparsify optimizer")


def channel_scores(config: ConfigDict, params: Any, specs: Any, g: dict[str, jax.Array] | None,
                   *, grads: Any = None) -> dict[str, jax.Array]:
    """Per-group channel scores that decide what the method removes (higher = keep)."""
    method = config.prune.method
    if g is not None:
        return {k: jnp.abs(v) for k, v in gate_values(config, g).items()}
    if method == "slimming":
        return criteria.scores(params, specs, "bn_scale")
    if method == "group_lasso":
        return criteria.scores(params, specs, "l2")
    key = jax.random.key(config.seed) if config.prune.criterion == "random" else None
    return criteria.scores(params, specs, config.prune.criterion, grads=grads, key=key)


def keep_at_least_one(keep: dict[str, np.ndarray], scores: dict[str, Any], removable: set[str]) -> dict[str, np.ndarray]:
    """Every group that may not vanish keeps at least its best channel."""
    out = {}
    for k, v in keep.items():
        v = np.asarray(v, bool).copy()
        if not v.any() and k not in removable:
            v[int(np.argmax(np.asarray(scores[k])))] = True
        out[k] = v
    return out


def without(scores: dict[str, Any], alive: dict[str, np.ndarray] | None) -> dict[str, jax.Array]:
    """Scores with channels already removed (``alive`` False) at minus infinity, so they stay removed."""
    if not alive:
        return scores
    return {k: jnp.where(jnp.asarray(alive[k]), v, -jnp.inf) if k in alive else v for k, v in scores.items()}


__all__ = ["METHODS", "SPARSIFYING"]
