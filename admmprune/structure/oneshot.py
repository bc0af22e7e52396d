"""One-shot pruning of a trained model, layer by layer, from calibration data (layer L3).

:func:`prune` walks the layers of ``fn(params, *inputs)`` in the order the
function uses them (:func:`admmprune.structure.calibration.find_layers`).
For each layer with a spec it computes the Gram matrix of the layer's inputs
over the calibration batches *with the layers before it already pruned*
(:func:`~admmprune.structure.calibration.input_gram`), prunes its kernel
with one of :data:`METHODS` so that the layer reproduces its dense outputs on
those inputs, and moves on. Memory is one layer's Gram matrix and one
batch's activations; nothing is trained.

:func:`prune_model` does the same for a Flax NNX model.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from admmprune._errors import UserError
from admmprune._types import Params, Specs, path_str
from admmprune.core import layerwise
from admmprune.core.sparsity import NofM, Spec, Unstructured, is_spec
from admmprune.structure import calibration


@dataclasses.dataclass(frozen=True)
class Method:
    """A one-shot pruning method.

    Attributes:
      name: its name (``--method`` of ``python -m admmprune.oneshot``).
      gram: whether it reads the layer's input Gram matrix (all but magnitude).
      solve: ``solve(h, kernel, spec, keep_ratio) -> kernel`` with ``h`` the
        damped Gram matrix (``None`` when ``gram`` is false); the result lies
        in the spec's set.
      about: one line for ``--help``.
    """

    name: str
    gram: bool
    solve: Callable[[jax.Array | None, jax.Array, Spec, float], jax.Array]
    about: str


def _admm(h, w, spec, keep):
    return layerwise.admm(h, w, spec, keep)


def _sparsegpt(h, w, spec, keep):
    return layerwise.sparsegpt(h, w, spec, keep, damping=0.0)  # h comes damped


def _wanda(h, w, spec, keep):
    return layerwise.wanda(w, h, spec, keep)


def _magnitude(h, w, spec, keep):
    return layerwise.magnitude(w, spec, keep)


#: The methods, by name.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("admm", True, _admm, "ADMM on the layer's reconstruction, then a least-squares refit (Boza; ALPS)"),
        Method("sparsegpt", True, _sparsegpt, "SparseGPT's greedy optimal-brain-surgeon update (Frantar & Alistarh)"),
        Method("wanda", True, _wanda, "Wanda: largest |weight| x input norm, per output, no update (Sun et al.)"),
        Method("magnitude", False, _magnitude, "largest |weight| per layer, no update"),
    )
}


def _method(method: str | Method) -> Method:
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise UserError(f"unknown one-shot method {method!r}: choose from {sorted(METHODS)}")
    return METHODS[method]


def _spec_paths(params: Params, specs: Specs) -> dict[str, Spec]:
    flat_specs = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: x is None or is_spec(x))[0]
    return {path_str(p): s for p, s in flat_specs if s is not None}


def _as_args(batch: Any) -> tuple:
    return tuple(batch) if isinstance(batch, tuple) else (batch,)


def prune(
    fn: Callable[..., Any],
    params: Params,
    batches: Iterable[Any],
    specs: Specs,
    keep_ratio: float = 0.5,
    *,
    method: str | Method = "admm",
    damping: float = 0.01,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> tuple[Params, dict[str, Any]]:
    """Prunes every layer with a spec, one after the other, from calibration batches.

    Args:
      fn: ``fn(params, *inputs)``, the model's forward pass (in eval mode).
      params: its parameters, a pytree.
      batches: the calibration inputs: a sequence of arrays (or of tuples
        of ``fn``'s inputs), read once per layer.
      specs: a pytree like ``params`` with a spec at every kernel to prune
        and ``None`` elsewhere (``admmprune.sparsity.resolve``).
      keep_ratio: the fraction of each spec's groups kept (``NofM`` keeps
        its ``n`` of ``m``).
      method: a name of :data:`METHODS` or a :class:`Method`.
      damping: added to the Gram matrix's diagonal, as a fraction of its
        mean diagonal (SparseGPT's ``percdamp``), so that it is invertible.
      progress: show a progress bar (one step per layer).
      log: where a line per layer goes (default: nowhere).

    Returns:
      ``(params, report)``: the pruned parameters, and per layer path its
      ``error`` (the relative reconstruction error
      ``||X (W - W0)||^2 / ||X W0||^2`` on the calibration inputs, the
      pruned layers below included), ``kept`` (the fraction of non-zero
      weights), ``rows`` (calibration rows) and ``seconds``; ``refused``
      lists the kernels with a spec that could not be pruned this way, with
      the reason.

    Raises:
      UserError: an unknown method, no calibration batch, a keep ratio
        outside (0, 1], or no layer to prune.
    """
    m = _method(method)
    batches = [_as_args(b) for b in batches]
    if not batches:
        raise UserError("one-shot pruning needs at least one calibration batch")
    if not 0 < keep_ratio <= 1:
        raise UserError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    wanted = _spec_paths(params, specs)
    found = calibration.find_layers(fn, params, *batches[0], paths=list(wanted))
    if not found.layers:
        raise UserError(f"no layer to prune: {found.refused or 'no spec names a kernel'}")
    names, leaves = zip(*[(path_str(p), v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]], strict=True)
    leaves, treedef = list(leaves), jax.tree.structure(params)
    index = {n: i for i, n in enumerate(names)}
    solve = jax.jit(m.solve, static_argnums=(2,))
    report: dict[str, Any] = {"method": m.name, "keep_ratio": keep_ratio, "layers": {}, "refused": found.refused}
    bar = tqdm(found.layers, desc=f"one-shot {m.name}", disable=not progress or None, leave=False)
    for layer in bar:
        start = time.perf_counter()
        current = jax.tree.unflatten(treedef, leaves)
        w0 = jnp.asarray(leaves[index[layer.path]])
        h, rows = None, 0
        for args in batches:  # the inputs come through the layers pruned so far
            part, n = calibration.input_gram(fn, current, args, layer)
            h, rows = (part if h is None else h + part), rows + n
        h = h / rows
        damped = layerwise.damp(h, damping)
        spec = wanted[layer.path]
        # A kernel with several output axes (LinearGeneral's (in, heads, head_dim)) is solved as
        # (inputs, outputs): the solvers read every axis but the last as inputs.
        w0 = w0.reshape(layer.inputs, -1) if layer.outputs > 1 else w0
        w = solve(damped if m.gram else None, w0, spec, 1.0 if isinstance(spec, NofM) else keep_ratio)
        w = w.astype(w0.dtype)
        error = float(layerwise.reconstruction_error(w, w0, h))
        w = w.reshape(layer.shape)
        kept = float(jnp.mean(w != 0))
        leaves[index[layer.path]] = w
        seconds = time.perf_counter() - start
        report["layers"][layer.path] = {"error": error, "kept": kept, "rows": rows, "seconds": round(seconds, 3)}
        bar.set_postfix(layer=layer.path, error=f"{error:.3g}")
        if log is not None:
            log(f"{layer.path}: kept {kept:.1%}, reconstruction error {error:.4g} ({seconds:.1f} s)")
    bar.close()
    return jax.tree.unflatten(treedef, leaves), report


def prune_model(
    model: Any,
    batches: Iterable[Any],
    specs: Specs,
    keep_ratio: float = 0.5,
    **kwargs: Any,
) -> tuple[Any, dict[str, Any]]:
    """:func:`prune` for a Flax NNX model: returns ``(pruned copy, report)``.

    ``specs`` is a pytree like ``nnx.state(model, nnx.Param)``. The model is
    evaluated in eval mode (``model.eval()`` on a copy: BatchNorm's running
    statistics, no dropout); ``model`` itself is left unchanged.
    """
    from flax import nnx

    model = nnx.clone(model)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fn(p, *x):
        return nnx.merge(graphdef, p, rest)(*x)

    pruned, report = prune(fn, params, batches, specs, keep_ratio, **kwargs)
    nnx.update(model, pruned)
    return model, report


def kernel_specs(params: Params, spec: Spec | None = None, skip: Sequence[str] = ()) -> Specs:
    """``spec`` (default ``Unstructured()``) at every kernel: a leaf named
    ``kernel`` with two or more axes whose path contains none of ``skip``;
    ``None`` elsewhere. A pytree like ``params``, for :func:`prune`.

    An ``NofM`` spec skips the kernels whose axis is not a multiple of ``m``
    (a first convolution with 1 or 3 input channels: :func:`nofm_misfits`)."""
    spec = Unstructured() if spec is None else spec

    def one(path, leaf):
        name = path_str(path)
        if name.split("/")[-1] != "kernel" or np.ndim(leaf) < 2 or any(s in name for s in skip):
            return None
        if isinstance(spec, NofM) and np.shape(leaf)[spec.axis] % spec.m:
            return None
        return spec

    return jax.tree_util.tree_map_with_path(one, params)


def nofm_misfits(params: Params, spec: NofM) -> list[str]:
    """The kernels whose ``spec.axis`` is not a multiple of ``spec.m``: left dense by :func:`kernel_specs`."""
    return [
        path_str(p)
        for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if path_str(p).split("/")[-1] == "kernel" and np.ndim(leaf) >= 2 and np.shape(leaf)[spec.axis] % spec.m
    ]
