"""The prune pipeline: dense training, ADMM stages, hard prune, retraining (L5).

``run(config, workdir)`` is what ``python -m admmprune.train`` calls, and what a
notebook calls. It is the only reader of the config. It writes to ``workdir``:

- ``config.json``: the config of the run (a workdir holds one run);
- ``plan.txt``: every parameter and its sparsity spec;
- ``checkpoints/``: orbax checkpoints with the data iterator's position;
- ``metrics.jsonl``: per-step training metrics (loss, accuracy, ADMM residual, rho);
- ``model/``: the collapsed model (``admmprune.load`` rebuilds it);
- ``report.json``: the results, written last, atomically.

A rerun of the same command resumes from the latest checkpoint (after a crash
or ``kill -9``) and ends with the same report as an uninterrupted run; a rerun
of a finished run says so and changes nothing.

Training steps run data-parallel over every device of every process
(:mod:`admmprune.runtime.distributed`); the work between them (evaluation, pruning,
collapse, measurements) runs on whole arrays that every process holds, and only
process 0 writes files other than checkpoints.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import inspect
import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict
from tqdm import tqdm

import admmprune as ap
from admmprune.runtime import checkpoint as checkpoint_lib
from admmprune.structure import collapse as collapse_lib
from admmprune.structure import costs, criteria, discovery, gates, graph, measure
from admmprune.runtime import distributed
from admmprune.app import methods
from admmprune import models
from admmprune.runtime import data as data_lib
from admmprune._errors import UserError
from admmprune.runtime.checkpoint import Checkpointer

METHODS = methods.METHODS
SCHEDULES = ("constant", "cosine")
RHO_SCHEDULES = ("constant", "geometric", "balancing")
# Config fields that do not change results: a rerun may differ in them (a run
# may resume on another number of devices, or with another sharding).
_RUNTIME_KEYS = ("progress", "distributed")


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


# --- config ---------------------------------------------------------------------


def _positive_int(value: Any, name: str, *, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise UserError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")
    return value


def _positive_float(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_config(config: ConfigDict) -> tuple[float, ...]:
    """Validates the config; returns the stage ratios.

    Raises:
      UserError: naming the first bad field and what it should be.
    """
    ratio = config.prune.ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise UserError(f"the pruning ratio must be a number in (0, 1), got {ratio!r}")
    if config.model.name not in models.names():
        raise UserError(f"unknown model {config.model.name!r}; choose from {', '.join(models.names())}")
    if config.model.name == "unet":
        raise UserError("unet is a segmentation model; this pipeline trains image classifiers (choose another model)")
    methods.check(config)
    for phase in ("dense", "admm", "retrain"):
        if getattr(config, phase).schedule not in SCHEDULES:
            raise UserError(f"{phase}.schedule must be one of {SCHEDULES}, got {getattr(config, phase).schedule!r}")
        _positive_float(getattr(config, phase).learning_rate, f"{phase}.learning_rate")
    if config.admm.rho_schedule not in RHO_SCHEDULES:
        raise UserError(f"admm.rho_schedule must be one of {RHO_SCHEDULES}, got {config.admm.rho_schedule!r}")
    _positive_int(config.dense.epochs, "dense.epochs")
    _positive_int(config.admm.epochs_per_stage, "admm.epochs_per_stage")
    _positive_int(config.retrain.epochs, "retrain.epochs", allow_zero=True)
    _positive_int(config.admm.interval, "admm.interval")
    _positive_int(config.prune.round_to, "prune.round_to")
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
    try:
        return ap.stage_ratios(float(ratio), config.prune.stages)
    except ValueError as e:
        raise UserError(str(e)) from None


def plan_phases(config: ConfigDict, stages: tuple[float, ...]) -> list[Phase]:
    """The phases of a run, in order."""
    phases = [Phase("dense", config.dense.epochs)]
    method, per_stage = config.prune.method, config.admm.epochs_per_stage
    if method == "admm":
        phases += [Phase("admm", per_stage, r) for r in stages]
    elif method == "magnitude" and config.magnitude.iterative:
        phases += [Phase("finetune", per_stage, r) for r in stages]
    elif method in methods.SPARSIFYING:
        phases.append(Phase("sparsify", per_stage * len(stages), stages[-1]))
    else:  # one-shot magnitude pruning, fine-tuned for the same number of epochs
        return [*phases, Phase("retrain", per_stage * len(stages) + config.retrain.epochs, stages[-1])]
    phases.append(Phase("retrain", config.retrain.epochs, stages[-1]))
    return phases


def _comparable(config: ConfigDict) -> dict[str, Any]:
    d = json.loads(config.to_json_best_effort(sort_keys=True))
    for key in _RUNTIME_KEYS:
        d.pop(key, None)
    return d


# --- the workdir ----------------------------------------------------------------


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _claim_workdir(config: ConfigDict, workdir: str) -> dict[str, Any] | None:
    """Checks the workdir holds this run or none; returns a finished report."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} exists and is not a directory")
    config_path = os.path.join(workdir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            saved = {k: v for k, v in json.load(f).items() if k not in _RUNTIME_KEYS}
        mine = _comparable(config)
        if saved != mine:
            diff = sorted(_diff_keys(saved, mine))
            raise UserError(
                f"workdir {workdir} holds a run with a different config (differs in: "
                f"{', '.join(diff[:5])}{', ...' if len(diff) > 5 else ''}); "
                "use another --workdir, or rerun with the same config to resume"
            )
        report_path = os.path.join(workdir, "report.json")
        if os.path.exists(report_path):
            with open(report_path) as f:
                return json.load(f)
        return None
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise UserError(f"workdir {workdir} is not empty and holds no admmprune run; use another --workdir")
    os.makedirs(workdir, exist_ok=True)
    _write_json_atomic(config_path, _comparable(config))
    return None


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class _MetricsLog:
    """Appends JSON lines; on resume, drops lines after the restored step."""

    def __init__(self, path: str, resume_step: int | None, *, enabled: bool = True):
        self.path, self._file = path, None
        if not enabled:  # another process than 0: it writes no files
            return
        if os.path.exists(path):
            keep = []
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a crash
                        continue
                    if resume_step is not None and record.get("step", 0) <= resume_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            with open(path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# --- model and optimizers -------------------------------------------------------


def _learning_rate(phase_config: ConfigDict, total_steps: int) -> optax.Schedule | float:
    lr = float(phase_config.learning_rate)
    if phase_config.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, max(total_steps, 1))
    return lr


def _sgd(config: ConfigDict, learning_rate) -> optax.GradientTransformation:
    return optax.chain(
        optax.add_decayed_weights(config.optimizer.weight_decay),
        optax.sgd(learning_rate, momentum=config.optimizer.momentum or None),
    )


def _weights_and_gates(trainable):
    """Labels of a ``(params, gates)`` pair for ``optax.multi_transform``."""
    params, g = trainable
    return jax.tree.map(lambda _: "weights", params), jax.tree.map(lambda _: "gates", g)


def _rho_schedule(config: ConfigDict) -> ap.schedules.RhoSchedule:
    a = config.admm
    if a.rho_schedule == "geometric":
        return ap.geometric_rho(a.rho_factor, max_rho=a.max_rho)
    if a.rho_schedule == "balancing":
        return ap.residual_balancing_rho(max_rho=a.max_rho)
    return ap.constant_rho()


def _make_tx(config, phase: Phase, specs, steps: int, masks=None, *, gated: bool = False) -> optax.GradientTransformation:
    if phase.kind == "dense":
        return _sgd(config, _learning_rate(config.dense, steps))
    if phase.kind == "admm":
        return optax.chain(
            ap.admm(specs, rho=config.admm.rho, interval=config.admm.interval, rho_schedule=_rho_schedule(config),
                    round_to=config.prune.round_to),
            _sgd(config, _learning_rate(config.admm, steps)),
        )
    if phase.kind == "sparsify":
        lr = _learning_rate(config.admm, steps)
        if gated:  # the (params, gates) pair; gates have their own penalty instead of weight decay
            if config.prune.method == "relaxation":  # Adam: the budget's gradient scale varies by layer
                gate_tx = optax.adam(config.relaxation.gate_learning_rate)
            else:
                gate_tx = optax.sgd(lr, momentum=config.optimizer.momentum or None)
            return optax.multi_transform({"weights": _sgd(config, lr), "gates": gate_tx}, _weights_and_gates)
        return methods.sparsify_tx(config, specs, _sgd(config, lr), lr)
    section = config.admm if phase.kind == "finetune" else config.retrain
    return optax.chain(_sgd(config, _learning_rate(section, steps)), ap.keep_masked(masks))


def _admm_metrics(opt_state) -> dict[str, jax.Array]:
    """Mean primal residual and largest rho, computed inside the jitted step."""
    state = ap.find_state(opt_state)
    primal = jax.tree.leaves(state.primal_residual)
    return {"primal_residual": sum(primal) / len(primal), "rho": jnp.max(jnp.stack(jax.tree.leaves(state.rho)))}


def _make_train_step(graphdef, tx, *, admm_metrics: bool = False, gated=None, shardings=None):
    """The jitted step; ``gated=(effective, penalty)`` trains a ``(params, gates)`` pair:
    the model runs on ``effective(params, gates)`` and ``penalty(gates)`` joins the loss.
    ``shardings=(state, batch, replicated)``: the shardings of ``(trainable, rest,
    opt_state)``, of the batch, and of the metrics."""

    def loss_fn(trainable, rest, batch):
        params, extra = trainable, jnp.zeros((), jnp.float32)
        if gated is not None:
            effective, penalty = gated
            params, extra = effective(*trainable), penalty(trainable[1])
        # copy=True: fresh Variables, so BatchNorm may update its statistics
        # inside this (grad) trace.
        model = nnx.merge(graphdef, params, rest, copy=True)
        logits = model(batch["image"])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        _, _, rest = nnx.split(model, nnx.Param, ...)
        return loss + extra, (rest, logits, loss, extra)

    sharded = {}
    if shardings is not None:
        state, batch_sharding, replicated = shardings
        sharded = {"in_shardings": (*state, batch_sharding), "out_shardings": (*state, replicated)}

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2), **sharded)
    def step(trainable, rest, opt_state, batch):
        (_, (rest, logits, loss, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable, rest, batch)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        accuracy = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
        metrics = {"loss": loss, "accuracy": accuracy}
        if gated is not None:
            metrics["penalty"] = extra
        if admm_metrics:
            metrics.update(_admm_metrics(opt_state))
        return trainable, rest, opt_state, metrics

    return step


def _make_eval(graphdef):
    @jax.jit
    def correct(params, rest, images, labels):
        logits = nnx.merge(graphdef, params, rest)(images)
        return jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.int32))

    return correct


