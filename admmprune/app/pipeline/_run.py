"""The state of one run: its data, model, specs and training state, typed."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from admmprune import models
from admmprune._errors import UserError
from admmprune._types import path_str
from admmprune.app.methods import Phase, Target
from admmprune.app.pipeline._config import Settings
from admmprune.app.pipeline._steps import compiler_options, make_eval
from admmprune.app.pipeline._timing import Clock
from admmprune.core.sparsity import is_spec
from admmprune.runtime import data as data_lib
from admmprune.runtime import distributed
from admmprune.structure import collapse as collapse_lib
from admmprune.structure import costs, discovery, gates, graph, measure


@dataclasses.dataclass(eq=False)
class Run:
    """Everything one run holds. The phases replace the training state
    (``params``, ``rest``, ``opt_state``, ``gates``); the rest is fixed
    when the run is prepared, before the workdir is claimed."""

    settings: Settings
    workdir: str
    log: Callable[[str], None]
    info: Any  # data_lib.DatasetInfo
    train_source: Any
    eval_source: Any
    normalize: tuple[Any, Any] | None
    model: nnx.Module
    example: jax.ShapeDtypeStruct
    graphdef: Any
    eval_graphdef: Any
    specs: Any
    state_specs: Any
    dist: distributed.DataParallel
    local_batch_size: int
    steps_per_epoch: int
    target: Target
    # Correct predictions of a batch, in evaluation mode (and the summed cross-entropy, on tokens).
    evaluate_fn: Callable[..., Any]
    # The training state.
    params: Any
    rest: Any
    opt_state: Any = None
    masks: Any = None
    gates: dict[str, jax.Array] | None = None  # per-channel gates (or logits) while a gated method trains them
    clock: Clock = dataclasses.field(default_factory=lambda: Clock({}))  # where the time goes, per phase

    def gated(self, phase: Phase) -> bool:
        """Whether ``phase`` trains gates next to the weights."""
        return phase.kind == "sparsify" and self.settings.method.uses_gates(self.specs)

    def effective(self, params, g):
        """The parameters the model computes with under gates ``g``."""
        return gates.apply(params, self.settings.method.gate_values(g), self.specs)

    def gate_fns(self):
        """``(effective, penalty)`` of the gated step: the gated params, and the loss term."""
        return self.effective, self.settings.method.penalty(self.params, self.target)

    def effective_params(self):
        """The parameters the model computes with: gated while gates train."""
        return self.params if self.gates is None else self.effective(self.params, self.gates)

    def loader(self, phase_index: int, epochs: int, *, whole: bool = False):
        """Training batches: this process's share of each global batch, or
        (``whole``, for host-side work that every process repeats) all of it."""
        d = self.settings.data
        shard = {"shard_index": 0, "shard_count": 1} if whole else {}
        return data_lib.make_loader(
            self.train_source,
            batch_size=d.batch_size if whole else self.local_batch_size,
            seed=self.settings.seed * 1000 + phase_index + 1,
            num_epochs=epochs,
            normalize=self.normalize,
            augment=d.augment,
            **shard,
        )

    def eval_loader(self, batch_size: int | None = None):
        """The eval split, in order, whole on every process."""
        return data_lib.make_loader(
            self.eval_source,
            batch_size=batch_size or self.settings.data.eval_batch_size,
            seed=0,
            shuffle=False,
            drop_remainder=False,
            normalize=self.normalize,
            shard_index=0,
            shard_count=1,
        )

    def evaluate(self, params=None, *, model=None) -> float:
        """Accuracy on the eval split of the current params, or of another ``model``."""
        return self.evaluation(params, model=model)["accuracy"]

    def evaluation(self, params=None, *, model=None) -> dict[str, float]:
        """``{"accuracy"}`` on the eval split of the current params, or of another
        ``model``; on a token dataset also ``"perplexity"``, the exponential of the
        mean cross-entropy of the next token over all positions (accuracy is then
        next-token accuracy)."""
        tokens = self.info.tokens
        if model is None:
            fn, args = self.evaluate_fn, (self.params if params is None else params, self.rest)
        else:
            model.eval()
            graphdef, p, rest = nnx.split(model, nnx.Param, ...)
            fn, args = make_eval(graphdef, loss=tokens), (p, rest)
        correct = total = 0
        loss = 0.0
        with self.clock("eval"):
            for batch in self.eval_loader():
                out = fn(*args, data_lib.model_inputs(batch), batch["label"])
                if tokens:
                    out, batch_loss = out
                    loss += float(batch_loss)
                correct += int(out)
                total += batch["label"].size
        result = {"accuracy": correct / total}
        if tokens:
            result["perplexity"] = math.exp(loss / total)
        return result

    def measure(self, model: nnx.Module, *, latency: bool = True) -> dict[str, Any]:
        """Params, per-example FLOPs (XLA's count) and eval-mode latency of ``model``."""
        s = self.settings
        model.eval()
        _, params, _ = nnx.split(model, nnx.Param, ...)
        out = {"params": measure.count_params(params), "flops": measure.flops(model, self.example)}
        if latency:
            x = jnp.zeros((s.measure_batch_size, *self.info.image_shape), self.example.dtype)
            options = compiler_options()  # as the pipeline's eval compiles
            out["latency_ms"] = measure.latency_ms(model, x, repeats=s.measure_repeats, compiler_options=options)[
                "median"
            ]
        return out

    def teacher(self) -> tuple[Any, Any]:
        """The dense model saved in the workdir, in eval mode, to distill from: ``(graphdef, (params, rest))``
        with the state replicated on the run's devices. Read from disk, so a resumed run has it too."""
        from admmprune.runtime import checkpoint  # orbax: only runs that distill need it here

        model = checkpoint.load_model(os.path.join(self.workdir, "dense"))
        model.eval()
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return graphdef, jax.device_put((params, rest), self.dist.replicated)

    def kept(self, masks) -> dict[str, dict[str, int]]:
        """Channels kept and in total per group, as the report's ``layers``."""
        return {g: {"kept": k, "total": t} for g, (k, t) in graph.group_widths(self.params, self.specs, masks).items()}

    def layers(self, params, masks) -> dict[str, dict[str, int]]:
        """The report's ``layers`` of pruned ``params`` with ``masks``: channels kept
        per group (:meth:`kept`), or with a ``prune.sparsity`` other than channel,
        the non-zero weights and all weights of every pruned kernel."""
        if self.settings.kernel_spec is None:
            return self.kept(masks)
        flat, treedef = jax.tree_util.tree_flatten_with_path(self.specs, is_leaf=is_spec)
        return {
            path_str(path): {"nonzero": measure.count_nonzero(x), "total": int(np.size(x))}
            for (path, spec), x in zip(flat, treedef.flatten_up_to(params), strict=True)
            if spec is not None
        }


def _input_kwargs(name: str, info) -> dict[str, Any]:
    """Constructor arguments that fit a model to the dataset's images and classes
    (to a token dataset's ``(seq_len,)`` inputs and vocabulary)."""
    params = inspect.signature(models.get_class(name).__init__).parameters
    kwargs: dict[str, Any] = {"num_classes": info.num_classes}
    if "in_shape" in params:
        kwargs["in_shape"] = tuple(info.image_shape)
    elif "in_features" in params:
        kwargs["in_features"] = int(np.prod(info.image_shape))
    return kwargs


def _language_model(s: Settings, info, example: jax.ShapeDtypeStruct) -> nnx.Module:
    """The model of a token dataset, checked to give next-token logits ``(B, T, vocabulary)`` for ids ``(B, T)``.

    Raises:
      UserError: the model cannot read the tokens or gives other outputs (an
        image classifier).
    """
    want = (*example.shape, info.num_classes)
    try:
        model = models.get(s.model, **_input_kwargs(s.model, info), rngs=nnx.Rngs(s.seed))
        model.eval()
        got = jax.eval_shape(lambda x: model(x), example).shape
        model.train()
    except Exception as e:  # noqa: BLE001 - whatever a model raises on token ids: one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        got = f"an error ({type(e).__name__}{': ' + first if first else ''})"
    if got != want:
        raise UserError(
            f"{info.name} is a token dataset: the model must give next-token logits of shape {want} for token "
            f"ids of shape {tuple(example.shape)}, and {s.model} gives {got}; choose a language model such as gpt"
        )
    return model


def _sliced(split: str, limit: int | None) -> str:
    if limit is None:
        return split
    if "[" in split:
        raise UserError(f"data.limit cannot be combined with the sliced split {split!r}; slice the split instead")
    return f"{split}[:{limit}]"


def prepare(s: Settings, workdir: str, log: Callable[[str], None]) -> Run:
    """Data, model, specs and devices of a run: everything that can fail before
    the workdir is claimed.

    Raises:
      UserError: data that cannot be had, a method that cannot prune the
        model, or a batch larger than the training set.
    """
    d = s.data
    info = data_lib.dataset_info(d.name, d.data_dir)
    # A limit reads only that slice of the split (tfds slicing), not all of it.
    train_source = data_lib.load_source(d.name, _sliced(d.train_split, d.limit), d.data_dir)
    eval_source = data_lib.load_source(d.name, _sliced(d.eval_split, d.eval_limit), d.data_dir)
    normalize = (info.mean, info.std) if d.normalize and info.mean is not None else None
    if info.tokens:
        if d.augment:
            raise UserError(f"data.augment is for images; {info.name} is a token dataset: leave it empty")
        example = jax.ShapeDtypeStruct((1, *info.image_shape), jnp.int32)
        model = _language_model(s, info, example)
    else:
        model = models.get(s.model, **_input_kwargs(s.model, info), rngs=nnx.Rngs(s.seed))
        example = jax.ShapeDtypeStruct((1, *info.image_shape), jnp.float32)
    model.eval()  # a graph definition in evaluation mode (BatchNorm running statistics)
    eval_graphdef = nnx.split(model, nnx.Param, ...)[0]
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if s.dense_init is not None:
        params, rest = _dense_start(s.dense_init, model, params, rest)
    if getattr(model, "chain", None) is not None:  # a declaration overrides discovery
        specs, state_specs = graph.chain_specs(params, model.chain), None
    else:
        found = discovery.discover_nnx(model, example)
        specs, state_specs = found.specs, found.state_specs
        for name, reasons in found.unprunable.items():
            log(f"not pruned: {name} ({'; '.join(reasons)})")
    if s.kernel_spec is not None:  # another set than channels, on the kernels channel pruning prunes
        specs, state_specs = graph.kernel_specs(specs, s.kernel_spec), None
    dist = distributed.DataParallel(param_sharding=s.param_sharding)
    # data.batch_size is the global batch; this process reads its share of it.
    local_batch_size = dist.local_batch_size(d.batch_size)
    n_train = len(train_source)
    steps_per_epoch = n_train // jax.process_count() // local_batch_size
    if steps_per_epoch < 1:
        raise UserError(f"data.batch_size {d.batch_size} is larger than the {n_train} training examples")
    run = Run(
        settings=s,
        workdir=workdir,
        log=log,
        info=info,
        train_source=train_source,
        eval_source=eval_source,
        normalize=normalize,
        model=model,
        example=example,
        graphdef=graphdef,
        eval_graphdef=eval_graphdef,
        specs=specs,
        state_specs=state_specs,
        dist=dist,
        local_batch_size=local_batch_size,
        steps_per_epoch=steps_per_epoch,
        target=None,
        evaluate_fn=make_eval(eval_graphdef, loss=info.tokens),
        params=params,
        rest=rest,
    )
    run.target = Target(
        model_name=s.model,
        specs=specs,
        layer_macs=lambda: costs.layer_macs(model, jnp.zeros(example.shape, example.dtype)),
        removable_groups=lambda p: collapse_lib.removable_groups(model, specs, p),
        taylor_grads=lambda p: _taylor_grads(run, p),
    )
    s.method.check(run.target)
    return run


def _plain(config: dict) -> Any:
    """``config`` as its JSON reads back (tuples become lists), to compare a saved one with a built one."""
    return json.loads(json.dumps(config, sort_keys=True))


def _dense_start(path: str, model, params, rest):
    """The parameters and state of the dense model saved at ``path`` (a workdir
    or a model directory), checked to be ``model``'s architecture."""
    from admmprune.runtime import checkpoint  # orbax only when asked for

    where = os.path.join(path, "dense")
    if not os.path.isdir(where):
        where = path
    saved = checkpoint.load_model(where)
    name, want = models.name_of(saved), models.name_of(model)
    if name != want or _plain(saved.config) != _plain(model.config):
        raise UserError(
            f"dense.init {where} holds a {name} with {saved.config}, not this run's {want} with {model.config}: "
            "start from a dense model of the same model, widths and input shape"
        )
    saved.train()
    _, saved_params, saved_rest = nnx.split(saved, nnx.Param, ...)
    shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)  # noqa: E731
    if shapes(saved_params) != shapes(params) or shapes(saved_rest) != shapes(rest):
        raise UserError(f"dense.init {where}: the saved arrays do not match {want}'s; save it again with this version")
    return saved_params, saved_rest


def _taylor_grads(run: Run, params, batches: int = 4):
    """Loss gradients of a few training batches, for the Taylor criterion."""
    from admmprune.app.analyze import taylor_grads  # scipy and friends only when asked for

    it = iter(run.loader(-1, 1))
    return taylor_grads(nnx.merge(run.graphdef, params, run.rest, copy=True), [next(it) for _ in range(batches)])
