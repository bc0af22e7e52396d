"""One-shot, layer-wise pruning of one layer: ADMM, SparseGPT, Wanda and magnitude.

Run by hand (never a timed test):

    python benchmarks/bench_layerwise.py [--size 4096] [--repeats 3] [--devices 8]

The layer is ``d x d`` (``--size``) with a random kernel ``W0`` (entries
``N(0, 1/d)``) and a synthetic calibration set of ``2 d`` rows with correlated
columns, ``X = Z A`` with ``Z`` standard normal and ``A = I + N(0, 1/d)``,
and one input in 16 scaled by 10 (the large-scale features of a
transformer's activations). Each method prunes it to unstructured 50, 70
and 90 % and to 2:4, from ``H = X^T X``. A method's time is the median of
``--repeats`` calls after a first one, whose excess over the median is
reported as compilation; its error is the relative reconstruction error
``||X (W - W0)||^2 / ||X W0||^2``.

With ``--devices N`` the script runs itself again with N CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and prunes with ADMM
with ``W0`` split over its output axis and ``H`` replicated, against the same
call on one device of that process, with its default bfloat16 products and
with float32 ones: the largest difference, how many mask entries differ, both
errors, and the sharded time (CPU devices share the machine's cores: that
time measures the partitioning's overhead, not a speedup).

Writes ``benchmarks/results/layerwise.json`` with the machine and date.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _provenance import write_json

from admmprune.core import layerwise
from admmprune.core.sparsity import NofM, Unstructured

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETS = {
    "unstructured 50%": (Unstructured(), 0.5),
    "unstructured 70%": (Unstructured(), 0.3),
    "unstructured 90%": (Unstructured(), 0.1),
    "2:4": (NofM(2, 4), 1.0),
}
METHODS = {
    "admm": lambda h, w0, spec, keep: layerwise.admm(h, w0, spec, keep),
    "sparsegpt": lambda h, w0, spec, keep: layerwise.sparsegpt(h, w0, spec, keep),
    "wanda": lambda h, w0, spec, keep: layerwise.wanda(w0, h, spec, keep),
    "magnitude": lambda h, w0, spec, keep: layerwise.magnitude(w0, spec, keep),
}


def make_layer(d: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """``(h, w0)`` of the synthetic layer described in the module docstring."""
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.standard_normal((2 * d, d), dtype=np.float32))
    a = jnp.asarray(np.eye(d, dtype=np.float32) + rng.standard_normal((d, d), dtype=np.float32) / np.sqrt(d))
    scale = np.ones(d, np.float32)
    scale[rng.choice(d, d // 16, replace=False)] = 10.0
    x = (z @ a) * jnp.asarray(scale)
    w0 = jnp.asarray(rng.standard_normal((d, d), dtype=np.float32) / np.sqrt(d))
    return jax.block_until_ready(x.T @ x), w0


def timed(fn, repeats: int) -> tuple[jax.Array, float, float]:
    """``(result, first call's seconds, median seconds of the next `repeats`)``."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, first, statistics.median(times)


def measure(args) -> list[dict]:
    h, w0 = make_layer(args.size)
    rows = []
    for set_name, (spec, keep) in SETS.items():
        for method, fn in METHODS.items():
            w, first, median = timed(lambda fn=fn, spec=spec, keep=keep: fn(h, w0, spec, keep), args.repeats)
            row = {
                "set": set_name,
                "method": method,
                "seconds": round(median, 3),
                "compile_seconds": round(max(first - median, 0.0), 3),
                "error": float(layerwise.reconstruction_error(w, w0, h)),
                "density": float(jnp.mean(w != 0)),
            }
            rows.append(row)
            print(
                f"{set_name:18s} {method:10s} {row['seconds']:7.2f} s  (compile {row['compile_seconds']:5.2f} s)"
                f"  error {row['error']:.4f}  density {row['density']:.3f}",
                flush=True,
            )
        by = {r["method"]: r for r in rows if r["set"] == set_name}
        ratio = by["admm"]["seconds"] / by["sparsegpt"]["seconds"]
        print(f"{set_name:18s} admm / sparsegpt time {ratio:.2f}x", flush=True)
    return rows


def sharded_child(args) -> None:
    """In a process with ``args.devices`` CPU devices: ADMM sharded over the outputs against one device."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    h, w0 = make_layer(args.size)
    one = jax.devices()[0]
    mesh = Mesh(np.array(jax.devices()), ("out",))
    h1, w1 = jax.device_put(h, one), jax.device_put(w0, one)
    hs = jax.device_put(h, NamedSharding(mesh, PartitionSpec()))
    ws = jax.device_put(w0, NamedSharding(mesh, PartitionSpec(None, "out")))
    rows = []
    for set_name, (spec, keep) in SETS.items():
        for dtype in ("bfloat16", "float32"):
            kwargs = {"matmul_dtype": jnp.dtype(dtype)}
            single = np.asarray(layerwise.admm(h1, w1, spec, keep, **kwargs))
            sharded, _, median = timed(
                lambda spec=spec, keep=keep, kw=kwargs: layerwise.admm(hs, ws, spec, keep, **kw), 1
            )
            sharded = np.asarray(sharded)
            rows.append(
                {
                    "set": set_name,
                    "matmul_dtype": dtype,
                    "sharded_seconds": round(median, 3),
                    "max_abs_diff": float(np.max(np.abs(sharded - single))),
                    "max_abs_weight": float(np.max(np.abs(single))),
                    "mask_differences": int(np.sum((sharded != 0) != (single != 0))),
                    "error_one_device": float(layerwise.reconstruction_error(single, w0, h)),
                    "error_sharded": float(layerwise.reconstruction_error(sharded, w0, h)),
                }
            )
    print(json.dumps(rows))


def run_sharded(args) -> list[dict]:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={args.devices}", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, __file__, "--child", "--size", str(args.size), "--repeats", str(args.repeats)]
    cmd += ["--devices", str(args.devices)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    for r in rows:
        print(
            f"{r['set']:18s} admm ({r['matmul_dtype']}) on {args.devices} devices {r['sharded_seconds']:7.2f} s"
            f"  max |diff| {r['max_abs_diff']:.2e} (weights up to {r['max_abs_weight']:.2f})"
            f"  mask differences {r['mask_differences']}"
            f"  error {r['error_one_device']:.5f} -> {r['error_sharded']:.5f}",
            flush=True,
        )
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096, help="the layer is size x size")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--devices", type=int, default=1, help="also run ADMM sharded over this many CPU devices")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/layerwise.json")
    args = parser.parse_args()
    if args.child:
        sharded_child(args)
        return
    rows = measure(args)
    sharded = run_sharded(args) if args.devices > 1 else []
    write_json(
        args.out,
        {
            "command": " ".join(["python", "benchmarks/bench_layerwise.py", *sys.argv[1:]]),
            "size": args.size,
            "calibration_rows": 2 * args.size,
            "repeats": args.repeats,
            "rows": rows,
            "devices": args.devices,
            "sharded": sharded,
        },
    )


if __name__ == "__main__":
    main()