# --- the run --------------------------------------------------------------------


class _Run:
    """Everything one run holds; the phases mutate params/rest/opt_state."""

    def __init__(self, config: ConfigDict, workdir: str, log: Callable[[str], None]):
        self.config, self.workdir, self.log = config, workdir, log
        c = config
        info = data_lib.dataset_info(c.data.name, c.data.data_dir)
        self.info = info
        # A limit reads only that slice of the split (tfds slicing), not all of it.
        self.train_source = data_lib.load_source(c.data.name, _sliced(c.data.train_split, c.data.limit), c.data.data_dir)
        self.eval_source = data_lib.load_source(c.data.name, _sliced(c.data.eval_split, c.data.eval_limit), c.data.data_dir)
        self.normalize = (info.mean, info.std) if c.data.normalize and info.mean is not None else None
        self.model = models.get(c.model.name, **_input_kwargs(c.model.name, info), rngs=nnx.Rngs(c.seed))
        self.example = jax.ShapeDtypeStruct((1, *info.image_shape), jnp.float32)
        self.model.eval()  # a graph definition in evaluation mode (BatchNorm running statistics)
        self.eval_graphdef = nnx.split(self.model, nnx.Param, ...)[0]
        self.model.train()
        self.graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        self.params, self.rest = params, rest
        if getattr(self.model, "chain", None) is not None:  # a declaration overrides discovery
            self.specs, self.state_specs = graph.chain_specs(params, self.model.chain), None
        else:
            found = discovery.discover_nnx(self.model, self.example)
            self.specs, self.state_specs = found.specs, found.state_specs
            for name, reasons in found.unprunable.items():
                log(f"not pruned: {name} ({'; '.join(reasons)})")
        if c.prune.method == "magnitude" and c.prune.criterion == "bn_scale" and not gates.norm_scales(self.specs):
            raise UserError(f"prune.criterion bn_scale needs normalization layers, and {c.model.name} has none")
        self.dist = distributed.DataParallel(param_sharding=c.distributed.param_sharding)
        # data.batch_size is the global batch; this process reads its share of it.
        self.local_batch_size = self.dist.local_batch_size(c.data.batch_size)
        n_train = len(self.train_source)
        self.steps_per_epoch = n_train // jax.process_count() // self.local_batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f"data.batch_size {c.data.batch_size} is larger than the {n_train} training examples")
        self.evaluate_fn = _make_eval(self.eval_graphdef)
        self.opt_state = None
        self.masks = None
        self.gates = None  # per-channel gates (or logits) while a gated method trains them
        self._budget = None

    def gated(self, phase: Phase) -> bool:
        """Whether ``phase`` trains gates next to the weights."""
        return phase.kind == "sparsify" and methods.uses_gates(self.config, self.specs)

    def gate_fns(self):
        """``(effective, penalty)`` of the gated step: the gated params, and the loss term."""
        config, specs = self.config, self.specs

        def effective(params, g):
            return gates.apply(params, methods.gate_values(config, g), specs)

        macs_model = target = None
        if config.prune.method == "relaxation":
            if self._budget is None:
                macs = costs.layer_macs(self.model, jnp.zeros(self.example.shape, self.example.dtype))
                self._budget = methods.budget(config, self.params, specs, macs)
            macs_model, target = self._budget
        return effective, methods.penalty(config, macs_model, target)

    def effective_params(self):
        """The parameters the model computes with: gated while gates train."""
        if self.gates is None:
            return self.params
        return gates.apply(self.params, methods.gate_values(self.config, self.gates), self.specs)

    # data
    def loader(self, phase_index: int, epochs: int, *, whole: bool = False):
        """Training batches: this process's share of each global batch, or
        (``whole``, for host-side work that every process repeats) all of it."""
        c = self.config
        augment = tuple(a for a in c.data.augment.split(",") if a)
        shard = {"shard_index": 0, "shard_count": 1} if whole else {}
        return data_lib.make_loader(
            self.train_source, batch_size=c.data.batch_size if whole else self.local_batch_size,
            seed=c.seed * 1000 + phase_index + 1, num_epochs=epochs, normalize=self.normalize, augment=augment,
            **shard,
        )

    def evaluate(self, params=None, *, model=None) -> float:
        """Accuracy on the eval split of the current params, or of another ``model``."""
        c = self.config
        if model is None:
            fn, args = self.evaluate_fn, (self.params if params is None else params, self.rest)
        else:
            model.eval()
            graphdef, p, rest = nnx.split(model, nnx.Param, ...)
            fn, args = _make_eval(graphdef), (p, rest)
        loader = data_lib.make_loader(
            self.eval_source, batch_size=c.data.eval_batch_size, seed=0, shuffle=False,
            drop_remainder=False, normalize=self.normalize, shard_index=0, shard_count=1,
        )
        correct = total = 0
        for batch in loader:
            correct += int(fn(*args, batch["image"], batch["label"]))
            total += len(batch["label"])
        return correct / total

    def measure(self, model: nnx.Module, *, latency: bool = True) -> dict[str, Any]:
        """Params, per-example FLOPs (XLA's count) and eval-mode latency of ``model``."""
        c = self.config
        model.eval()
        _, params, _ = nnx.split(model, nnx.Param, ...)
        out = {"params": measure.count_params(params), "flops": measure.flops(model, self.example)}
        if latency:
            x = jnp.zeros((c.measure.batch_size, *self.info.image_shape), jnp.float32)
            out["latency_ms"] = measure.latency_ms(model, x, repeats=c.measure.repeats)["median"]
        return out


