"""One-shot pruning without retraining: ADMM against SparseGPT, Wanda and magnitude.

Prunes trained models with every method of ``admmprune.oneshot`` on the same
calibration samples (drawn from the training split with each calibration
seed), at each sparsity, and evaluates them on the eval split: accuracy,
and perplexity for the character GPT. Also records the pruning wall time
(the layers' Gram matrices and solves; the first run of each layer shape
includes its compilation, so the table quotes the median over seeds) and the
peak memory above the process's at the start of each run.

    python benchmarks/bench_oneshot.py --root runs/suite/dense

reads the dense models that ``benchmarks/suite.py`` trained there
(ROOT/MODEL-DATASET-sS/dense; the README's table: seed 0 of each model).
Results go to ``benchmarks/results/oneshot.json`` (README: "One-shot
pruning"), written after every run so that an interrupted benchmark keeps
what it measured; ``--resume`` skips the runs already there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

from _provenance import write_json
from suite import mean_sd, paired

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

#: (workdir name under --root, dataset, calibration samples): the cases.
CASES = {
    "lenet5": ("lenet5-mnist-s0", "mnist", 512),
    "resnet20": ("resnet20-fashion-s0", "fashion_mnist", 512),
    "vit": ("vit-fashion-s0", "fashion_mnist", 512),
    "gpt": ("gpt-shakespeare-s0", "shakespeare_chars", 128),
}


def summaries(rows: list[dict]) -> list[dict]:
    """Per model and sparsity: each method's mean and sd over calibration seeds, and ADMM's paired
    differences (accuracy in points; for a language model, how much lower its perplexity is, relatively)."""
    out = []
    for model, sparsity in dict.fromkeys((r["model"], r["sparsity"]) for r in rows):
        group = [r for r in rows if r["model"] == model and r["sparsity"] == sparsity]
        by = {m: {r["seed"]: r for r in group if r["method"] == m} for m in dict.fromkeys(r["method"] for r in group)}
        admm = by.get("admm", {})
        methods = []
        for method, runs in by.items():
            acc = {s: r["accuracy"] for s, r in runs.items()}
            entry = {
                "method": method,
                "n": len(runs),
                "accuracy": mean_sd(list(acc.values())),
                "prune_s": statistics.median(r["prune_s"] for r in runs.values()),
                "peak_mib": max(r["peak_mib"] for r in runs.values()),
                "admm_minus": paired({s: r["accuracy"] for s, r in admm.items()}, acc) if method != "admm" else None,
            }
            if all("perplexity" in r for r in runs.values()):
                ppl = {s: r["perplexity"] for s, r in runs.items()}
                entry["perplexity"] = mean_sd(list(ppl.values()))
                if method != "admm":  # 1 - admm / method per seed: how much lower ADMM's perplexity is
                    ratio = {s: 1 - admm[s]["perplexity"] / ppl[s] for s in ppl if s in admm}
                    entry["admm_lower"] = paired(ratio, dict.fromkeys(ratio, 0.0))
            methods.append(entry)
        out.append({"model": model, "dataset": group[0]["dataset"], "sparsity": sparsity, "methods": methods})
    return out


class PeakMemory:
    """The peak resident memory (MiB) of this process above its level at the start, sampled every 20 ms."""

    def __init__(self):
        self.peak = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def __enter__(self):
        self._base = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss() - self._base)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss() - self._base)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.join(ROOT, "runs", "suite", "dense"))
    parser.add_argument("--models", default=",".join(CASES), help=f"comma-separated, of {','.join(CASES)}")
    parser.add_argument("--sparsities", default="0.5,0.7,0.9,2:4")
    parser.add_argument("--methods", default="magnitude,wanda,sparsegpt,admm")
    parser.add_argument("--seeds", type=int, default=3, help="calibration seeds 0..N-1")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "oneshot.json"))
    parser.add_argument("--resume", action="store_true", help="keep the rows of --out and skip their runs")
    args = parser.parse_args()

    from flax import nnx

    from admmprune.app import oneshot as app
    from admmprune.runtime.checkpoint import load_model
    from admmprune.structure import oneshot

    rows = []
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)["rows"]
    done = {(r["model"], r["sparsity"], r["method"], r["seed"]) for r in rows}
    dense_rows = []
    if args.resume and os.path.exists(args.out):
        with open(args.out) as f:
            dense_rows = [d for d in json.load(f)["dense"] if d["model"] not in args.models.split(",")]
    for name in args.models.split(","):
        workdir, dataset, samples = CASES[name]
        model_dir = os.path.join(args.root, workdir, "dense")
        with open(os.path.join(args.root, workdir, "config.json")) as f:
            normalize = bool(json.load(f)["data"].get("normalize", True))
        model = load_model(model_dir)
        dense = app.evaluate(model, dataset, data_dir=args.data_dir, normalize=normalize, batch_size=256)
        dense_rows.append({"model": name, "dataset": dataset, **dense})
        print(f"{name}: dense {dense}", flush=True)
        for seed in range(args.seeds):
            batches = app.calibration_batches(
                dataset, data_dir=args.data_dir, samples=samples, batch_size=128, normalize=normalize, seed=seed
            )
            params = nnx.state(model, nnx.Param)
            skip = app.default_skip(model, app.model_layers(model, batches[0]).layers)
            for sparsity in args.sparsities.split(","):
                spec, keep = app.parse_sparsity(sparsity)
                specs = oneshot.kernel_specs(params, spec, skip)
                for method in args.methods.split(","):
                    if (name, sparsity, method, seed) in done:
                        continue
                    start = time.perf_counter()
                    with PeakMemory() as memory:
                        pruned, report = oneshot.prune_model(model, batches, specs, keep, method=method, progress=False)
                    seconds = time.perf_counter() - start
                    result = app.evaluate(pruned, dataset, data_dir=args.data_dir, normalize=normalize, batch_size=256)
                    errors = [layer["error"] for layer in report["layers"].values()]
                    row = {
                        "model": name,
                        "dataset": dataset,
                        "sparsity": sparsity,
                        "method": method,
                        "seed": seed,
                        "samples": samples,
                        **result,
                        "prune_s": round(seconds, 2),
                        "peak_mib": round(memory.peak, 1),
                        "mean_error": statistics.fmean(errors),
                        "layers": len(errors),
                    }
                    rows.append(row)
                    extra = f", perplexity {result['perplexity']:.3f}" if "perplexity" in result else ""
                    print(
                        f"{name} {sparsity} {method} seed {seed}: accuracy {result['accuracy']:.2%}{extra}, "
                        f"{seconds:.1f} s, mean layer error {row['mean_error']:.4f}",
                        flush=True,
                    )
                    write_json(
                        args.out,
                        {
                            "command": " ".join(["python", "benchmarks/bench_oneshot.py", *sys.argv[1:]]),
                            "dense": dense_rows,
                            "summaries": summaries(rows),
                            "rows": rows,
                        },
                    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
