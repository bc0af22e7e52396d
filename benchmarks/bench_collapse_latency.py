"""Latency of dense vs collapsed models next to their FLOPs reduction.

Run by hand (a benchmark, not a test):

    python benchmarks/bench_collapse_latency.py [--batch 256] [--rounds 5]

For LeNet-5 (28x28x1) and ResNet-20 (32x32x3) pruned at ratios 0.5 and 0.9:
channel groups from the declared chain (LeNet-5) or traced discovery
(ResNet-20), a hard prune of the initial weights (latency depends on shapes,
not values), collapse, then the eval-mode jitted forward pass of both models
timed in alternating rounds (warm-up excluded, median of the per-round
medians). The aim: measured speedup >= 0.8 x the FLOPs ratio.
"""

import argparse
import statistics
import sys

import jax
import jax.numpy as jnp
from _provenance import write_json
from flax import nnx

import admmprune as ap
from admmprune import collapse, discovery, graph, measure, models

CASES = [("lenet5", {}, (28, 28, 1)), ("resnet20", {}, (32, 32, 3))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--out", default="benchmarks/results/collapse_latency.json")
    args = parser.parse_args()

    rows = []
    print(
        "| model | ratio | FLOPs dense | FLOPs collapsed | FLOPs ratio | latency dense (ms) "
        "| latency collapsed (ms) | speedup | speedup / FLOPs ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, kwargs, shape in CASES:
        model = models.get(name, in_shape=shape, **kwargs)
        model.eval()
        example = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
        params = nnx.state(model, nnx.Param)
        if getattr(model, "chain", None) is not None:
            specs, state_specs = graph.chain_specs(params, model.chain), None
        else:
            found = discovery.discover_nnx(model, example)
            specs, state_specs = found.specs, found.state_specs
        x = jax.random.normal(jax.random.key(0), (args.batch, *shape))
        for ratio in args.ratios:
            _, masks = ap.hard_prune(params, specs, 1.0 - ratio)
            slim = collapse.collapse(model, masks, specs, state_specs=state_specs)
            slim.eval()
            f_dense, f_slim = measure.flops(model, example), measure.flops(slim, example)
            dense_ms, slim_ms = [], []
            for _ in range(args.rounds):
                dense_ms.append(measure.latency_ms(model, x, repeats=args.repeats)["median"])
                slim_ms.append(measure.latency_ms(slim, x, repeats=args.repeats)["median"])
            d, s = statistics.median(dense_ms), statistics.median(slim_ms)
            fr = f_dense / f_slim
            rows.append(
                {
                    "model": name,
                    "input": list(shape),
                    "ratio": ratio,
                    "flops_dense": f_dense,
                    "flops_collapsed": f_slim,
                    "latency_dense_ms": d,
                    "latency_collapsed_ms": s,
                    "flops_removed": 1 - f_slim / f_dense,
                }
            )
            print(
                f"| {name} | {ratio:g} | {f_dense / 1e6:.2f} M | {f_slim / 1e6:.3f} M | {fr:.1f}x | {d:.2f} | {s:.2f} "
                f"| {d / s:.1f}x | {d / s / fr:.2f} |",
                flush=True,
            )

    write_json(
        args.out,
        {
            "command": " ".join(["python", "benchmarks/bench_collapse_latency.py", *sys.argv[1:]]),
            "batch": args.batch,
            "rounds": args.rounds,
            "repeats": args.repeats,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