def _input_kwargs(name: str, info) -> dict[str, Any]:
    """Constructor arguments that fit a model to the dataset's images and classes."""
    params = inspect.signature(models.get_class(name).__init__).parameters
    kwargs: dict[str, Any] = {"num_classes": info.num_classes}
    if "in_shape" in params:
        kwargs["in_shape"] = tuple(info.image_shape)
    elif "in_features" in params:
        kwargs["in_features"] = int(np.prod(info.image_shape))
    return kwargs


def _sliced(split: str, limit: int | None) -> str:
    if limit is None:
        return split
    if "[" in split:
        raise UserError(f"data.limit cannot be combined with the sliced split {split!r}; slice the split instead")
    return f"{split}[:{limit}]"


def _all_true(specs, params):
    return jax.tree.map(
        lambda s, p: None if s is None else jnp.ones(p.shape, jnp.bool_), specs, params, is_leaf=ap.sparsity.is_spec
    )


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


STOP_AFTER = (None, "dense")


def run(
    config: ConfigDict, workdir: str, *, log: Callable[[str], None] | None = None, stop_after: str | None = None
) -> dict[str, Any]:
    """Runs (or resumes, or reports as finished) the pipeline of ``config``.

    Args:
      config: a config like ``admmprune/configs/default.py``'s.
      workdir: the run's directory; created if missing.
      log: where the summary lines go (default: print to stdout).
      stop_after: ``"dense"`` returns once the dense model is trained and saved
        to ``workdir/dense`` (what ``python -m admmprune.analyze --config``
        uses); a later call without it resumes the same run from there.

    Returns:
      The report dict, as written to ``workdir/report.json``; with
      ``stop_after="dense"`` the report so far (``dense`` filled in), which
      is not written.

    Raises:
      UserError: for a bad config, a workdir that holds another run, data
        that cannot be had, or a loss that became NaN or infinite.
    """
    # Only process 0 of a multi-process run prints and writes files.
    log = log or (lambda line: print(line, flush=True) if distributed.is_primary() else None)
    if stop_after not in STOP_AFTER:
        raise ValueError(f"stop_after must be one of {STOP_AFTER}, got {stop_after!r}")
    stages = check_config(config)
    workdir = os.path.abspath(workdir)
    t_start = time.perf_counter()
    # Data and model first: a run that cannot start must not claim the workdir.
    r = _Run(config, workdir, log)
    distributed.check_same(json.dumps(_comparable(config), sort_keys=True) + workdir, "configs or workdirs")
    finished = distributed.primary_first(lambda: _claim_workdir(config, workdir))
    if finished is not None:
        log(f"run in {workdir} is complete: {os.path.join(workdir, 'report.json')}")
        return finished

    phases = plan_phases(config, stages)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "plan.txt"), "w") as f:
            f.write(ap.format_plan(r.params, r.specs) + "\n")
    groups = graph.group_widths(r.params, r.specs)
    log(
        f"{config.model.name} on {config.data.name}, method {config.prune.method}, ratio {config.prune.ratio:g}, "
        f"stages {' -> '.join(f'{s:g}' for s in stages)}; pruned groups "
        + ", ".join(f"{g} ({t})" for g, (_, t) in groups.items())
    )

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    report: dict[str, Any] = {
        "model": config.model.name,
        "dataset": config.data.name,
        "method": config.prune.method,
        "ratio": float(config.prune.ratio),
        "stage_ratios": list(stages),
        "dense": None,
        "pruned": None,
        "layers": None,
        "stages": [],
        "retrain": None,
    }
    start_phase, start_step, elapsed_before, data_state = 0, 0, 0.0, None
    latest = ckpt.latest_step()
    if latest is not None:
        meta = ckpt.restore_metadata()
        start_phase, start_step = meta["phase"], meta["phase_step"]
        report, elapsed_before = meta["report"], meta["elapsed"]
        log(f"resuming from checkpoint step {latest} ({phases[start_phase].name}, step {start_step})")
    metrics = _MetricsLog(os.path.join(workdir, "metrics.jsonl"), latest if latest is not None else 0,
                          enabled=distributed.is_primary())
    global_step = latest or 0

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    def save(phase_index: int, phase_step: int, step: int, data_state) -> None:
        if ckpt.latest_step() is not None and ckpt.latest_step() >= step:
            return
        if not _finite(r.params):
            raise UserError(
                f"the parameters are not finite at step {step}; stopped, and the last good "
                f"checkpoint stays in {workdir}: lower the learning rate or rho and use a new --workdir"
            )
        state = {"params": r.params, "rest": r.rest, "opt_state": r.opt_state}
        if r.gates is not None:
            state["gates"] = r.gates
        state = r.dist.put(state)  # every process saves its shards
        meta = {"phase": phase_index, "phase_step": phase_step, "report": report, "elapsed": elapsed(),
                "widths": list(r.model.widths)}
        ckpt.save(step, state, data_state=data_state, metadata=meta)

    dense_dir = os.path.join(workdir, "dense")
    try:
        for i, phase in enumerate(phases):
            if stop_after == "dense" and i > 0:
                log(f"dense model in {dense_dir}")
                return report
            if i < start_phase:
                continue
            steps = phase.epochs * r.steps_per_epoch
            resuming = i == start_phase and latest is not None
            t_phase = elapsed()
            # The masks live in keep_masked's state, so all-True ones give the same step.
            gated = r.gated(phase)
            tx = _make_tx(config, phase, r.specs, steps, _all_true(r.specs, r.params), gated=gated)
            if resuming:
                r.gates = methods.init_gates(config, r.params, r.specs) if gated else None
                trainable = (r.params, r.gates) if gated else r.params
                target = {"params": r.params, "rest": r.rest, "opt_state": jax.eval_shape(tx.init, trainable)}
                if gated:
                    target["gates"] = r.gates
                restored = ckpt.restore(r.dist.abstract(target))
                state = r.dist.local(restored.state)
                r.params, r.rest, r.opt_state = (state[k] for k in ("params", "rest", "opt_state"))
                r.gates = state.get("gates")
                data_state = restored.data_state
                if start_step >= steps:  # the phase had ended: on to the next one
                    continue
            else:
                _begin_phase(r, phase, phases, i, config)
            global_step = _train_phase(r, i, phase, tx, steps, start_step if resuming else 0, data_state,
                                       global_step, metrics, save, elapsed)
            _finish_phase(r, phase, report, elapsed() - t_phase)
            if phase.kind == "dense":
                _save_model_once(dense_dir, nnx.merge(r.graphdef, r.params, r.rest, copy=True))
            save(i, steps, global_step, None)
    finally:
        metrics.close()
        ckpt.close()

    pruned_eval = report["retrain"]["accuracy"]
    # The masks live in keep_masked's state (the jitted step donated earlier buffers).
    r.masks = ap.find_state(r.opt_state, ap.MaskedState).masks
    trained = nnx.merge(r.graphdef, r.params, r.rest, copy=True)
    slim = collapse_lib.collapse(trained, r.masks, r.specs, state_specs=r.state_specs)
    dense_m = r.measure(trained)  # the dense architecture: latency and FLOPs depend on shapes only
    slim_m = r.measure(slim)
    batch = next(iter(data_lib.make_loader(
        r.eval_source, batch_size=min(config.data.eval_batch_size, len(r.eval_source)), seed=0, shuffle=False,
        drop_remainder=False, normalize=r.normalize, shard_index=0, shard_count=1,
    )))
    trained.eval()
    diff = float(jnp.max(jnp.abs(trained(batch["image"]) - slim(batch["image"]))))
    report["pruned"] = {"accuracy": pruned_eval, "params": slim_m["params"], "flops": slim_m["flops"]}
    report["collapsed"] = {"accuracy": r.evaluate(model=slim), **slim_m, "max_abs_diff": diff,
                           "latency_batch": config.measure.batch_size}
    report["dense"].update(dense_m)
    report["layers"] = _kept(r, r.masks)
    report["params_removed"] = 1 - slim_m["params"] / dense_m["params"]
    report["flops_removed"] = 1 - slim_m["flops"] / dense_m["flops"]
    report["speedup"] = dense_m["latency_ms"] / slim_m["latency_ms"]
    _save_model_once(os.path.join(workdir, "model"), slim)
    report["seconds"] = elapsed()
    report["machine"] = {"platform": platform.platform(), "jax": jax.__version__,
                         "devices": f"{jax.devices()[0].platform} x{jax.device_count()}"}
    report["date"] = datetime.date.today().isoformat()
    if jax.process_index() == 0:
        _write_json_atomic(os.path.join(workdir, "report.json"), report)
    log(
        f"done: accuracy {100 * pruned_eval:.2f}% (dense {100 * report['dense']['accuracy']:.2f}%), "
        f"params -{100 * report['params_removed']:.1f}%, FLOPs -{100 * report['flops_removed']:.1f}%, "
        f"collapsed {report['speedup']:.1f}x faster (batch {config.measure.batch_size}), "
        f"{report['seconds']:.0f}s -> {os.path.join(workdir, 'report.json')}"
    )
    return report


