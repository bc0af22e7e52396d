"""The phases of a run: entering one, training it, and reporting on it."""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from typing import Any

import jax
from tqdm.auto import tqdm

from admmprune._errors import Preempted, UserError
from admmprune.app.methods import Phase, PruneInputs
from admmprune.app.pipeline._preempt import StopOnSigterm
from admmprune.app.pipeline._run import Run
from admmprune.app.pipeline._steps import make_train_step, make_tx
from admmprune.app.pipeline._workdir import MetricsLog
from admmprune.core import admm as admm_lib
from admmprune.core import masking
from admmprune.runtime import distributed
from admmprune.structure import collapse as collapse_lib
from admmprune.structure import graph


@dataclasses.dataclass(frozen=True)
class Hooks:
    """What training calls back into the run for: its metrics log, its
    checkpoints, the error a loss gone bad raises, and preemption."""

    metrics: MetricsLog
    save: Callable[[int, int, int, Any], None]  # (phase, phase step, global step, data state)
    diverged: Callable[[str], UserError]
    stop: StopOnSigterm
    preempted: Callable[[int], Preempted]


def begin(run: Run, phases: list[Phase], i: int) -> None:
    """The transition into phase ``i``: new optimizer state, stage edit, pruning."""
    phase, prev = phases[i], (phases[i - 1] if i else None)
    steps = phase.epochs * run.steps_per_epoch
    s = run.settings
    if phase.kind == "admm":
        # A new stage is an edit of the state (its keep ratio), not a new optimizer.
        if prev is None or prev.kind != "admm":
            run.opt_state = make_tx(s, phase, run.specs, steps, target=run.target).init(run.params)
        run.opt_state = admm_lib.set_stage(run.opt_state, 1.0 - phase.ratio)
    elif phase.kind == "sparsify" and run.gated(phase):
        run.gates = s.method.init_gates(run.params, run.specs)
        run.opt_state = make_tx(s, phase, run.specs, steps, gated=True, target=run.target).init((run.params, run.gates))
    elif phase.kind in ("dense", "sparsify"):
        run.opt_state = make_tx(s, phase, run.specs, steps, target=run.target).init(run.params)
    else:  # finetune / retrain: prune, then train with the masks fixed
        run.params, run.masks = prune(run, phase, prev)
        run.gates = None
        run.opt_state = make_tx(s, phase, run.specs, steps, run.masks).init(run.params)


def prune(run: Run, phase: Phase, prev: Phase | None):
    """The method's hard prune at ``phase.ratio``: ``(params, masks)``."""
    support = alive = None
    if prev is not None and prev.kind == "admm":
        support = admm_lib.find_state(run.opt_state).support
    if prev is not None and prev.kind == "finetune":  # removed channels (weights) stay removed
        support = admm_lib.find_state(run.opt_state, masking.MaskedState).masks
        alive = collapse_lib.alive_channels(run.specs, support)
    inputs = PruneInputs(run.params, run.gates, 1.0 - phase.ratio, support=support, alive=alive)
    return run.settings.method.prune(inputs, run.target)


def finish(run: Run, phase: Phase, report: dict[str, Any], t: float) -> None:
    """Evaluates the phase's result, adds it to the report and logs one line."""
    if phase.kind == "dense":
        scores = run.evaluation()
        report["dense"] = {**scores, "seconds": t}
        init = run.settings.dense_init
        if init is not None:
            report["dense"]["init"] = init
        trained = f"from {init}" if init is not None else f"{phase.epochs} epochs"
        run.log(f"dense     {trained}  accuracy {100 * scores['accuracy']:.2f}%{_perplexity(scores)}  [{t:.0f}s]")
    elif phase.kind == "admm":
        state = admm_lib.find_state(run.opt_state)
        pruned, masks = prune(run, phase, phase)
        acc, admm_acc = run.evaluate(pruned), run.evaluate()
        res = admm_lib.residuals(state)
        rho = [float(x) for x in jax.tree.leaves(state.rho)]
        report["stages"].append(
            {
                "ratio": phase.ratio,
                "accuracy": acc,
                "admm_accuracy": admm_acc,
                "primal_residual": res["primal_residual"],
                "dual_residual": res["dual_residual"],
                "rho": max(rho),
                "seconds": t,
                "layers": run.layers(pruned, masks),
            }
        )
        run.log(
            f"admm {phase.ratio:<4g} {phase.epochs} epochs  accuracy {100 * acc:.2f}% pruned "
            f"({100 * admm_acc:.2f}% before)  primal residual {res['primal_residual']:.4f}  "
            f"rho {max(rho):.3g}  [{t:.0f}s]"
        )
    elif phase.kind == "sparsify":
        acc = run.evaluate(run.effective_params())
        pruned, masks = prune(run, phase, phase)
        pruned_acc = run.evaluate(pruned)
        entry = {"epochs": phase.epochs, "accuracy": acc, "pruned_accuracy": pruned_acc, "seconds": t}
        if run.gates is not None:
            entry.update(run.settings.method.sparsify_report(run.gates, run.params, run.target))
        report["sparsify"] = entry
        widths = graph.group_widths(run.params, run.specs, masks)
        kept = sum(k for k, _ in widths.values()) / sum(t for _, t in widths.values())
        run.log(
            f"sparsify  {phase.epochs} epochs  accuracy {100 * acc:.2f}% ({100 * pruned_acc:.2f}% pruned, "
            f"{100 * kept:.1f}% of channels kept)  [{t:.0f}s]"
        )
    elif phase.kind == "finetune":
        acc = run.evaluate()
        masks = admm_lib.find_state(run.opt_state, masking.MaskedState).masks
        report["stages"].append(
            {"ratio": phase.ratio, "accuracy": acc, "seconds": t, "layers": run.layers(run.params, masks)}
        )
        run.log(f"finetune {phase.ratio:<4g} {phase.epochs} epochs  accuracy {100 * acc:.2f}%  [{t:.0f}s]")
    else:
        scores = run.evaluation()
        report["retrain"] = {"epochs": phase.epochs, **scores, "seconds": t}
        accuracy = f"accuracy {100 * scores['accuracy']:.2f}%{_perplexity(scores)}"
        run.log(f"retrain   {phase.epochs} epochs  {accuracy}  [{t:.0f}s]")


