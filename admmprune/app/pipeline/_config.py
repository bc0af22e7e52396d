"""The config, read once: checked, then turned into typed :class:`Settings`.

Nothing below :func:`admmprune.app.pipeline.run` sees the ``ConfigDict``: the
run, its steps and its phases take these settings, and the method is built
from plain values (:func:`admmprune.app.methods.build`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from ml_collections import ConfigDict

from admmprune._errors import UserError
from admmprune.app import methods as methods_lib
from admmprune.app.methods import Method, Optimizer, Phase
from admmprune.core import schedules
from admmprune.core.sparsity import Block, Column, NofM, Spec, Unstructured
from admmprune.models import names as model_names
from admmprune.runtime.data import AUGMENTATIONS

SCHEDULES = ("constant", "cosine")
#: The choices of ``prune.sparsity``: channel groups, or a set on every pruned kernel.
SPARSITIES = ("channel", "unstructured", "nm", "column", "block")
# The prune fields a channel run does not read: left out of what a channel
# run's workdir records, so that runs recorded before they existed still match.
_SPARSITY_KEYS = ("sparsity", "n", "m", "block")
# Config fields that do not change results: a rerun may differ in them (a run
# may resume on another number of devices, or with another sharding).
RUNTIME_KEYS = ("progress", "distributed")
# The config sections the methods are built from (as plain dicts).
_METHOD_SECTIONS = ("prune", "admm", "magnitude", "l1_mask", "slimming", "group_lasso", "relaxation")
# The loaders' seeds are seed * 1000 + phase + 1, and must stay below 2**32.
MAX_SEED = (2**32 - 1000) // 1000


@dataclasses.dataclass(frozen=True)
class Training:
    """One kind of phase's training: its learning rate, schedule and warm-up."""

    learning_rate: float
    schedule: str
    #: Fraction of the phase's steps over which the rate rises linearly from 0.
    warmup: float = 0.0