def _save_model_once(directory: str, model: nnx.Module) -> None:
    """Saves ``model`` to ``directory`` unless it is there; a crash leaves no partial directory."""
    if jax.process_index() != 0 or os.path.exists(directory):
        return
    tmp = f"{directory}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    checkpoint_lib.save_model(tmp, model)
    os.replace(tmp, directory)


def _begin_phase(r: _Run, phase: Phase, phases: list[Phase], i: int, config) -> None:
    """The transition into phase ``i``: new optimizer state, stage edit, pruning."""
    prev = phases[i - 1] if i else None
    steps = phase.epochs * r.steps_per_epoch
    if phase.kind == "dense":
        r.opt_state = _make_tx(config, phase, r.specs, steps).init(r.params)
    elif phase.kind == "admm":
        if prev is None or prev.kind != "admm":
            r.opt_state = _make_tx(config, phase, r.specs, steps).init(r.params)
        r.opt_state = ap.set_stage(r.opt_state, 1.0 - phase.ratio)
    elif phase.kind == "sparsify":
        if r.gated(phase):
            r.gates = methods.init_gates(config, r.params, r.specs)
            r.opt_state = _make_tx(config, phase, r.specs, steps, gated=True).init((r.params, r.gates))
        else:
            r.opt_state = _make_tx(config, phase, r.specs, steps).init(r.params)
    else:  # finetune / retrain: prune, then train with the masks fixed
        r.params, r.masks = _prune(r, phase, prev)
        r.gates = None
        r.opt_state = _make_tx(config, phase, r.specs, steps, r.masks).init(r.params)