def _perplexity(scores: dict[str, float]) -> str:
    """``"  perplexity 5.21"`` for a log line, where the scores have one (a token dataset's)."""
    return f"  perplexity {scores['perplexity']:.3f}" if "perplexity" in scores else ""


def train(
    run: Run,
    i: int,
    phase: Phase,
    tx,
    *,
    start_step: int,
    data_state: Any,
    global_step: int,
    hooks: Hooks,
) -> int:
    """Trains phase ``i`` from ``start_step``; returns the global step reached.

    Raises:
      UserError: the loss became NaN or infinite (``hooks.diverged``).
      Preempted: SIGTERM came (``hooks.stop``): a checkpoint of the step
        reached is saved first.
    """
    s = run.settings
    steps = phase.epochs * run.steps_per_epoch
    if steps == 0:
        return global_step
    gated = run.gate_fns() if run.gates is not None else None
    # The state goes onto the mesh for the phase, and comes back whole for the
    # host-side work that follows it.
    trainable = run.dist.put((run.params, run.gates) if gated else run.params)
    run.rest, run.opt_state = run.dist.put((run.rest, run.opt_state))
    if gated:
        run.params, run.gates = trainable
    else:
        run.params = trainable
    state_shardings = run.dist.shardings((trainable, run.rest, run.opt_state))
    teacher, teacher_state = None, ()
    weight, temperature = s.distill
    if weight > 0 and phase.kind in ("finetune", "retrain"):  # every method's masked training
        graphdef, state = run.teacher()
        teacher, teacher_state = (graphdef, weight, temperature), (state,)
    step_fn = make_train_step(
        run.graphdef,
        tx,
        admm_metrics=phase.kind == "admm",
        gated=gated,
        shardings=(state_shardings, run.dist.data, run.dist.replicated),
        teacher=teacher,
    )
    it = iter(run.loader(i, phase.epochs))
    if start_step and data_state is not None:
        it.set_state(data_state)
    every = s.checkpoint_every or run.steps_per_epoch
    quiet = not s.progress or not distributed.is_primary()
    bar = tqdm(
        total=steps,
        initial=start_step,
        desc=phase.name,
        disable=quiet or None,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    phase_step = start_step
    pending = []  # per-step metrics stay on the device until the next flush
    clock = run.clock

    def flush():
        with clock("compute"):  # waiting for the steps' results is where their compute shows
            done = jax.device_get(pending)
        with clock("log"):
            for n, (step, m) in enumerate(done):
                record = {"step": step, "phase": phase.name, **{k: float(v) for k, v in m.items()}}
                if not math.isfinite(record["loss"]):
                    raise hooks.diverged(f"the loss became {record['loss']} at step {step} ({phase.name})")
                if n == len(done) - 1:
                    record["time"] = clock.interval()
                hooks.metrics.write(record)
            if pending:
                bar.set_postfix(loss=f"{record['loss']:.4f}")
            pending.clear()

    def save():
        flush()  # never checkpoint past a loss that went bad
        with clock("checkpoint"):
            hooks.save(i, phase_step, global_step, it.get_state())

    try:
        while True:
            with clock("data"):
                batch = next(it, None)
                if batch is None:
                    break
                batch = run.dist.batch(batch)
            with clock("compute"):
                if run.gates is None:
                    run.params, run.rest, run.opt_state, m = step_fn(
                        run.params, run.rest, run.opt_state, batch, *teacher_state
                    )
                else:
                    (run.params, run.gates), run.rest, run.opt_state, m = step_fn(
                        (run.params, run.gates), run.rest, run.opt_state, batch
                    )
            phase_step += 1
            global_step += 1
            pending.append((global_step, m))
            bar.update(1)
            if phase_step % s.log_every == 0 or phase_step == steps:
                flush()
            if phase_step % every == 0 and phase_step < steps:
                save()
            # The phase's last step is left to the run, which reports on the phase before it saves.
            if phase_step < steps and hooks.stop.requested(phase_step):
                save()
                raise hooks.preempted(global_step)
    finally:
        bar.close()
    run.params, run.rest, run.opt_state, run.gates = run.dist.local((run.params, run.rest, run.opt_state, run.gates))
    return global_step
