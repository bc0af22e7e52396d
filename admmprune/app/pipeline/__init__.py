"""The prune pipeline: dense training, ADMM stages, hard prune, retraining (L5).

``run(config, workdir)`` is what ``python -m admmprune.train`` calls, and what a
notebook calls. It is the only reader of the config. It writes to ``workdir``:

- ``config.json``: the config of the run (a workdir holds one run);
- ``plan.txt``: every parameter and its sparsity spec;
- ``checkpoints/``: orbax checkpoints with the data iterator's position;
- ``metrics.jsonl``: per-step training metrics (loss, accuracy, ADMM residual, rho);
- ``model/``: the collapsed model (``admmprune.load`` rebuilds it); with a
  ``prune.sparsity`` other than channel, the masked model of the dense shapes;
- ``report.json``: the results, written last, atomically.

A rerun of the same command resumes from the latest checkpoint (after a crash
or ``kill -9``) and ends with the same report as an uninterrupted run; a rerun
of a finished run says so and changes nothing. A latest checkpoint that does
not restore is renamed ``checkpoints/<step>.damaged`` and the run resumes from
the one before it. SIGTERM (a scheduler's preemption) saves a checkpoint at the
next step and stops with ``Preempted`` (admmprune._errors) (exit status 143 from the
CLI). One process at a time runs in a workdir: ``WORKDIR/.lock`` names it.

Training steps run data-parallel over every device of every process
(:mod:`admmprune.runtime.distributed`); the work between them (evaluation, pruning,
collapse, measurements) runs on whole arrays that every process holds, and only
process 0 writes files other than checkpoints.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from admmprune._errors import ENVIRONMENT_ERRNOS, Preempted, UserError
from admmprune.app.methods import METHODS, Phase
from admmprune.app.pipeline import _phases, _timing
from admmprune.app.pipeline._config import SCHEDULES, SPARSITIES, Settings, check_config, plan_phases, settings
from admmprune.app.pipeline._preempt import StopOnSigterm
from admmprune.app.pipeline._run import Run, prepare
from admmprune.app.pipeline._steps import CPU_COMPILER_OPTIONS, learning_rate, make_eval, make_train_step, make_tx
from admmprune.app.pipeline._workdir import (
    MetricsLog,
    WorkdirLock,
    claim,
    io_error,
    save_model_once,
    write_json_atomic,
)
from admmprune.core import admm as admm_lib
from admmprune.core import masking
from admmprune.core.sparsity import Block, NofM, format_plan, is_spec
from admmprune.runtime import distributed
from admmprune.runtime.checkpoint import Checkpointer
from admmprune.runtime.data import model_inputs
from admmprune.structure import collapse as collapse_lib
from admmprune.structure import graph, measure

STOP_AFTER = (None, "dense")


@dataclasses.dataclass
class _Progress:
    """Where a run is: from the start, or from its latest checkpoint."""

    report: dict[str, Any]
    phase: int = 0
    step: int = 0
    global_step: int = 0
    elapsed_before: float = 0.0
    data_state: Any = None
    resumed_from: int | None = None
    restored: Any = None  # the training state of the checkpoint resumed from, until its phase takes it


def _new_report(s: Settings) -> dict[str, Any]:
    report: dict[str, Any] = {"model": s.model, "dataset": s.data.name, "method": s.method_name}
    if s.kernel_spec is not None:  # a channel run's report is as it was before prune.sparsity
        report["sparsity"] = _sparsity_entry(s)
    report.update(
        ratio=s.ratio, stage_ratios=list(s.stages), dense=None, pruned=None, layers=None, stages=[], retrain=None
    )
    return report


def _sparsity_entry(s: Settings) -> dict[str, Any]:
    """What the report says of a non-channel ``prune.sparsity``: its kind and set."""
    spec = s.kernel_spec
    entry: dict[str, Any] = {"kind": s.sparsity}
    if isinstance(spec, NofM):
        entry.update(n=spec.n, m=spec.m)
    else:
        if isinstance(spec, Block):
            entry["block"] = list(spec.shape)
        entry["scope"] = "global" if spec.group is not None else "layer"
    return entry


def _sparsity_text(entry: dict[str, Any]) -> str:
    """``2:4``, ``unstructured (layer)``, ``block 4x4 (global)``: a report's sparsity in a log line."""
    if "n" in entry:
        return f"{entry['n']}:{entry['m']}"
    block = f" {'x'.join(map(str, entry['block']))}" if "block" in entry else ""
    return f"{entry['kind']}{block} ({entry['scope']})"


