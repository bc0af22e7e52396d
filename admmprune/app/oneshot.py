"""One-shot pruning of a saved model from calibration data, evaluated before
and after: what ``python -m admmprune.oneshot`` does (layer L4).

The pruning itself is :func:`admmprune.structure.oneshot.prune_model`; this
module reads the model and its dataset, draws the calibration samples from
the training split, evaluates on the eval split, and writes the output
directory (``report.json``, ``model/``, ``model.jax``) through a temporary
directory renamed into place, so that a failed run leaves nothing behind
and never touches an earlier output.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
import shutil
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from admmprune._errors import UserError
from admmprune.app.pipeline import make_eval, write_json_atomic
from admmprune.core.sparsity import NofM, Spec, Unstructured
from admmprune.runtime import data as data_lib
from admmprune.structure import calibration, oneshot

_NOFM = re.compile(r"^(\d+):(\d+)$")


def parse_sparsity(text: str) -> tuple[Spec, float]:
    """``(spec, keep_ratio)`` of ``--sparsity``: a fraction removed (``0.7``:
    unstructured, 70% of each layer's weights zero) or ``N:M`` (at most N
    non-zeros in every M consecutive inputs).

    Raises:
      UserError: neither, or out of range.
    """
    match = _NOFM.match(text.strip())
    if match:
        n, m = int(match[1]), int(match[2])
        if not 0 < n < m:
            raise UserError(f"--sparsity {text}: N:M needs 0 < N < M, e.g. 2:4")
        return NofM(n, m, axis=-2), n / m
    try:
        fraction = float(text)
    except ValueError:
        raise UserError(f"--sparsity takes a fraction removed like 0.7 or N:M like 2:4, not {text!r}") from None
    if not 0 < fraction < 1:
        raise UserError(f"--sparsity {text}: the fraction removed must be between 0 and 1 (exclusive)")
    return Unstructured(), 1 - fraction


def _normalize(info: data_lib.DatasetInfo, normalize: bool):
    return (info.mean, info.std) if normalize and info.mean is not None else None


def sliced(split: str, limit: int | None) -> str:
    """``split`` limited to its first ``limit`` examples (a run's ``data.limit``)."""
    return split if limit is None else f"{split}[:{limit}]"


def calibration_batches(
    name: str,
    *,
    data_dir: str | None,
    samples: int,
    batch_size: int,
    normalize: bool,
    seed: int,
    split: str = "train",
) -> list[np.ndarray]:
    """``samples`` shuffled examples of ``split`` of dataset ``name`` as model inputs, in batches."""
    info = data_lib.dataset_info(name, data_dir)
    source = data_lib.load_source(name, split, data_dir)
    if samples > len(source):
        raise UserError(f"--calibration {samples} is more than the {len(source)} examples of {name} {split}")
    size = min(batch_size, samples)
    loader = data_lib.make_loader(
        source,
        batch_size=size,
        seed=seed,
        normalize=None if info.tokens else _normalize(info, normalize),
        shard_index=0,
        shard_count=1,
        drop_remainder=False,
        limit=None,
    )
    out, have = [], 0
    for batch in loader:
        x = data_lib.model_inputs(batch)[: samples - have]
        out.append(x)
        have += len(x)
        if have >= samples:
            break
    return out


def evaluate(
    model: Any, name: str, *, data_dir: str | None, normalize: bool, batch_size: int, split: str = "test"
) -> dict[str, float]:
    """``{"accuracy"}`` on ``split`` (and ``"perplexity"`` for a token dataset)."""
    info = data_lib.dataset_info(name, data_dir)
    source = data_lib.load_source(name, split, data_dir)
    loader = data_lib.make_loader(
        source,
        batch_size=batch_size,
        seed=0,
        shuffle=False,
        drop_remainder=False,
        normalize=None if info.tokens else _normalize(info, normalize),
        shard_index=0,
        shard_count=1,
    )
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fn = make_eval(graphdef, loss=info.tokens)
    correct = total = 0
    loss = 0.0
    for batch in loader:
        out = fn(params, rest, data_lib.model_inputs(batch), batch["label"])
        if info.tokens:
            out, batch_loss = out
            loss += float(batch_loss)
        correct += int(out)
        total += batch["label"].size
    result = {"accuracy": correct / total}
    if info.tokens:
        result["perplexity"] = math.exp(loss / total)
    return result


def check_fits(model: Any, info: data_lib.DatasetInfo) -> None:
    """Raises a UserError unless ``model`` takes the dataset's inputs."""
    dtype = np.int32 if info.tokens else np.float32
    model.eval()
    try:
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, *info.image_shape), dtype))
    except Exception as e:  # noqa: BLE001 - whatever the model raises on a wrong input: one line
        raise UserError(
            f"the model does not take {info.name} inputs of shape {info.image_shape} ({type(e).__name__}); "
            "give the dataset it was trained on"
        ) from None