def _prune(r: _Run, phase: Phase, prev: Phase | None):
    """The method's hard prune at ``phase.ratio``: ``(params, masks)``."""
    config, keep_ratio = r.config, 1.0 - phase.ratio
    if prev is not None and prev.kind == "admm":
        support = ap.find_state(r.opt_state).support
        return ap.hard_prune(r.params, r.specs, keep_ratio, support=support, round_to=config.prune.round_to)
    params = r.params
    if r.gates is not None:  # fold the trained gates into the weights first
        params = gates.fold(params, methods.gate_values(config, r.gates), r.specs)
    grads = _taylor_grads(r, params) if config.prune.criterion == "taylor" and config.prune.method == "magnitude" else None
    scores = methods.channel_scores(config, params, r.specs, r.gates, grads=grads)
    alive = None
    if prev is not None and prev.kind == "finetune":  # removed channels stay removed
        alive = collapse_lib.alive_channels(r.specs, ap.find_state(r.opt_state, ap.MaskedState).masks)
    scores = methods.without(scores, alive)
    if config.prune.method == "relaxation":
        values = methods.gate_values(config, r.gates)
        keep = {k: np.asarray(v) >= config.relaxation.threshold for k, v in values.items()}
        removable = collapse_lib.removable_groups(r.model, r.specs, r.params)
        masks = gates.keep_masks(params, r.specs, methods.keep_at_least_one(keep, scores, removable))
    else:
        try:
            masks = criteria.select(scores, r.specs, params, keep_ratio, scope=config.prune.scope,
                                    round_to=config.prune.round_to)
        except ValueError as e:
            raise UserError(f"{config.prune.method} cannot prune {config.model.name}: {e}") from None
    return ap.apply_masks(params, masks), masks