def _all_true(specs, params):
    return jax.tree.map(
        lambda s, p: None if s is None else jnp.ones(p.shape, jnp.bool_), specs, params, is_leaf=is_spec
    )


def _finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating))


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
      UserError: for a bad config, a workdir that holds another run (or is
        in use, damaged, read-only or full), data that cannot be had, or a
        loss that became NaN or infinite.
      Preempted: SIGTERM came while training; a checkpoint of the step it
        stopped at is saved, and a rerun resumes from it.
    """
    # Only process 0 of a multi-process run prints and writes files.
    log = log or (lambda line: print(line, flush=True) if distributed.is_primary() else None)
    if stop_after not in STOP_AFTER:
        raise ValueError(f"stop_after must be one of {STOP_AFTER}, got {stop_after!r}")
    s = settings(config)  # the only read of the config
    workdir = os.path.abspath(workdir)
    t_start = time.perf_counter()
    # Data and model first: a run that cannot start must not claim the workdir.
    r = prepare(s, workdir, log)
    distributed.check_same(json_key(s, workdir), "configs or workdirs")
    finished, lock = distributed.primary_first(
        lambda: claim(s.comparable, workdir, log=log, lock=distributed.is_primary())
    )
    if finished is not None:
        log(f"run in {workdir} is complete: {os.path.join(workdir, 'report.json')}")
        return finished
    try:
        return _train(r, stop_after, t_start)
    except OSError as e:  # a full disk, a read-only file system: the user's to fix
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise io_error(e, f"write to workdir {workdir}") from None
    finally:
        if lock is not None:
            lock.release()


def _train(r: Run, stop_after: str | None, t_start: float) -> dict[str, Any]:
    """The phases of a claimed run, from its start or its latest checkpoint, and its report."""
    s, workdir, log = r.settings, r.workdir, r.log
    phases = plan_phases(s)
    _describe(r, phases)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    metrics = None
    try:
        progress = _resume_point(r, ckpt, phases)
        metrics = MetricsLog(
            os.path.join(workdir, "metrics.jsonl"),
            progress.resumed_from or 0,
            enabled=distributed.is_primary(),
            log=log,
        )
        report = _phases_of(r, phases, progress, ckpt, metrics, stop_after, t_start)
    except BaseException:
        # orbax's threads must end before the interpreter does, or they print
        # tracebacks of their own after the error's one line.
        for closing in (metrics, ckpt):
            try:
                if closing is not None:
                    closing.close()
            except Exception:  # the error that got us here is the one to report
                pass
        raise
    metrics.close()
    ckpt.close()
    if report is None:  # stopped after the dense phase
        log(f"dense model in {os.path.join(workdir, 'dense')}")
        return progress.report
    return _conclude(r, progress.report, lambda: progress.elapsed_before + time.perf_counter() - t_start)


def _phases_of(r: Run, phases, progress: _Progress, ckpt, metrics, stop_after, t_start) -> dict | None:
    """Trains the phases left; returns the report so far, or None when ``stop_after`` stopped it."""
    workdir = r.workdir
    r.clock = _timing.Clock(progress.report.setdefault("time", {}))

    def elapsed() -> float:
        return progress.elapsed_before + time.perf_counter() - t_start

    def diverged(what: str) -> UserError:
        latest = ckpt.latest_step()
        if latest is None:
            return UserError(
                f"{what}; stopped before the first checkpoint: lower the learning rate or rho and rerun "
                f"(the same --workdir {workdir} is accepted)"
            )
        return UserError(
            f"{what}; stopped, and the last good checkpoint (step {latest}) stays in {ckpt.directory}: "
            "lower the learning rate or rho and use a new --workdir"
        )

    def save(phase_index: int, phase_step: int, step: int, data_state) -> None:
        if ckpt.latest_step() is not None and ckpt.latest_step() >= step:
            return
        if not _finite(r.params):
            raise diverged(f"the parameters are not finite at step {step}")
        state = {"params": r.params, "rest": r.rest, "opt_state": r.opt_state}
        if r.gates is not None:
            state["gates"] = r.gates
        state = r.dist.put(state)  # every process saves its shards
        meta = {
            "phase": phase_index,
            "phase_step": phase_step,
            "report": progress.report,
            "elapsed": elapsed(),
            "widths": list(r.model.widths),
        }
        ckpt.save(step, state, data_state=data_state, metadata=meta)

    def preempted(step: int) -> Preempted:
        return Preempted(
            f"stopped by SIGTERM at step {step}: checkpoint {step} is saved in {ckpt.directory}; "
            "rerun the same command to resume"
        )

    dense_dir = os.path.join(workdir, "dense")
    with StopOnSigterm(every=r.settings.log_every) as stop:
        for i, phase in enumerate(phases):
            if stop_after == "dense" and i > 0:
                return None
            if i < progress.phase:
                continue
            hooks = _phases.Hooks(metrics=metrics, save=save, diverged=diverged, stop=stop, preempted=preempted)
            if not _run_phase(r, phases, i, progress, hooks=hooks, elapsed=elapsed):
                continue  # a resumed phase that had ended
            with r.clock("checkpoint"):
                if phase.kind == "dense":
                    save_model_once(dense_dir, nnx.merge(r.graphdef, r.params, r.rest, copy=True))
                save(i, phase.epochs * r.steps_per_epoch, progress.global_step, None)
            if stop.signalled:
                raise preempted(progress.global_step)
    return progress.report


def json_key(s: Settings, workdir: str) -> str:
    """What every process of a multi-process run must agree on."""
    return json.dumps(s.comparable, sort_keys=True) + workdir


def _describe(r: Run, phases: list[Phase]) -> None:
    """Writes the plan and logs what the run will prune."""
    s = r.settings
    if jax.process_index() == 0:
        with open(os.path.join(r.workdir, "plan.txt"), "w") as f:
            f.write(format_plan(r.params, r.specs) + "\n")
    if s.kernel_spec is None:
        sparsity = ""
        pruned = "pruned groups " + ", ".join(
            f"{g} ({t})" for g, (_, t) in graph.group_widths(r.params, r.specs).items()
        )
    else:
        sparsity = f"sparsity {_sparsity_text(_sparsity_entry(s))}, "
        pruned = "pruned kernels " + ", ".join(f"{k} ({v['total']})" for k, v in r.layers(r.params, None).items())
    r.log(
        f"{s.model} on {s.data.name}, method {s.method_name}, {sparsity}ratio {s.ratio:g}, "
        f"stages {' -> '.join(f'{x:g}' for x in s.stages)}; {pruned}"
    )


def _resume_point(r: Run, ckpt: Checkpointer, phases: list[Phase]) -> _Progress:
    """Where to start: the newest checkpoint that restores (damaged ones are set aside), or the beginning."""
    set_aside = []
    while (latest := ckpt.latest_step()) is not None:
        try:
            meta = _checked_metadata(ckpt, latest, phases)
            restored = _restore(r, phases, meta["phase"], ckpt, latest)
        except UserError as e:
            aside = ckpt.set_aside(latest)
            set_aside.append(aside)
            r.log(f"warning: {e}; moved it to {aside}, trying the checkpoint before it")
            continue
        progress = _Progress(
            meta["report"],
            meta["phase"],
            meta["phase_step"],
            latest,
            meta["elapsed"],
            data_state=restored.data_state,
            resumed_from=latest,
            restored=restored.state,
        )
        r.log(f"resuming from checkpoint step {latest} ({phases[progress.phase].name}, step {progress.step})")
        return progress
    if set_aside:
        raise UserError(
            f"no checkpoint in {ckpt.directory} restores (set aside: {', '.join(set_aside)}); "
            "rerun the same command to start the run over, or use another --workdir"
        )
    return _Progress(_new_report(r.settings))


def _checked_metadata(ckpt: Checkpointer, step: int, phases: list[Phase]) -> dict[str, Any]:
    meta = ckpt.restore_metadata(step)
    ok = (
        isinstance(meta, dict)
        and isinstance(meta.get("phase"), int)
        and 0 <= meta["phase"] < len(phases)
        and isinstance(meta.get("phase_step"), int)
        and isinstance(meta.get("report"), dict)
        and isinstance(meta.get("elapsed"), (int, float))
    )
    if not ok:
        raise UserError(f"checkpoint step {step} in {ckpt.directory} is damaged: its metadata is not the pipeline's")
    return meta


def _phase_tx(r: Run, phases: list[Phase], i: int):
    """The transformation of phase ``i`` (as training builds it), and whether it trains gates."""
    phase = phases[i]
    gated = r.gated(phase)
    steps = phase.epochs * r.steps_per_epoch
    # The masks live in keep_masked's state, so all-True ones give the same step.
    return make_tx(r.settings, phase, r.specs, steps, _all_true(r.specs, r.params), gated=gated, target=r.target), gated


def _run_phase(r: Run, phases, i: int, progress: _Progress, *, hooks: _phases.Hooks, elapsed) -> bool:
    """Enters (or resumes) and trains phase ``i``; returns ``False`` if a resumed phase had ended."""
    phase = phases[i]
    steps = phase.epochs * r.steps_per_epoch
    resuming = i == progress.phase and progress.resumed_from is not None
    t_phase = elapsed()
    r.clock.phase = phase.name
    tx, _ = _phase_tx(r, phases, i)
    if resuming:
        state, progress.restored = progress.restored, None
        r.params, r.rest, r.opt_state = (state[k] for k in ("params", "rest", "opt_state"))
        r.gates = state.get("gates")
        if progress.step >= steps:  # the phase had ended: on to the next one
            progress.resumed_from = None
            return False
    else:
        _phases.begin(r, phases, i)
    progress.global_step = _phases.train(
        r,
        i,
        phase,
        tx,
        start_step=progress.step if resuming else 0,
        data_state=progress.data_state,
        global_step=progress.global_step,
        hooks=hooks,
    )
    progress.resumed_from = None
    _phases.finish(r, phase, progress.report, elapsed() - t_phase)
    return True


def _restore(r: Run, phases: list[Phase], i: int, ckpt: Checkpointer, step: int):
    """Restores checkpoint ``step`` of phase ``i`` (every process its shards), whole on every process."""
    tx, gated = _phase_tx(r, phases, i)
    gates = r.settings.method.init_gates(r.params, r.specs) if gated else None
    trainable = (r.params, gates) if gated else r.params
    target = {"params": r.params, "rest": r.rest, "opt_state": jax.eval_shape(tx.init, trainable)}
    if gated:
        target["gates"] = gates
    restored = ckpt.restore(r.dist.abstract(target), step=step)
    return restored._replace(state=r.dist.local(restored.state))


def _conclude(r: Run, report: dict[str, Any], elapsed) -> dict[str, Any]:
    """Collapses the retrained model, measures both, writes the report."""
    s, workdir = r.settings, r.workdir
    r.clock.phase = None  # the report's time is the phases'; the collapse's is in "seconds"
    pruned_eval = report["retrain"]["accuracy"]
    # The masks live in keep_masked's state (the jitted step donated earlier buffers).
    r.masks = admm_lib.find_state(r.opt_state, masking.MaskedState).masks
    trained = nnx.merge(r.graphdef, r.params, r.rest, copy=True)
    if s.kernel_spec is not None:
        summary = _masked_report(r, report, trained)
    else:
        summary = _collapsed_report(r, report, trained)
    report["seconds"] = elapsed()
    report["machine"] = {
        "platform": platform.platform(),
        "jax": jax.__version__,
        "devices": f"{jax.devices()[0].platform} x{jax.device_count()}",
    }
    report["date"] = datetime.date.today().isoformat()
    if jax.process_index() == 0:
        write_json_atomic(os.path.join(workdir, "report.json"), report)
    perplexity = ""
    if "perplexity" in report["pruned"]:
        perplexity = f", perplexity {report['pruned']['perplexity']:.3f} (dense {report['dense']['perplexity']:.3f})"
    r.log(
        f"done: accuracy {100 * pruned_eval:.2f}% (dense {100 * report['dense']['accuracy']:.2f}%){perplexity}, "
        f"{summary}, {report['seconds']:.0f}s -> {os.path.join(workdir, 'report.json')}"
    )
    r.log(f"time: {_timing.summary(report.get('time', {}))}")
    return report


def _masked_report(r: Run, report: dict[str, Any], trained: nnx.Module) -> str:
    """Saves the masked model (no collapse: its sets do not remove channels)
    and counts its non-zero weights into the report; returns the log's summary."""
    layers = r.layers(r.params, r.masks)
    kernels = {k: sum(v[k] for v in layers.values()) for k in ("nonzero", "total")}
    everything = {"nonzero": measure.count_nonzero(r.params), "total": measure.count_params(r.params)}
    for counts in (kernels, everything):
        counts["compression"] = counts["total"] / max(counts["nonzero"], 1)
    report["pruned"] = {
        **_scores(report["retrain"]),
        "params": everything["total"],
        "nonzero": everything["nonzero"],
    }
    report["nonzero"] = {"kernels": kernels, "all": everything}
    report["dense"]["params"] = everything["total"]
    report["layers"] = layers
    save_model_once(os.path.join(r.workdir, "model"), trained)
    return (
        f"{_sparsity_text(report['sparsity'])}: {kernels['nonzero']:,} of {kernels['total']:,} weights "
        f"of the pruned kernels non-zero ({kernels['compression']:.1f}x fewer), {everything['nonzero']:,} "
        f"of {everything['total']:,} parameters ({everything['compression']:.1f}x fewer); masked model, not collapsed"
    )


