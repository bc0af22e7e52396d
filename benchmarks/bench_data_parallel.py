"""Step time of the smoke model's ADMM training step on 1, 2, 4 and 8 devices.

Run by hand (never a timed test):

    python benchmarks/bench_data_parallel.py [--devices 1,2,4,8] [--steps 50] [--rounds 3]

The step is the pipeline's own (``pipeline.make_train_step`` with the ADMM
chain of ``configs/smoke.py``: LeNet-5, global batch 64, a projection and dual
update every 4 steps), on a mesh over N CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, one subprocess per
N, since JAX fixes the device count at start), with the parameters, optimizer
state and Z, U replicated and with them FSDP-sharded. Each (N, sharding) is
timed ``--rounds`` times, in rounds that alternate the order of N (the machine
is shared and noisy); the figure is the median step time over rounds, and the
throughput ratio is ``t(1 device) / t(N devices)`` at the same global batch.
Writes ``benchmarks/results/data_parallel.json`` (with the machine and date);
``benchmarks/results.py`` renders its table.

CPU "devices" made by the XLA flag share the machine's cores: on a machine with
fewer cores than devices the ratio measures the partitioning overhead, not a
speedup. On GPUs and TPUs the same command measures real scaling.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _provenance import write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARDINGS = ("replicated", "fsdp")


def child(sharding: str, steps: int, warmup: int) -> None:
    """Times the step on this process's devices; prints one JSON line."""
    import jax
    import numpy as np
    from flax import nnx

    import admmprune as ap
    from admmprune import distributed, graph, models, pipeline, train

    config = train.load_config("smoke")
    model = models.get("lenet5", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    specs = graph.chain_specs(params, model.chain)
    tx = pipeline.make_tx(pipeline.settings(config), pipeline.Phase("admm", 1, 0.5), specs, steps + warmup)
    opt_state = ap.set_stage(tx.init(params), 0.5)
    dp = distributed.DataParallel(param_sharding=sharding)
    params, rest, opt_state = dp.put((params, rest, opt_state))
    step = pipeline.make_train_step(
        graphdef,
        tx,
        admm_metrics=True,
        shardings=(dp.shardings((params, rest, opt_state)), dp.data, dp.replicated),
    )
    rng = np.random.default_rng(0)
    batch_size = config.data.batch_size
    batch = dp.batch(
        {
            "image": rng.normal(size=(batch_size, 28, 28, 1)).astype(np.float32),
            "label": rng.integers(0, 10, batch_size).astype(np.int32),
        }
    )
    for _ in range(warmup + 1):  # the first call compiles
        params, rest, opt_state, m = step(params, rest, opt_state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        params, rest, opt_state, m = step(params, rest, opt_state, batch)
        jax.block_until_ready(m)
        times.append((time.perf_counter() - start) * 1e3)
    print(
        json.dumps(
            {
                "devices": jax.device_count(),
                "sharding": sharding,
                "ms": statistics.median(times),
                "batch": batch_size,
                "platform": jax.devices()[0].platform,
                "jax": jax.__version__,
            }
        )
    )


def measure(n: int, sharding: str, steps: int, warmup: int) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, __file__, "--child", sharding, "--steps", str(steps), "--warmup", str(warmup)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "data_parallel.json"))
    parser.add_argument("--child", choices=SHARDINGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps, args.warmup)
        return

    counts = [int(n) for n in args.devices.split(",")]
    runs: dict[tuple[int, str], list[float]] = {}
    info = None
    for r in range(args.rounds):
        for n in counts if r % 2 == 0 else counts[::-1]:
            for sharding in SHARDINGS:
                info = measure(n, sharding, args.steps, args.warmup)
                runs.setdefault((n, sharding), []).append(info["ms"])
                print(f"round {r + 1}: {n} device(s), {sharding}: {info['ms']:.2f} ms", file=sys.stderr, flush=True)
    ms = {key: statistics.median(v) for key, v in runs.items()}
    spread = max((max(v) / min(v), key) for key, v in runs.items())
    rows = [
        {
            "devices": n,
            **{f"{sh}_ms": ms[n, sh] for sh in SHARDINGS},
            **{f"{sh}_rounds_ms": runs[n, sh] for sh in SHARDINGS},
        }
        for n in counts
    ]
    write_json(
        args.out,
        {
            "command": " ".join(["python", "benchmarks/bench_data_parallel.py", *sys.argv[1:]]),
            "devices": f"{info['platform']} x{','.join(map(str, counts))} (--xla_force_host_platform_device_count)",
            "steps": args.steps,
            "rounds": args.rounds,
            "rows": rows,
            "widest_spread": {"ratio": spread[0], "devices": spread[1][0], "sharding": spread[1][1]},
        },
    )
    for row in rows:
        print(f"{row['devices']} device(s): " + ", ".join(f"{sh} {row[sh + '_ms']:.2f} ms" for sh in SHARDINGS))


if __name__ == "__main__":
    main()
