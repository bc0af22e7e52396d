"""ADMM against one-shot magnitude filter pruning, from the same dense model.

Run by hand (a benchmark, not a test):

    python benchmarks/compare_magnitude.py --ratios 0.9 0.7 0.5

For each ratio it runs the default pipeline (LeNet-5 on MNIST) twice: with
ADMM (dense -> stages -> hard prune -> retrain), and with `--method magnitude`
(dense -> one-shot L2 filter pruning -> fine-tuning for as many epochs as
ADMM's stages and retraining take together). The dense phase is the same
(same config and seed, deterministic on CPU; the script checks that both dense
accuracies agree). Each run's workdir is kept under --root, so rerunning the
script reuses finished runs. Prints a markdown table and writes it, with the
machine and date, to --out.
"""

import argparse
import os
import sys

from _provenance import write_json

from admmprune import pipeline
from admmprune.train import apply_override, load_config


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9, 0.7, 0.5])
    parser.add_argument("--config", default="default")
    parser.add_argument("--root", default="runs/compare")
    parser.add_argument("--out", default="benchmarks/results/compare_magnitude.json")
    parser.add_argument("overrides", nargs="*", help="config overrides KEY=VALUE, applied to every run")
    args = parser.parse_args()

    rows = []
    for ratio in args.ratios:
        reports = {}
        for method in ("admm", "magnitude"):
            config = load_config(args.config)
            for item in args.overrides:
                key, _, value = item.partition("=")
                apply_override(config, key, value)
            config.prune.ratio = ratio
            config.prune.method = method
            config.progress = False
            workdir = os.path.join(args.root, f"{config.model.name}-{config.data.name}-{method}-{ratio:g}")
            print(f"== {method} at {ratio:g} ({workdir})", flush=True)
            reports[method] = pipeline.run(config, workdir)
        a, m = reports["admm"], reports["magnitude"]
        if a["dense"]["accuracy"] != m["dense"]["accuracy"]:
            print("warning: the two dense models differ", file=sys.stderr)
        epochs = len(a["stages"]) * load_config(args.config).admm.epochs_per_stage + a["retrain"]["epochs"]
        rows.append(
            {
                "ratio": ratio,
                "dense_accuracy": a["dense"]["accuracy"],
                "admm_accuracy": a["pruned"]["accuracy"],
                "magnitude_accuracy": m["pruned"]["accuracy"],
                "params_removed": a["params_removed"],
                "flops_removed": a["flops_removed"],
                "epochs_after_dense": epochs,
                "admm_seconds": a["seconds"],
                "magnitude_seconds": m["seconds"],
                "stage_ratios": a["stage_ratios"],
                "layers": {k: v["kept"] for k, v in a["layers"].items()},
                "params_dense": a["dense"]["params"],
                "params_pruned": a["collapsed"]["params"],
            }
        )

    lines = [
        "| ratio | dense | ADMM | magnitude + fine-tune | params removed | FLOPs removed | epochs after dense "
        "| ADMM wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ratio']:g} | {100 * r['dense_accuracy']:.2f}% | {100 * r['admm_accuracy']:.2f}% "
            f"| {100 * r['magnitude_accuracy']:.2f}% | {100 * r['params_removed']:.1f}% "
            f"| {100 * r['flops_removed']:.1f}% | {r['epochs_after_dense']} | {r['admm_seconds']:.0f} s |"
        )
    table = "\n".join(lines)
    print(table)
    write_json(
        args.out,
        {
            "command": " ".join(["python", "benchmarks/compare_magnitude.py", *sys.argv[1:]]),
            "rows": rows,
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
