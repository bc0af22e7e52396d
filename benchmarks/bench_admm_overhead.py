"""Cost of ADMM in the train step: a jitted SGD step with and without `admm`.

Run by hand (never a timed test):

    python benchmarks/bench_admm_overhead.py [--steps 200] [--rounds 7] [--intervals 100 20]

Model: LeNet-5 (431,080 parameters), batch 128, cross-entropy, SGD with
momentum 0.9; ADMM prunes every kernel's filters but the output layer's, with
its default dual-update interval (100 steps) and a geometric rho schedule.
Both steps are timed in rounds that alternate which goes first (the machine is
shared and noisy);
the figure is the median of the per-round ratios ADMM / plain.
"""

import argparse
import statistics
import sys
import time

import jax
import optax
from _provenance import write_json
from flax import nnx

import admmprune as ap
from admmprune import models


def make_step(graphdef, tx):
    def loss_fn(params, batch):
        logits = nnx.merge(graphdef, params)(batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    @jax.jit
    def step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def time_steps(step, params, opt_state, batch, n):
    for _ in range(3):  # warm-up, compilation excluded
        params, opt_state = step(params, opt_state, batch)
    jax.block_until_ready(params)
    t0 = time.perf_counter()
    for _ in range(n):
        params, opt_state = step(params, opt_state, batch)
    jax.block_until_ready(params)
    return (time.perf_counter() - t0) / n * 1e3, params, opt_state


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--intervals",
        type=int,
        nargs="+",
        default=[100, 20],
        help="ADMM dual-update intervals (the library's default, the pipeline's default)",
    )
    parser.add_argument("--out", default="benchmarks/results/admm_overhead.json")
    args = parser.parse_args()
    rows = [measure_interval(args, interval) for interval in args.intervals]
    write_json(
        args.out,
        {
            "command": " ".join(["python", "benchmarks/bench_admm_overhead.py", *sys.argv[1:]]),
            "steps": args.steps,
            "rounds": args.rounds,
            "batch": args.batch,
            "rows": rows,
        },
    )


def measure_interval(args, interval: int) -> dict:
    """Times the plain and the ADMM step in alternating rounds; returns the medians and per-round ratios."""

    model = models.get("lenet5")
    graphdef, params = nnx.split(model, nnx.Param)
    specs = ap.resolve(params, ap.default_rules(output=type(model).output_layer))
    key = jax.random.key(0)
    batch = {
        "image": jax.random.normal(key, (args.batch, 28, 28, 1)),
        "label": jax.random.randint(key, (args.batch,), 0, 10),
    }
    plain_tx = optax.sgd(0.01, momentum=0.9)
    admm_tx = optax.chain(
        ap.admm(specs, rho=1e-3, interval=interval, rho_schedule=ap.geometric_rho(1.3, max_rho=1.0)),
        optax.sgd(0.01, momentum=0.9),
    )
    runs = {}
    for name, tx in (("plain", plain_tx), ("admm", admm_tx)):
        opt_state = tx.init(params)
        if name == "admm":
            opt_state = ap.set_stage(opt_state, 0.5)
        runs[name] = [make_step(graphdef, tx), params, opt_state, []]

    for r in range(args.rounds):
        order = list(runs.items()) if r % 2 == 0 else list(runs.items())[::-1]  # no first-mover bias
        for _name, run in order:
            ms, run[1], run[2] = time_steps(run[0], run[1], run[2], batch, args.steps)
            run[3].append(ms)
    plain, admm = runs["plain"][3], runs["admm"][3]
    ratios = [a / p for a, p in zip(admm, plain, strict=True)]
    print(f"interval    {interval}")
    print(f"plain step  median {statistics.median(plain):.2f} ms  {[round(x, 2) for x in plain]}")
    print(f"admm step   median {statistics.median(admm):.2f} ms  {[round(x, 2) for x in admm]}")
    print(f"ratio       median {statistics.median(ratios):.3f}  {[round(x, 3) for x in ratios]}", flush=True)
    return {
        "interval": interval,
        "params": sum(x.size for x in jax.tree.leaves(params)),
        "plain_ms": statistics.median(plain),
        "admm_ms": statistics.median(admm),
        "ratio": statistics.median(ratios),
        "round_ratios": ratios,
    }


if __name__ == "__main__":
    main()
