"""admmprune against PyTorch on the same CPU, side by side (run by hand, not a test).

    python benchmarks/bench_vs_torch.py [--rounds 5] [--epochs lenet5,resnet20]

PyTorch runs in its own virtual environment (``--torch-python``; by default
``.bench-venv/``, created on first use with ``--torch-requirement``): it is
never a dependency of admmprune or of its tests. The PyTorch side is
``benchmarks/torch_reference.py``, a twin of each zoo model, started once and
kept warm; the two frameworks take turns, case by case and round by round, so
that both see the same machine load.

Cases (28x28x1 inputs, random data unless said):

- ``train``: one SGD (momentum 0.9) step at batch 128 of LeNet-5 and
  ResNet-20 (BatchNorm in training mode). admmprune's side is the pipeline's
  own step (``pipeline.make_train_step``), with its compiler options.
- ``eval``: the eval-mode forward pass at batch 256 of LeNet-5 and ResNet-20,
  dense and collapsed at ratios 0.5 and 0.9 (channels chosen by a hard prune
  of the initial weights: latency depends on shapes, not values). PyTorch runs
  a model of the collapsed widths.
- ``conv``: ResNet-20's 3x3 convolutions alone at batch 256, dense widths
  (16/32/64 channels) and half widths (8/16/32): throughput in GFLOP/s per
  width, the per-op evidence of how a collapsed model's speedup relates to
  its FLOPs ratio in each framework.
- ``grad``: the same convolutions' gradients alone at the training batch
  (128), with respect to the kernel and to the input, from a fixed output
  gradient: the per-op evidence of where a training step's time goes
  (admmprune's side is the zoo conv's own gradient, the chunked kernel
  gradient included, compiled with the pipeline's options).
- ``epoch`` (``--epochs``): one full epoch through the real input pipeline:
  admmprune's dense phase (``pipeline.run(..., stop_after="dense")`` with
  one epoch; LeNet-5 on MNIST, ResNet-20 on Fashion-MNIST), whose report
  splits its time into compute, data, checkpoint, log and eval, against a
  PyTorch epoch over the same split held in memory (shuffle, normalise, step).

Writes ``benchmarks/results/vs_torch.json`` (medians over all rounds, the
command, machine, versions, load, date); ``benchmarks/results.py`` renders the
README's table from it.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _provenance import write_json
from flax import nnx

import admmprune as ap
from admmprune import collapse, discovery, graph, measure, models, pipeline
from admmprune.configs import default as default_config
from admmprune.models import layers
from admmprune.runtime import data as data_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (28, 28, 1)
EPOCH_DATA = {"lenet5": "mnist", "resnet20": "fashion_mnist"}


class Torch:
    """The PyTorch process: one request, one answer."""

    def __init__(self, python: str, threads: int):
        self.proc = subprocess.Popen(
            [python, os.path.join(ROOT, "benchmarks", "torch_reference.py"), str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info = json.loads(self.proc.stdout.readline())

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"error: the PyTorch process ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def torch_python(args) -> str:
    """The interpreter with PyTorch; creates ``.bench-venv`` if it is the default and missing."""
    if os.path.exists(args.torch_python):
        return args.torch_python
    if args.torch_python != default_torch_python():
        raise SystemExit(f"error: --torch-python {args.torch_python} does not exist")
    venv = os.path.dirname(os.path.dirname(args.torch_python))
    print(f"creating {venv} with {args.torch_requirement} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([args.torch_python, "-m", "pip", "install", "-q", args.torch_requirement, "numpy"], check=True)
    return args.torch_python


def default_torch_python() -> str:
    return os.path.join(ROOT, ".bench-venv", "bin", "python")


def timer(fn, state):
    """``run(n)``: ``n`` timed calls of ``state = fn(*state)``, each waited for."""

    def run(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            state[:] = fn(*state)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
        return times

    run(3)  # compile and warm up
    return run


def jax_train(model: nnx.Module, batch: int):
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = jax.tree.map(jnp.copy, (params, rest))  # the step donates its inputs; the model keeps its own
    tx = optax.sgd(0.01, momentum=0.9)
    step = pipeline.make_train_step(graphdef, tx)
    kx, _ = jax.random.split(jax.random.key(0))
    data = {"image": jax.random.normal(kx, (batch, *SHAPE)), "label": jnp.arange(batch) % 10}

    def fn(params, rest, opt_state):
        params, rest, opt_state, _ = step(params, rest, opt_state, data)
        return params, rest, opt_state

    return timer(fn, [params, rest, tx.init(params)])


def jax_eval(model: nnx.Module, batch: int):
    model.eval()
    graphdef, state = nnx.split(model)
    options = dict(pipeline.CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None  # as the pipeline's eval
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x), compiler_options=options)
    x = jax.random.normal(jax.random.key(0), (batch, *SHAPE))

    def fn(state, _):
        return state, forward(state, x)

    return timer(fn, [state, None])


def jax_conv(shape: tuple[int, ...], out: int, kernel: int):
    """One bias-free SAME conv of the zoo (its inference form), compiled as the pipeline's eval."""
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, shape[-1], out))
    options = dict(pipeline.CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None
    dims = ("NHWC", "HWIO", "NHWC")
    conv = jax.jit(
        lambda x, w: layers.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims),
        compiler_options=options,
    )
    return timer(lambda x, w, _: (x, w, conv(x, w)), [x, w, None])


