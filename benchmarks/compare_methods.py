"""Every pruning method on the same model, data, ratio and training budget.

Run by hand (a benchmark, not a test):

    python benchmarks/compare_methods.py lenet5-mnist        # LeNet-5, MNIST, ratio 0.9
    python benchmarks/compare_methods.py resnet20-fashion    # ResNet-20, Fashion-MNIST, ratio 0.5

Each case runs the pipeline once per method (``admmprune/app/methods.py``) with
the same config and seed, so the dense phase is the same model (deterministic
on CPU; the script warns if the dense accuracies differ) and every method
trains for the same epochs after it. Workdirs are kept under ``--root``, so a
rerun reuses finished runs and resumes interrupted ones. The criteria
analysis (``python -m admmprune.analyze``) runs on the case's dense model.
Writes a JSON (rows, markdown table, machine, date) to
``benchmarks/results/compare_<case>.json`` and prints the table.

The ResNet-20 case trains on the first 8,192 Fashion-MNIST training images
(the whole 10,000-image test split evaluates) with 3 dense and 4 retraining
epochs: the full schedule takes about 40 minutes per method on the 2-core
CPU this was measured on.
"""

import argparse
import os
import statistics
import subprocess
import sys

import jax.numpy as jnp
from _provenance import write_json

import admmprune
from admmprune import measure, methods, pipeline
from admmprune.train import apply_override, load_config

CASES = {
    "lenet5-mnist": {"ratio": 0.9, "overrides": []},
    "resnet20-fashion": {
        "ratio": 0.5,
        "overrides": [
            "model.name=resnet20",
            "data.name=fashion_mnist",
            "data.limit=8192",
            "dense.epochs=3",
            "retrain.epochs=4",
            "measure.repeats=10",
        ],
    },
}


ROUNDS = 5


def remeasure(args, case, reports):
    """Latencies of the dense and every collapsed model, timed in interleaved rounds.

    Each run measured its models when it ended, while other jobs may have
    shared the machine; timing all models in alternation makes them comparable.
    """
    models = {}
    for method in reports:
        workdir = os.path.join(args.root, f"{args.case}-{method}-{case['ratio']:g}")
        models.setdefault("dense", admmprune.load(os.path.join(workdir, "dense")))
        models[method] = admmprune.load(os.path.join(workdir, "model"))
    first = next(iter(reports.values()))
    shape = models["dense"].config.get("in_shape", (28, 28, 1))
    x = jnp.zeros((first["collapsed"]["latency_batch"], *shape), jnp.float32)
    times = {k: [] for k in models}
    for _ in range(ROUNDS):
        for k, m in models.items():
            m.eval()
            times[k].append(measure.latency_ms(m, x, repeats=10)["median"])
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--methods", nargs="+", default=list(methods.METHODS), choices=methods.METHODS)
    parser.add_argument("--root", default="runs/methods")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/compare_<case>.json")
    parser.add_argument("--no-analysis", action="store_true", help="skip the criteria analysis of the dense model")
    parser.add_argument("overrides", nargs="*", help="more config overrides KEY=VALUE, applied to every run")
    args = parser.parse_args()
    case = CASES[args.case]

    reports = {}
    for method in args.methods:
        config = load_config("default")
        for item in [*case["overrides"], *args.overrides]:
            key, _, value = item.partition("=")
            apply_override(config, key, value)
        config.prune.ratio = case["ratio"]
        config.prune.method = method
        config.progress = False
        workdir = os.path.join(args.root, f"{args.case}-{method}-{case['ratio']:g}")
        print(f"== {method} ({workdir})", flush=True)
        reports[method] = pipeline.run(config, workdir)
    dense = {r["dense"]["accuracy"] for r in reports.values()}
    if len(dense) > 1:
        print(f"warning: the dense models differ: {sorted(dense)}", file=sys.stderr)

    latency = remeasure(args, case, reports)
    rows = []
    for method, r in reports.items():
        rows.append(
            {
                "method": method,
                "dense_accuracy": r["dense"]["accuracy"],
                "accuracy": r["collapsed"]["accuracy"],
                "params_removed": r["params_removed"],
                "flops_removed": r["flops_removed"],
                "latency_dense_ms": latency["dense"],
                "latency_collapsed_ms": latency[method],
                "speedup": latency["dense"] / latency[method],
                "layers": {k: v["kept"] for k, v in r["layers"].items()},
                "seconds": r["seconds"],
            }
        )
    first = next(iter(reports.values()))
    head = (
        f"{first['model']} on {first['dataset']}, ratio {case['ratio']:g}; dense accuracy "
        f"{100 * first['dense']['accuracy']:.2f}%; latency at batch {first['collapsed']['latency_batch']}, "
        f"dense {latency['dense']:.2f} ms (median of {ROUNDS} interleaved rounds)"
    )
    lines = [
        head,
        "",
        "| method | accuracy | params removed | FLOPs removed | collapsed latency | speedup | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['method']} | {100 * row['accuracy']:.2f}% | {100 * row['params_removed']:.1f}% "
            f"| {100 * row['flops_removed']:.1f}% | {row['latency_collapsed_ms']:.2f} ms | {row['speedup']:.1f}x "
            f"| {row['seconds']:.0f} s |"
        )
    table = "\n".join(lines)
    print(table)

    analysis = None
    if not args.no_analysis:
        dense_dir = os.path.join(args.root, f"{args.case}-{args.methods[0]}-{case['ratio']:g}", "dense")
        out_dir = os.path.join(args.root, f"{args.case}-analysis")
        if not os.path.exists(out_dir):
            dataset = first["dataset"]
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "admmprune.analyze",
                    dense_dir,
                    "--output",
                    out_dir,
                    "--ratio",
                    str(case["ratio"]),
                    "--dataset",
                    dataset,
                ],
                check=True,
            )
        with open(os.path.join(out_dir, "summary.md")) as f:
            analysis = f.read()

    write_json(
        args.out or f"benchmarks/results/compare_{args.case}.json",
        {
            "command": " ".join(["python", "benchmarks/compare_methods.py", *sys.argv[1:]]),
            "case": args.case,
            "model": first["model"],
            "dataset": first["dataset"],
            "ratio": case["ratio"],
            "overrides": [*case["overrides"], *args.overrides],
            "latency_batch": first["collapsed"]["latency_batch"],
            "rows": rows,
            "table": table,
            "criteria_analysis": analysis,
            "criteria_figures": None if args.no_analysis else os.path.join(out_dir, "figures"),
        },
    )


if __name__ == "__main__":
    main()