@dataclasses.dataclass(frozen=True)
class Data:
    """Where the examples come from and how they are batched."""

    name: str
    data_dir: str | None
    train_split: str
    eval_split: str
    batch_size: int
    eval_batch_size: int
    limit: int | None
    eval_limit: int | None
    augment: tuple[str, ...]
    normalize: bool


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a run needs to know, typed; built by :func:`settings`."""

    seed: int
    model: str
    data: Data
    optimizer: Optimizer
    dense_epochs: int
    #: A saved dense model to start from (``dense.init``), or None: train one.
    dense_init: str | None
    epochs_per_stage: int
    retrain_epochs: int
    dense: Training
    stage: Training  # the admm, sparsify and finetune phases
    retrain: Training
    #: ``(weight, temperature)`` of distillation from the dense model in the masked phases; weight 0: off.
    distill: tuple[float, float]
    ratio: float
    stages: tuple[float, ...]
    #: ``prune.sparsity``: ``"channel"`` or the kind of ``kernel_spec``.
    sparsity: str
    #: The spec of every pruned kernel (:func:`kernel_spec`); None: channel groups.
    kernel_spec: Spec | None
    method: Method
    method_name: str
    measure_batch_size: int
    measure_repeats: int
    param_sharding: str
    log_every: int
    checkpoint_every: int | None
    progress: bool
    #: The config as JSON, without its runtime fields: what a workdir records.
    comparable: dict[str, Any]

    def training(self, phase: Phase) -> Training:
        """The learning rate and schedule of ``phase``."""
        if phase.kind == "dense":
            return self.dense
        return self.retrain if phase.kind == "retrain" else self.stage


def _positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise UserError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return value


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _method_values(config: ConfigDict) -> methods_lib.Values:
    values = {k: dict(config[k]) for k in _METHOD_SECTIONS}
    values["run"] = {"seed": config.seed}
    return values


def check_config(config: ConfigDict) -> tuple[float, ...]:
    """Validates the config; returns the stage ratios.

    Every registered method is built from the config's values, so a bad
    value of any method's settings is refused, whichever method runs.

    Raises:
      UserError: naming the first bad field and what it should be.
    """
    seed = config.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    augment = config.data.augment
    if not isinstance(augment, str) or any(a and a not in AUGMENTATIONS for a in augment.split(",")):
        raise UserError(
            f"data.augment must be comma-separated names from {', '.join(AUGMENTATIONS)} (or empty), got {augment!r}"
        )
    ratio = config.prune.ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise UserError(f"the pruning ratio must be a number in (0, 1), got {ratio!r}")
    if config.model.name not in model_names():
        raise UserError(f"unknown model {config.model.name!r}; choose from {', '.join(model_names())}")
    if config.model.name == "unet":
        raise UserError("unet is a segmentation model; this pipeline trains image classifiers (choose another model)")
    methods_lib.build(config.prune.method, _method_values(config))
    for name in methods_lib.METHODS:
        methods_lib.build(name, _method_values(config))
    for phase in ("dense", "admm", "retrain"):
        if getattr(config, phase).schedule not in SCHEDULES:
            raise UserError(f"{phase}.schedule must be one of {SCHEDULES}, got {getattr(config, phase).schedule!r}")
        _positive_float(getattr(config, phase).learning_rate, f"{phase}.learning_rate")
    _positive_int(config.dense.epochs, "dense.epochs")
    if not isinstance(config.dense.init, str):
        raise UserError(f"dense.init must be a path (or empty), got {config.dense.init!r}")
    warmup = config.dense.warmup
    if isinstance(warmup, bool) or not isinstance(warmup, int | float) or not 0 <= warmup < 1:
        raise UserError(f"dense.warmup must be a fraction of the phase in [0, 1), got {warmup!r}")
    distill = config.retrain.distill
    if isinstance(distill, bool) or not isinstance(distill, int | float) or not 0 <= distill <= 1:
        raise UserError(f"retrain.distill must be a weight in [0, 1], got {distill!r}")
    _positive_float(config.retrain.temperature, "retrain.temperature")
    _positive_int(config.admm.epochs_per_stage, "admm.epochs_per_stage")
    _positive_int(config.retrain.epochs, "retrain.epochs", allow_zero=True)
    _positive_int(config.admm.interval, "admm.interval")
    _positive_int(config.prune.round_to, "prune.round_to")
    if config.prune.budget == "macs" and config.prune.method != "admm":
        raise UserError(f"prune.budget=macs works with --method admm only, not {config.prune.method}")
    _positive_int(config.data.batch_size, "data.batch_size")
    _positive_int(config.data.eval_batch_size, "data.eval_batch_size")
    _positive_int(config.log_every, "log_every")
    _positive_int(config.measure.batch_size, "measure.batch_size")
    _positive_int(config.measure.repeats, "measure.repeats")
    if config.checkpoint_every is not None:
        _positive_int(config.checkpoint_every, "checkpoint_every")
    _positive_float(config.admm.rho, "admm.rho")
    _positive_float(config.admm.rho_factor, "admm.rho_factor")
    _positive_float(config.admm.max_rho, "admm.max_rho")
    spec = kernel_spec(config)
    if isinstance(spec, NofM):  # a fixed set: one stage, removing 1 - n/m
        return (1.0 - spec.n / spec.m,)
    try:
        return schedules.stage_ratios(float(ratio), config.prune.stages)
    except ValueError as e:
        raise UserError(str(e)) from None


def kernel_spec(config: ConfigDict) -> Spec | None:
    """The spec of every pruned kernel under ``prune.sparsity``; None for channel groups.

    With ``prune.scope="global"`` the kernels' specs share a group name: their
    weights (columns, blocks) are ranked together.

    Raises:
      UserError: an unknown kind, a method that cannot prune to it, or
        settings that belong to channel pruning (``prune.budget=macs``,
        ``prune.round_to``) or do not fit the kind.
    """
    p = config.prune
    kind = p.sparsity
    if kind not in SPARSITIES:
        raise UserError(f"prune.sparsity must be one of {', '.join(SPARSITIES)}, got {kind!r}")
    if kind == "channel":
        return None
    methods_lib.build(p.method, _method_values(config)).check_sparsity(kind)
    if p.budget != "channels":
        raise UserError(
            f"prune.budget={p.budget} is a budget of channels; --sparsity {kind} needs prune.budget=channels"
        )
    if p.round_to != 1:
        raise UserError(f"prune.round_to rounds kept channels; --sparsity {kind} needs prune.round_to=1")
    group = "kernels" if p.scope == "global" else None
    if kind == "unstructured":
        return Unstructured(group=group)
    if kind == "column":
        return Column(group=group)
    if kind == "block":
        shape = p.block
        if (
            not isinstance(shape, (tuple, list))
            or not 1 <= len(shape) <= 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in shape)
        ):
            raise UserError(
                "prune.block must be one or two positive integers (the tile on a kernel's input and output "
                f"axes), got {shape!r}"
            )
        return Block(tuple(shape), group=group)
    n, m = _positive_int(p.n, "prune.n"), _positive_int(p.m, "prune.m")
    if n >= m:
        raise UserError(f"prune.n must be below prune.m (at most n non-zeros in every m weights), got {n}:{m}")
    if p.stages is not None:
        raise UserError("prune.stages does not apply to --sparsity nm: its set is fixed (one stage); leave it unset")
    return NofM(n, m)


def comparable(config: ConfigDict) -> dict[str, Any]:
    """The config as JSON without the fields that do not change results."""
    d = json.loads(config.to_json_best_effort(sort_keys=True))
    for key in RUNTIME_KEYS:
        d.pop(key, None)
    # Fields added later, at the value that keeps a run as it was before them,
    # stay out: a workdir of an earlier version still resumes.
    prune = d.get("prune", {})
    if prune.get("sparsity") == "channel":
        for key in _SPARSITY_KEYS:
            prune.pop(key, None)
    if d.get("admm", {}).get("penalty") == "all":
        del d["admm"]["penalty"]
    if d.get("retrain", {}).get("distill") == 0:
        del d["retrain"]["distill"], d["retrain"]["temperature"]
    return d


def settings(config: ConfigDict) -> Settings:
    """Checks ``config`` and reads it into :class:`Settings`, once.

    Raises:
      UserError: for a bad value (see :func:`check_config`).
    """
    stages = check_config(config)
    c = config
    d = c.data
    spec = kernel_spec(c)
    return Settings(
        seed=c.seed,
        model=c.model.name,
        data=Data(
            name=d.name,
            data_dir=d.data_dir,
            train_split=d.train_split,
            eval_split=d.eval_split,
            batch_size=d.batch_size,
            eval_batch_size=d.eval_batch_size,
            limit=d.limit,
            eval_limit=d.eval_limit,
            augment=tuple(a for a in d.augment.split(",") if a),
            normalize=d.normalize,
        ),
        optimizer=Optimizer(c.optimizer.momentum, c.optimizer.weight_decay),
        dense_epochs=0 if c.dense.init else c.dense.epochs,
        dense_init=os.path.abspath(os.path.expanduser(c.dense.init)) if c.dense.init else None,
        epochs_per_stage=c.admm.epochs_per_stage,
        retrain_epochs=c.retrain.epochs,
        dense=Training(float(c.dense.learning_rate), c.dense.schedule, float(c.dense.warmup)),
        stage=Training(float(c.admm.learning_rate), c.admm.schedule),
        retrain=Training(float(c.retrain.learning_rate), c.retrain.schedule),
        distill=(float(c.retrain.distill), float(c.retrain.temperature)),
        ratio=stages[-1] if isinstance(spec, NofM) else float(c.prune.ratio),
        stages=stages,
        sparsity=c.prune.sparsity,
        kernel_spec=spec,
        method=methods_lib.build(c.prune.method, _method_values(c)),
        method_name=c.prune.method,
        measure_batch_size=c.measure.batch_size,
        measure_repeats=c.measure.repeats,
        param_sharding=c.distributed.param_sharding,
        log_every=c.log_every,
        checkpoint_every=c.checkpoint_every,
        progress=c.progress,
        comparable=comparable(c),
    )


def plan_phases(config: ConfigDict | Settings, stages: tuple[float, ...] | None = None) -> list[Phase]:
    """The phases of a run, in order: the dense phase, then the method's."""
    s = config if isinstance(config, Settings) else settings(config)
    stages = s.stages if stages is None else stages
    return [Phase("dense", s.dense_epochs), *s.method.phases(stages, s.epochs_per_stage, s.retrain_epochs)]