def jax_conv_grad(shape: tuple[int, ...], out: int, kernel: int, wrt: str):
    """The gradient of one zoo conv (its training form) with respect to ``wrt``, from a fixed output gradient."""
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, shape[-1], out))
    g = jax.random.normal(jax.random.key(2), (*shape[:-1], out))
    options = dict(pipeline.CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else None
    dims = ("NHWC", "HWIO", "NHWC")

    def dot(x, w):  # <conv(x, w), g>: its gradient is the conv's vjp of g, and XLA drops the unused forward
        return jnp.vdot(layers.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims), g)

    grad = jax.jit(jax.grad(dot, argnums=1 if wrt == "weight" else 0), compiler_options=options)
    return timer(lambda x, w, _: (x, w, grad(x, w)), [x, w, None])


#: ResNet-20's 3x3 convs at batch 256, dense (16/32/64 channels) and collapsed at 0.5 (8/16/32).
CONV_SHAPES = [(28, 16), (28, 8), (14, 32), (14, 16), (7, 64), (7, 32)]


def collapsed(model: nnx.Module, ratio: float) -> nnx.Module:
    """``model`` hard-pruned at ``ratio`` (initial weights) and collapsed."""
    params = nnx.state(model, nnx.Param)
    if getattr(model, "chain", None) is not None:
        specs, state_specs = graph.chain_specs(params, model.chain), None
    else:
        found = discovery.discover_nnx(model, jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32))
        specs, state_specs = found.specs, found.state_specs
    _, masks = ap.hard_prune(params, specs, 1.0 - ratio)
    return collapse.collapse(model, masks, specs, state_specs=state_specs)


def alternate(name: str, jax_run, torch_run, rounds: int, n: int) -> dict:
    ours, theirs = [], []
    for _ in range(rounds):
        ours += jax_run(n)
        theirs += torch_run(n)
    a, b = statistics.median(ours) * 1e3, statistics.median(theirs) * 1e3
    print(f"{name}: admmprune {a:.2f} ms, PyTorch {b:.2f} ms, ratio {a / b:.2f}", flush=True)
    return {"admmprune_ms": a, "torch_ms": b, "vs_torch": a / b, "samples": len(ours)}