def _taylor_grads(r: _Run, params, batches: int = 4):
    """Loss gradients of a few training batches, for the Taylor criterion."""
    from admmprune.app.analyze import taylor_grads  # scipy and friends only when asked for

    it = iter(r.loader(-1, 1))
    return taylor_grads(nnx.merge(r.graphdef, params, r.rest, copy=True), [next(it) for _ in range(batches)])


def _kept(r: _Run, masks) -> dict[str, dict[str, int]]:
    """Channels kept and in total per group, as the report's ``layers``."""
    return {g: {"kept": k, "total": t} for g, (k, t) in graph.group_widths(r.params, r.specs, masks).items()}


def _finish_phase(r: _Run, phase: Phase, report: dict[str, Any], t: float) -> None:
    """Evaluates the phase's result, adds it to the report and logs one line."""
    if phase.kind == "dense":
        acc = r.evaluate()
        report["dense"] = {"accuracy": acc, "seconds": t}
        r.log(f"dense     {phase.epochs} epochs  accuracy {100 * acc:.2f}%  [{t:.0f}s]")
    elif phase.kind == "admm":
        state = ap.find_state(r.opt_state)
        pruned, masks = ap.hard_prune(
            r.params, r.specs, 1.0 - phase.ratio, support=state.support, round_to=r.config.prune.round_to
        )
        acc, admm_acc = r.evaluate(pruned), r.evaluate()
        res = ap.residuals(state)
        rho = [float(x) for x in jax.tree.leaves(state.rho)]
        report["stages"].append({
            "ratio": phase.ratio, "accuracy": acc, "admm_accuracy": admm_acc,
            "primal_residual": res["primal_residual"], "dual_residual": res["dual_residual"],
            "rho": max(rho), "seconds": t, "layers": _kept(r, masks),
        })
        r.log(f"admm {phase.ratio:<4g} {phase.epochs} epochs  accuracy {100 * acc:.2f}% pruned "
              f"({100 * admm_acc:.2f}% before)  primal residual {res['primal_residual']:.4f}  rho {max(rho):.3g}  [{t:.0f}s]")
    elif phase.kind == "sparsify":
        acc = r.evaluate(r.effective_params())
        pruned, masks = _prune(r, phase, phase)
        pruned_acc = r.evaluate(pruned)
        entry = {"epochs": phase.epochs, "accuracy": acc, "pruned_accuracy": pruned_acc, "seconds": t}
        if r.gates is not None:
            values = np.concatenate([np.asarray(v) for v in methods.gate_values(r.config, r.gates).values()])
            if r.config.prune.method == "relaxation":
                entry["gates_open"] = float(np.mean(values >= r.config.relaxation.threshold))
                macs_model, target = r._budget
                entry["gated_macs_over_target"] = float(
                    macs_model(methods.gate_values(r.config, r.gates)) / target)
            else:
                entry["gates_below_delta"] = float(np.mean(np.abs(values) < r.config.l1_mask.delta))
        report["sparsify"] = entry
        widths = graph.group_widths(r.params, r.specs, masks)
        kept = sum(k for k, _ in widths.values()) / sum(t for _, t in widths.values())
        r.log(f"sparsify  {phase.epochs} epochs  accuracy {100 * acc:.2f}% ({100 * pruned_acc:.2f}% pruned, "
              f"{100 * kept:.1f}% of channels kept)  [{t:.0f}s]")
    elif phase.kind == "finetune":
        acc = r.evaluate()
        masks = ap.find_state(r.opt_state, ap.MaskedState).masks
        report["stages"].append({"ratio": phase.ratio, "accuracy": acc, "seconds": t, "layers": _kept(r, masks)})
        r.log(f"finetune {phase.ratio:<4g} {phase.epochs} epochs  accuracy {100 * acc:.2f}%  [{t:.0f}s]")
    else:
        acc = r.evaluate()
        report["retrain"] = {"epochs": phase.epochs, "accuracy": acc, "seconds": t}
        r.log(f"retrain   {phase.epochs} epochs  accuracy {100 * acc:.2f}%  [{t:.0f}s]")