def model_layers(model: Any, x: Any) -> calibration.Layers:
    """:func:`~admmprune.structure.calibration.find_layers` of an NNX model on input ``x``."""
    params = nnx.state(model, nnx.Param)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    return calibration.find_layers(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, x)


def default_skip(model: Any, layers: Sequence[calibration.Layer]) -> list[str]:
    """The layer left dense by default: the model's output layer (its
    ``output_layer``, else the last layer it uses), as SparseGPT and Wanda do."""
    name = getattr(model, "output_layer", None)
    if name is not None:
        return [f"{name}/"]
    return [layers[-1].path] if layers else []


def run(
    model_dir: str,
    output: str,
    *,
    dataset: str,
    data_dir: str | None,
    normalize: bool,
    train_split: str = "train",
    eval_split: str = "test",
    sparsity: str,
    method: str,
    samples: int,
    batch_size: int,
    seed: int,
    skip: Sequence[str] | None,
    overwrite: bool,
    log=print,
) -> dict[str, Any]:
    """Prunes the model saved in ``model_dir`` and writes ``output``; returns the report."""
    from admmprune.runtime.checkpoint import load_model, save_model
    from admmprune.runtime.export import export_forward

    start = time.perf_counter()
    spec, keep = parse_sparsity(sparsity)
    info = data_lib.dataset_info(dataset, data_dir)
    model = load_model(model_dir)
    check_fits(model, info)
    batches = calibration_batches(
        dataset,
        data_dir=data_dir,
        samples=samples,
        batch_size=batch_size,
        normalize=normalize,
        seed=seed,
        split=train_split,
    )
    params = nnx.state(model, nnx.Param)
    skip = default_skip(model, model_layers(model, batches[0]).layers) if skip is None else list(skip)
    specs = oneshot.kernel_specs(params, spec, skip)
    misfits = oneshot.nofm_misfits(params, spec) if isinstance(spec, NofM) else []
    for path in misfits:
        log(f"{path} stays dense: its {spec.axis} axis is not a multiple of {spec.m} ({sparsity})")
    log(f"evaluating the dense model on {dataset}")
    before = evaluate(model, dataset, data_dir=data_dir, normalize=normalize, batch_size=256, split=eval_split)
    t0 = time.perf_counter()
    pruned, layers = oneshot.prune_model(model, batches, specs, keep, method=method, log=log)
    prune_seconds = time.perf_counter() - t0
    after = evaluate(pruned, dataset, data_dir=data_dir, normalize=normalize, batch_size=256, split=eval_split)
    report = {
        "source": os.path.abspath(model_dir),
        "method": method,
        "sparsity": sparsity,
        "calibration": {"dataset": dataset, "split": train_split, "samples": samples, "seed": seed},
        "eval_split": eval_split,
        "skipped": skip + misfits,
        "dense": before,
        "pruned": after,
        "prune_seconds": round(prune_seconds, 2),
        **layers,
        "seconds": round(time.perf_counter() - start, 2),
        "machine": {"platform": platform.platform(), "jax": jax.__version__},
        "date": datetime.date.today().isoformat(),
    }
    tmp = f"{output}.tmp-{os.getpid()}"
    try:
        os.makedirs(tmp)
        save_model(os.path.join(tmp, "model"), pruned)
        dtype = np.int32 if info.tokens else np.float32
        with open(os.path.join(tmp, "model.jax"), "wb") as f:
            f.write(export_forward(pruned, info.image_shape, dtype=dtype))
        write_json_atomic(os.path.join(tmp, "report.json"), report)
        if os.path.exists(output) and overwrite:
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return report
