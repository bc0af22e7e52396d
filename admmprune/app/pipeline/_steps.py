"""The jitted training and evaluation steps, and each phase's optimizer."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from admmprune._types import Masks, Specs
from admmprune.app.methods import Phase, Target
from admmprune.app.pipeline._config import Settings, Training
from admmprune.core import admm as admm_lib
from admmprune.core import masking
from admmprune.runtime.data import model_inputs


def learning_rate(training: Training, total_steps: int) -> optax.Schedule | float:
    """The phase's learning rate: constant, or cosine-decayed over its steps, after a linear warm-up if any."""
    total = max(total_steps, 1)
    warmup = int(training.warmup * total)
    if warmup == 0:
        if training.schedule == "cosine":
            return optax.cosine_decay_schedule(training.learning_rate, total)
        return training.learning_rate
    if training.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, training.learning_rate, warmup, total)
    rise = optax.linear_schedule(0.0, training.learning_rate, warmup)
    return optax.join_schedules([rise, optax.constant_schedule(training.learning_rate)], [warmup])


def make_tx(
    settings: Settings,
    phase: Phase,
    specs: Specs,
    steps: int,
    masks: Masks = None,
    *,
    gated: bool = False,
    target: Target | None = None,
) -> optax.GradientTransformation:
    """The optimizer of ``phase``: SGD for the dense phase; the method's own
    transformation for its phases (``admm``, ``sparsify``); SGD that keeps the
    pruned weights at zero (``masks``) for ``finetune`` and ``retrain``."""
    lr = learning_rate(settings.training(phase), steps)
    if phase.kind == "dense":
        return settings.optimizer.weights(lr)
    if phase.kind in ("finetune", "retrain"):
        return optax.chain(settings.optimizer.weights(lr), masking.keep_masked(masks))
    return settings.method.transform(phase, specs, settings.optimizer, lr, gated=gated, target=target)


def _admm_metrics(opt_state) -> dict[str, jax.Array]:
    """Mean primal residual and largest rho, computed inside the jitted step."""
    state = admm_lib.find_state(opt_state)
    primal = jax.tree.leaves(state.primal_residual)
    return {"primal_residual": sum(primal) / len(primal), "rho": jnp.max(jnp.stack(jax.tree.leaves(state.rho)))}


#: XLA options of the training and evaluation steps on CPU. YNNPACK's fusions
#: (XLA:CPU's default for convolutions and dots in jax 0.10) were slower here:
#: LeNet-5's train step 59 ms with them, 43 ms without (batch 128); ResNet-20's
#: eval forward at batch 256 271 -> 216 ms dense and 82 -> 74 ms collapsed at
#: 0.5; ResNet-20's train step the same either way (same process, alternating
#: rounds, 2-core x86_64, 2026-12-01).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options() -> dict[str, str] | None:
    """:data:`CPU_COMPILER_OPTIONS` when JAX's default backend is the CPU, else ``None`` (XLA's defaults)."""
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    admm_metrics: bool = False,
    gated: tuple[Callable, Callable] | None = None,
    shardings: tuple[Any, Any, Any] | None = None,
    teacher: tuple[nnx.GraphDef, float, float] | None = None,
) -> Callable:
    """The jitted training step ``(trainable, rest, opt_state, batch) -> (..., metrics)``.

    Args:
      graphdef: the model's graph definition (``nnx.split(model, nnx.Param, ...)``).
      tx: the phase's optimizer.
      admm_metrics: add the ADMM state's mean primal residual and largest rho.
      gated: ``(effective, penalty)`` to train a ``(params, gates)`` pair: the
        model runs on ``effective(params, gates)`` and ``penalty(gates)`` joins
        the loss.
      shardings: ``(state, batch, replicated)``: the shardings of
        ``(trainable, rest, opt_state)``, of the batch, and of the metrics.
      teacher: ``(graphdef, weight, temperature)`` of a model to distill from
        (``distillation_loss``); the step then takes its ``(params, rest)``
        as a fifth argument, and the loss mixes in the distillation term.
    """

    def loss_fn(trainable, rest, batch, teacher_state=None):
        params, extra = trainable, jnp.zeros((), jnp.float32)
        if gated is not None:
            effective, penalty = gated
            params, extra = effective(*trainable), penalty(trainable[1])
        # copy=True: fresh Variables, so BatchNorm may update its statistics
        # inside this (grad) trace.
        model = nnx.merge(graphdef, params, rest, copy=True)
        logits = model(model_inputs(batch))
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        _, _, rest = nnx.split(model, nnx.Param, ...)
        objective = loss
        if teacher is not None:
            t_graphdef, weight, temperature = teacher
            t_logits = jax.lax.stop_gradient(nnx.merge(t_graphdef, *teacher_state)(model_inputs(batch)))
            objective = (1 - weight) * loss + weight * distillation_loss(logits, t_logits, temperature)
        return objective + extra, (rest, logits, loss, extra)

    sharded = {}
    if shardings is not None:
        state, batch_sharding, replicated = shardings
        teacher_sharding = () if teacher is None else (replicated,)
        sharded = {
            "in_shardings": (*state, batch_sharding, *teacher_sharding),
            "out_shardings": (*state, replicated),
        }

    @functools.partial(jax.jit, donate_argnums=(0, 1, 2), compiler_options=compiler_options(), **sharded)
    def step(trainable, rest, opt_state, batch, *teacher_state):
        (_, (rest, logits, loss, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, rest, batch, *teacher_state
        )
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


def distillation_loss(logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Hinton et al.'s (2015) distillation term, ``T^2 KL(softmax(t / T) || softmax(s / T))``
    averaged over the batch (``T^2`` keeps its gradient's scale independent of ``T``)."""
    t = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
    s = jax.nn.log_softmax(logits / temperature, axis=-1)
    return temperature**2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def make_eval(graphdef: nnx.GraphDef, *, loss: bool = False) -> Callable:
    """The jitted count of correct predictions of a batch (of every position, for
    per-position logits); with ``loss``, ``(count, summed cross-entropy)``."""

    @functools.partial(jax.jit, compiler_options=compiler_options())
    def correct(params, rest, images, labels):
        logits = nnx.merge(graphdef, params, rest)(images)
        count = jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.int32))
        if not loss:
            return count
        return count, jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

    return correct