def _train_phase(r: _Run, i, phase: Phase, tx, steps, start_step, data_state, global_step, metrics, save, elapsed) -> int:
    config = r.config
    if steps == 0:
        return global_step
    gated = r.gate_fns() if r.gates is not None else None
    # The state goes onto the mesh for the phase, and comes back whole for the
    # host-side work that follows it.
    trainable = r.dist.put((r.params, r.gates) if gated else r.params)
    r.rest, r.opt_state = r.dist.put((r.rest, r.opt_state))
    if gated:
        r.params, r.gates = trainable
    else:
        r.params = trainable
    state_shardings = r.dist.shardings((trainable, r.rest, r.opt_state))
    step_fn = _make_train_step(r.graphdef, tx, admm_metrics=phase.kind == "admm", gated=gated,
                               shardings=(state_shardings, r.dist.data, r.dist.replicated))
    it = iter(r.loader(i, phase.epochs))
    if start_step and data_state is not None:
        it.set_state(data_state)
    every = config.checkpoint_every or r.steps_per_epoch
    quiet = not config.progress or not distributed.is_primary()
    bar = tqdm(total=steps, initial=start_step, desc=phase.name, disable=quiet or None,
               leave=False, file=sys.stderr, dynamic_ncols=True)
    phase_step = start_step
    pending = []  # per-step metrics stay on the device until the next flush

    def flush():
        for s, m in jax.device_get(pending):
            record = {"step": s, "phase": phase.name, **{k: float(v) for k, v in m.items()}}
            if not math.isfinite(record["loss"]):
                raise UserError(
                    f"the loss became {record['loss']} at step {s} ({phase.name}); stopped, and the last "
                    f"good checkpoint stays in {r.workdir}: lower the learning rate or rho and use a new --workdir"
                )
            metrics.write(record)
        if pending:
            bar.set_postfix(loss=f"{record['loss']:.4f}")
        pending.clear()

    try:
        for batch in it:
            batch = r.dist.batch(batch)
            if r.gates is None:
                r.params, r.rest, r.opt_state, m = step_fn(r.params, r.rest, r.opt_state, batch)
            else:
                (r.params, r.gates), r.rest, r.opt_state, m = step_fn((r.params, r.gates), r.rest, r.opt_state, batch)
            phase_step += 1
            global_step += 1
            pending.append((global_step, m))
            bar.update(1)
            if phase_step % config.log_every == 0 or phase_step == steps:
                flush()
            if phase_step % every == 0 and phase_step < steps:
                flush()  # never checkpoint past a loss that went bad
                save(i, phase_step, global_step, it.get_state())
    finally:
        bar.close()
    r.params, r.rest, r.opt_state, r.gates = r.dist.local((r.params, r.rest, r.opt_state, r.gates))
    return global_step