def _scores(entry: dict[str, Any]) -> dict[str, float]:
    """The accuracy of a report entry, and its perplexity where it has one (a token dataset's)."""
    return {k: entry[k] for k in ("accuracy", "perplexity") if k in entry}


def _collapsed_report(r: Run, report: dict[str, Any], trained: nnx.Module) -> str:
    """Collapses the masked model, measures both, saves the collapsed one; returns the log's summary."""
    s, workdir = r.settings, r.workdir
    slim = collapse_lib.collapse(trained, r.masks, r.specs, state_specs=r.state_specs)
    dense_m = r.measure(trained)  # the dense architecture: latency and FLOPs depend on shapes only
    slim_m = r.measure(slim)
    batch = next(iter(r.eval_loader(min(s.data.eval_batch_size, len(r.eval_source)))))
    trained.eval()
    x = model_inputs(batch)
    diff = float(jnp.max(jnp.abs(trained(x) - slim(x))))
    report["pruned"] = {**_scores(report["retrain"]), "params": slim_m["params"], "flops": slim_m["flops"]}
    report["collapsed"] = {
        **r.evaluation(model=slim),
        **slim_m,
        "max_abs_diff": diff,
        "latency_batch": s.measure_batch_size,
    }
    report["dense"].update(dense_m)
    report["layers"] = r.kept(r.masks)
    report["params_removed"] = 1 - slim_m["params"] / dense_m["params"]
    report["flops_removed"] = 1 - slim_m["flops"] / dense_m["flops"]
    report["speedup"] = dense_m["latency_ms"] / slim_m["latency_ms"]
    save_model_once(os.path.join(workdir, "model"), slim)
    return (
        f"params -{100 * report['params_removed']:.1f}%, FLOPs -{100 * report['flops_removed']:.1f}%, "
        f"collapsed {report['speedup']:.1f}x faster (batch {s.measure_batch_size})"
    )


__all__ = [
    "CPU_COMPILER_OPTIONS",
    "METHODS",
    "SCHEDULES",
    "SPARSITIES",
    "STOP_AFTER",
    "MetricsLog",
    "Phase",
    "Run",
    "Settings",
    "WorkdirLock",
    "check_config",
    "claim",
    "learning_rate",
    "make_eval",
    "make_train_step",
    "make_tx",
    "plan_phases",
    "run",
    "settings",
    "write_json_atomic",
]