def epoch_case(name: str, torch: Torch, data_dir: str | None, batch: int) -> dict:
    """One dense epoch of the pipeline, then one PyTorch epoch over the same split."""
    dataset = EPOCH_DATA[name]
    with tempfile.TemporaryDirectory() as tmp:
        config = default_config.get_config()
        config.model.name = name
        config.data.name = dataset
        config.data.data_dir = data_dir
        config.data.batch_size = batch
        config.dense.epochs = 1
        config.progress = False
        start = time.perf_counter()
        report = pipeline.run(config, os.path.join(tmp, "run"), stop_after="dense", log=lambda _: None)
        wall = time.perf_counter() - start
        parts = report["time"]["dense"]
        train = sum(v for k, v in parts.items() if k != "eval")
        source = data_lib.load_source(dataset, "train", data_dir, in_memory=True)
        info = data_lib.dataset_info(dataset, data_dir)
        path = os.path.join(tmp, "train.npz")
        mean, std = (info.mean[0], info.std[0]) if info.mean is not None else (0.0, 1.0)
        np.savez(path, images=source.images, labels=source.labels, mean=mean, std=std)
        theirs = torch.ask(
            op="epoch", model=name, widths=list(models.get(name, in_shape=SHAPE).widths), batch=batch, data=path
        )
    overhead = (parts["data"] + parts["log"] + parts["checkpoint"]) / train
    print(
        f"{name} epoch on {dataset}: admmprune {train:.1f} s (compute {parts['compute']:.1f}, "
        f"data {parts['data']:.1f}, "
        f"checkpoint {parts['checkpoint']:.1f}, log {parts['log']:.1f}; eval {parts['eval']:.1f} more), "
        f"PyTorch {theirs['seconds']:.1f} s, ratio {train / theirs['seconds']:.2f}, pipeline overhead {overhead:.1%}",
        flush=True,
    )
    return {
        "dataset": dataset,
        "admmprune_s": train,
        "torch_s": theirs["seconds"],
        "vs_torch": train / theirs["seconds"],
        "steps": theirs["steps"],
        "parts_s": parts,
        "overhead": overhead,
        "run_s": wall,
        "accuracy": report["dense"]["accuracy"],
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per case")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps per round and framework")
    parser.add_argument("--eval-calls", type=int, default=10, help="timed forward passes per round and framework")
    parser.add_argument("--epochs", default="lenet5", help="comma-separated models to time a full epoch of ('' none)")
    parser.add_argument("--data-dir", default=None, help="tfds data directory (default: tfds's)")
    parser.add_argument("--torch-python", default=default_torch_python())
    parser.add_argument("--torch-requirement", default="torch==2.13.0+cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch's intra-op threads")
    parser.add_argument("--models", default="lenet5,resnet20", help="comma-separated models to time steps and eval of")
    parser.add_argument(
        "--kernels", action=argparse.BooleanOptionalAction, default=True, help="time the lone 3x3 convs and gradients"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="JSON written (default: benchmarks/results/vs_torch.json, which the README renders, for a run of "
        "every case; vs_torch-partial.json for a run of fewer)",
    )
    args = parser.parse_args()
    if args.out is None:
        every = args.models == "lenet5,resnet20" and args.kernels and set(args.epochs.split(",")) >= {"lenet5"}
        name = "vs_torch.json" if every else "vs_torch-partial.json"
        args.out = os.path.join(ROOT, "benchmarks", "results", name)

    torch = Torch(torch_python(args), args.threads)
    print(f"PyTorch {torch.info['torch']} ({torch.info['threads']} threads), jax {jax.__version__}", flush=True)
    rows = {"train": [], "eval": [], "epoch": [], "conv": [], "grad": []}
    for name in filter(None, args.models.split(",")):
        model = models.get(name, in_shape=SHAPE)
        widths = list(model.widths)
        result = alternate(
            f"{name} train step, batch 128",
            jax_train(model, 128),
            lambda n, widths=widths, name=name: torch.ask(op="train", model=name, widths=widths, batch=128, n=n)[
                "times"
            ],
            args.rounds,
            args.train_steps,
        )
        rows["train"].append({"model": name, "batch": 128, **result})
        example = jax.ShapeDtypeStruct((1, *SHAPE), jnp.float32)
        dense_flops = measure.flops(model, example)
        for ratio in (0.0, 0.5, 0.9):
            m = model if ratio == 0 else collapsed(model, ratio)
            w = list(m.widths)
            result = alternate(
                f"{name} eval forward, ratio {ratio:g}, batch 256",
                jax_eval(m, 256),
                lambda n, w=w, name=name: torch.ask(op="eval", model=name, widths=w, batch=256, n=n)["times"],
                args.rounds,
                args.eval_calls,
            )
            rows["eval"].append(
                {
                    "model": name,
                    "ratio": ratio,
                    "widths": w,
                    "flops": measure.flops(m, example),
                    "flops_ratio": dense_flops / measure.flops(m, example),
                    **result,
                }
            )
    for size, channels in CONV_SHAPES if args.kernels else ():
        shape = (256, size, size, channels)
        result = alternate(
            f"3x3 conv {channels} -> {channels} channels, {size}x{size}, batch 256",
            jax_conv(shape, channels, 3),
            lambda n, shape=shape, c=channels: torch.ask(op="conv", shape=list(shape), out=c, kernel=3, n=n)["times"],
            args.rounds,
            args.eval_calls,
        )
        flops = 2 * 256 * size * size * channels * channels * 9
        rows["conv"].append(
            {
                "size": size,
                "channels": channels,
                "batch": 256,
                "flops": flops,
                "admmprune_gflops": flops / result["admmprune_ms"] / 1e6,
                "torch_gflops": flops / result["torch_ms"] / 1e6,
                **result,
            }
        )
    for (size, channels), wrt in ((s, wrt) for s in CONV_SHAPES if args.kernels for wrt in ("weight", "input")):
        shape = (128, size, size, channels)
        result = alternate(
            f"3x3 conv {channels} -> {channels} channels, {size}x{size}, batch 128, gradient wrt {wrt}",
            jax_conv_grad(shape, channels, 3, wrt),
            lambda n, shape=shape, c=channels, wrt=wrt: torch.ask(
                op="conv_grad", shape=list(shape), out=c, kernel=3, wrt=wrt, n=n
            )["times"],
            args.rounds,
            args.eval_calls,
        )
        flops = 2 * 128 * size * size * channels * channels * 9
        rows["grad"].append(
            {
                "size": size,
                "channels": channels,
                "batch": 128,
                "wrt": wrt,
                "flops": flops,
                "admmprune_gflops": flops / result["admmprune_ms"] / 1e6,
                "torch_gflops": flops / result["torch_ms"] / 1e6,
                **result,
            }
        )
    for row in rows["eval"]:
        dense = next(r for r in rows["eval"] if r["model"] == row["model"] and r["ratio"] == 0)
        row["speedup"] = dense["admmprune_ms"] / row["admmprune_ms"]
        row["torch_speedup"] = dense["torch_ms"] / row["torch_ms"]
    for name in filter(None, args.epochs.split(",")):
        rows["epoch"].append({"model": name, **epoch_case(name, torch, args.data_dir, 128)})
    torch.close()
    write_json(
        args.out,
        {
            "command": " ".join(["python", "benchmarks/bench_vs_torch.py", *sys.argv[1:]]),
            "torch": torch.info["torch"],
            "torch_threads": torch.info["threads"],
            "flax": __import__("flax").__version__,
            "rounds": args.rounds,
            "rows": [{"case": case, **row} for case, case_rows in rows.items() for row in case_rows],
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
