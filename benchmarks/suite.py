"""ADMM against every other method over several seeds, with paired confidence intervals.

Run by hand (a benchmark, not a test), in as many sittings as it takes:

    python benchmarks/suite.py                                   # every case, budget, method and seed
    python benchmarks/suite.py --cases lenet5-mnist-0.9 --budgets peer --seeds 0 1 2
    python benchmarks/suite.py --collect                         # no training: the JSON from finished runs

Each named case is a model, a dataset and a ratio; each runs at two budgets
of epochs after the dense phase: ``peer`` (4 epochs, Torch-Pruning's
protocol: one per stage, the rest retraining) and ``default`` (the config's
defaults). A seed's dense model is trained once (``pipeline.run(...,
stop_after="dense")``) and every method of every case and budget of that
model starts from it (``dense.init``): same seed, same dense model, so the
methods' differences are paired. The dense recipe is the peer's (learning
rate 0.05 with a 10% linear warm-up, 4 epochs for LeNet-5, 3 for ResNet-20).

Besides the methods, a case may run *variants*: a method with other settings
(:data:`VARIANTS`, e.g. ``admm_pruned_penalty``), compared with ADMM like a
method.

Every run's workdir stays under ``--root``: a rerun reuses finished runs and
resumes interrupted ones. The rows of ``benchmarks/results/suite.json`` are
finished runs too: each carries a fingerprint of its run's configuration
(the method's own settings, not the dense model's path), and a run whose row
is there with the fingerprint today's code gives it is not trained again, so
the suite goes on in a fresh checkout; a row whose fingerprint no longer
matches (its method's defaults changed) is dropped and its run trained anew.
After each run ``benchmarks/results/suite.json`` is rewritten from every
finished run (so a crash loses at most the run in progress): one row per run, and per case and budget each method's
mean and standard deviation over its seeds and ADMM's paired difference from
it, with a 95% confidence interval (Student's t over the seeds both have),
and the wall time of the case's runs. ``benchmarks/results.py`` renders the
README's table from it.
"""

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time

from _provenance import cpu, write_json

from admmprune import methods, pipeline
from admmprune.core import schedules
from admmprune.train import apply_override, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "benchmarks", "results", "suite.json")

#: Dense models, trained once per seed and shared by every case that names them.
DENSE = {
    "lenet5-mnist": ["dense.learning_rate=0.05", "dense.warmup=0.1", "dense.epochs=4"],
    "resnet20-fashion": [
        "model.name=resnet20",
        "data.name=fashion_mnist",
        "dense.learning_rate=0.05",
        "dense.warmup=0.1",
        "dense.epochs=3",
        "measure.repeats=10",
    ],
    # Transformers (issue 16): the zoo's ViT on Fashion-MNIST, and its GPT on Shakespeare's works, character
    # by character (the first 16,384 of 35,063 training windows of 128 characters: a CPU-sized epoch).
    "vit-fashion": ["model.name=vit", "data.name=fashion_mnist", "dense.epochs=3", "measure.repeats=10"],
    "gpt-shakespeare": [
        "model.name=gpt",
        "data.name=shakespeare_chars",
        "data.limit=16384",
        "dense.epochs=3",
        "measure.repeats=10",
    ],
}
#: Cases: the dense model they start from, and the ratio.
CASES = {
    "lenet5-mnist-0.9": {"dense": "lenet5-mnist", "ratio": 0.9},
    "lenet5-mnist-0.7": {"dense": "lenet5-mnist", "ratio": 0.7},
    "resnet20-fashion-0.5": {"dense": "resnet20-fashion", "ratio": 0.5},
    # Other sparsity kinds (ADMM and magnitude only): masked models, non-zero weights counted.
    # 0.986 of the three kernels' weights, ranked together: 71x fewer non-zeros (Zhang et al. 2018's LeNet-5 figure).
    "lenet5-mnist-unstructured": {
        "dense": "lenet5-mnist",
        "ratio": 0.986,
        "overrides": ["prune.sparsity=unstructured", "prune.scope=global"],
        "budgets": ("default",),  # its 4 stages do not fit the peer's 4 epochs
    },
    "lenet5-mnist-2:4": {"dense": "lenet5-mnist", "ratio": 0.5, "overrides": ["prune.sparsity=nm"]},
    # A compute budget: at most 158K of the dense 2,293K MACs (1 - 158/2293 = 0.931), the budget of
    # Tang et al. 2018's BC-GHS LeNet-5 (1.0% error); the greedy projection chooses the widths (ADMM only).
    "lenet5-mnist-macs": {
        "dense": "lenet5-mnist",
        "ratio": 0.931,
        "overrides": ["prune.budget=macs"],
        "budgets": ("default",),  # its 4 stages do not fit the peer's 4 epochs
        "methods": ("admm", "admm_distill"),
    },
    # Whole heads and MLP neurons, at the peer's budget: ADMM against magnitude pruning.
    **{
        f"{dense}-{ratio}": {"dense": dense, "ratio": ratio, "budgets": ("peer",), "methods": ("admm", "magnitude")}
        for dense in ("vit-fashion", "gpt-shakespeare")
        for ratio in (0.5, 0.75)
    },
}
BUDGETS = ("peer", "default")
#: Variants of a method, compared like methods: name -> (method, overrides).
VARIANTS = {
    # ADMM whose penalty pulls only the weights the last projection removed (admm.penalty).
    "admm_pruned_penalty": ("admm", ["admm.penalty=pruned"]),
    # A larger initial rho: the scaled dual U of a removed weight grows by W
    # at every dual update while rho is too small to move W, so the next
    # projection sees it inflated and the support flips (primal residual about 1
    # for an epoch at rho 1e-3).
    "admm_rho_0.01": ("admm", ["admm.rho=0.01"]),
    "admm_pruned_penalty_rho_0.01": ("admm", ["admm.penalty=pruned", "admm.rho=0.01"]),
    # Distillation from the dense model in the masked training (retrain.distill), for either method.
    "admm_distill": ("admm", ["retrain.distill=0.5"]),
    "magnitude_distill": ("magnitude", ["retrain.distill=0.5"]),
    # One ADMM stage at the final ratio ({ratio} is the case's): at the peer's
    # budget, one epoch of ADMM and three of retraining at the final widths,
    # where the progressive stages leave one (magnitude fine-tunes for four).
    "admm_one_stage": ("admm", ["prune.stages=({ratio},)"]),
    "admm_one_stage_distill": ("admm", ["prune.stages=({ratio},)", "retrain.distill=0.5"]),
}
#: Everything a case can run, in the order of the tables.
ENTRIES = (*methods.METHODS, *VARIANTS)
#: Epochs after the dense phase at the peer's budget.
PEER_EPOCHS = 4
SEEDS = (0, 1, 2)
#: Two-sided 97.5% quantiles of Student's t by degrees of freedom (scipy.stats.t.ppf(0.975, df)).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def config_of(dense: str, seed: int, overrides=()):
    config = load_config("default")
    for item in [*DENSE[dense], *overrides]:
        key, _, value = item.partition("=")
        apply_override(config, key, value)
    config.seed = seed
    config.progress = False
    return config


def budget_overrides(budget: str, ratio: float, overrides=()) -> list[str]:
    """``peer``: one epoch per stage and the rest of :data:`PEER_EPOCHS` retraining; ``default``: nothing.

    ``overrides`` are the run's own (a variant may set ``prune.stages``)."""
    if budget == "default":
        return []
    config = load_config("default")
    for item in overrides:
        key, _, value = item.partition("=")
        apply_override(config, key, value)
    stages = len(schedules.stage_ratios(ratio, config.prune.stages))
    if stages >= PEER_EPOCHS:
        raise SystemExit(f"error: ratio {ratio} has {stages} stages, more than the peer's {PEER_EPOCHS} epochs")
    return ["admm.epochs_per_stage=1", f"retrain.epochs={PEER_EPOCHS - stages}"]


def dense_dir(root: str, dense: str, seed: int) -> str:
    return os.path.join(root, "dense", f"{dense}-s{seed}")


def run_dir(root: str, case: str, budget: str, method: str, seed: int) -> str:
    return os.path.join(root, case, budget, f"{method}-s{seed}")


def train_dense(root: str, dense: str, seed: int) -> str:
    workdir = dense_dir(root, dense, seed)
    done = os.path.join(workdir, "dense.json")
    if not os.path.exists(done):
        print(f"== dense {dense}, seed {seed} ({workdir})", flush=True)
        report = pipeline.run(config_of(dense, seed), workdir, stop_after="dense")
        with open(done, "w") as f:
            json.dump({"dense": report["dense"], "time": report.get("time"), "cpu": cpu()}, f, indent=2)
    return workdir


def dense_cpu(root: str, dense: str, seed: int) -> str:
    """The CPU a seed's dense model was trained on (its runs ran there too)."""
    with open(os.path.join(dense_dir(root, dense, seed), "dense.json")) as f:
        return json.load(f).get("cpu") or cpu()


def run_config(root: str, case: str, budget: str, method: str, seed: int):
    spec = CASES[case]
    base, extra = VARIANTS.get(method, (method, []))
    own = [*spec.get("overrides", []), *(e.format(ratio=spec["ratio"]) for e in extra)]
    overrides = [
        f"prune.ratio={spec['ratio']}",
        f"prune.method={base}",
        f"dense.init={dense_dir(root, spec['dense'], seed)}",
        *budget_overrides(budget, spec["ratio"], own),
        *own,
    ]
    return config_of(spec["dense"], seed, overrides)


#: ADMM's own fields; the rest of ``admm`` (epochs, learning rate, schedule) is every method's budget.
ADMM_ONLY = ("rho", "rho_schedule", "rho_factor", "max_rho", "interval", "penalty")


def fingerprint(root: str, case: str, budget: str, method: str, seed: int) -> str:
    """A hash of what decides a run's result: its configuration without the
    dense model's path (the dense recipe and seed stand for it), the progress
    bar, and the settings of the methods it does not use."""
    c = pipeline.settings(run_config(root, case, budget, method, seed)).comparable  # new neutral fields left out
    del c["dense"]["init"]
    method = VARIANTS.get(method, (method,))[0]
    for other in methods.METHODS:
        if other not in (method, "admm"):
            c.pop(other, None)
    if method != "admm":
        for field in ADMM_ONLY:
            c["admm"].pop(field, None)
    c["dense_recipe"] = DENSE[CASES[case]["dense"]]
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_one(root: str, case: str, budget: str, method: str, seed: int) -> dict:
    init = train_dense(root, CASES[case]["dense"], seed)
    assert init == dense_dir(root, CASES[case]["dense"], seed)
    workdir = run_dir(root, case, budget, method, seed)
    print(f"== {case} {budget} {method} seed {seed} ({workdir})", flush=True)
    return pipeline.run(run_config(root, case, budget, method, seed), workdir)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """Mean of ``a - b`` over the seeds both have, with its 95% t confidence interval (None below 2 seeds)."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    d = [a[s] - b[s] for s in seeds]
    mean, sd = mean_sd(d)
    half = T975.get(len(d) - 1, 1.96) * sd / math.sqrt(len(d))
    return {"seeds": seeds, "mean": mean, "low": mean - half, "high": mean + half}


def dense_seconds(root: str, dense: str, seed: int) -> float:
    """The wall time of a seed's dense phase (as :func:`train_dense` recorded it)."""
    path = os.path.join(dense_dir(root, dense, seed), "dense.json")
    if not os.path.exists(path):
        return 0.0
    with open(path) as f:
        return json.load(f)["dense"]["seconds"]


def epochs_after_dense(case: str, budget: str) -> int:
    spec = CASES[case]
    overrides = [f"prune.ratio={spec['ratio']}", *budget_overrides(budget, spec["ratio"]), *spec.get("overrides", [])]
    config = config_of(spec["dense"], 0, overrides)
    return sum(p.epochs for p in pipeline.plan_phases(config)[1:])


def key(row: dict) -> tuple:
    return row["case"], row["budget"], row["method"], row["seed"], row["cpu"]


def dense_accuracy(root: str, dense: str, seed: int) -> float | None:
    """The accuracy of a seed's dense model under ``root``, or None if it is not trained there."""
    path = os.path.join(dense_dir(root, dense, seed), "dense.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["dense"]["accuracy"]


def kept_rows(root: str, path: str) -> list[dict]:
    """The rows of an earlier ``suite.json`` that still hold: today's code
    gives their run the same fingerprint, and either they ran on another CPU
    (their dense model is that machine's: they pair only with its rows) or
    their dense model is the one under ``root`` (same accuracy; a dense model
    retrained differs in float rounding, and rows from two dense models do
    not pair) or there is none there yet."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        old = json.load(f).get("rows", [])
    out = []
    for r in old:
        if r.get("fingerprint") != fingerprint(root, *key(r)[:4]):
            continue
        here = dense_accuracy(root, CASES[r["case"]]["dense"], r["seed"])
        if r["cpu"] != cpu() or here in (None, r["dense_accuracy"]):
            out.append(r)
    return out


def _outcome(report: dict) -> dict:
    """A report's accuracy and size: a collapsed model's, or a masked one's non-zero weights."""
    if "nonzero" in report:  # prune.sparsity other than channel: nothing collapsed
        every = report["nonzero"]["all"]
        return {
            "accuracy": report["pruned"]["accuracy"],
            "params_removed": 1 - every["nonzero"] / every["total"],
            "flops_removed": None,
            "compression": report["nonzero"]["kernels"]["compression"],
            "layers": {k: v["nonzero"] for k, v in report["layers"].items()},
        }
    out = {
        "accuracy": report["collapsed"]["accuracy"],
        "params_removed": report["params_removed"],
        "flops_removed": report["flops_removed"],
        "speedup": report.get("speedup"),
        "layers": {k: v["kept"] for k, v in report["layers"].items()},
    }
    if "perplexity" in report["collapsed"]:  # a language model's
        out["perplexity"] = report["collapsed"]["perplexity"]
        out["dense_perplexity"] = report["dense"]["perplexity"]
    return out


def collect(root: str, previous: list[dict] = ()) -> dict:
    """Every finished run under ``root`` or in ``previous`` (rows of an earlier
    JSON, see :func:`kept_rows`; a run under ``root`` wins), and each case's statistics."""
    rows = []
    for case, spec in CASES.items():
        for budget in BUDGETS:
            for method in ENTRIES:
                for seed in range(100):
                    path = os.path.join(run_dir(root, case, budget, method, seed), "report.json")
                    if not os.path.exists(path):
                        continue
                    with open(path) as f:
                        r = json.load(f)
                    rows.append(
                        {
                            "case": case,
                            "budget": budget,
                            "method": method,
                            "seed": seed,
                            "ratio": spec["ratio"],
                            "model": r["model"],
                            "dataset": r["dataset"],
                            "dense_accuracy": r["dense"]["accuracy"],
                            **_outcome(r),
                            "seconds": r["seconds"],
                            "dense_seconds": dense_seconds(root, spec["dense"], seed),
                            "cpu": dense_cpu(root, spec["dense"], seed),
                            "fingerprint": fingerprint(root, case, budget, method, seed),
                        }
                    )
    have = {key(r) for r in rows}
    rows += [r for r in previous if key(r) not in have]
    rows.sort(
        key=lambda r: (list(CASES).index(r["case"]), BUDGETS.index(r["budget"]), r["cpu"], r["method"], r["seed"])
    )
    summaries = []
    # Per CPU too: a seed's dense model differs between machines, so only one machine's runs pair.
    for case, budget, where in dict.fromkeys((r["case"], r["budget"], r["cpu"]) for r in rows):
        mine = [r for r in rows if (r["case"], r["budget"], r["cpu"]) == (case, budget, where)]
        acc = {m: {r["seed"]: r["accuracy"] for r in mine if r["method"] == m} for m in ENTRIES}
        per_method = []
        for m, by_seed in acc.items():
            if not by_seed:
                continue
            mean, sd = mean_sd(list(by_seed.values()))
            runs = [r for r in mine if r["method"] == m]
            per_method.append(
                {
                    "method": m,
                    "n": len(by_seed),
                    "mean": mean,
                    "sd": sd,
                    "flops_removed": None
                    if runs[0]["flops_removed"] is None
                    else statistics.fmean(r["flops_removed"] for r in runs),
                    "compression": statistics.fmean(r["compression"] for r in runs)
                    if "compression" in runs[0]
                    else None,
                    "perplexity": statistics.fmean(r["perplexity"] for r in runs) if "perplexity" in runs[0] else None,
                    "speedup": statistics.fmean(r["speedup"] for r in runs) if runs[0].get("speedup") else None,
                    "admm_minus": None if m == "admm" else paired(acc["admm"], by_seed),
                    # A variant against the method it varies, paired the same way.
                    "minus_method": paired(by_seed, acc[VARIANTS[m][0]]) if m in VARIANTS else None,
                }
            )
        seeds = sorted({r["seed"] for r in mine})
        dense = {r["seed"]: r.get("dense_seconds", 0.0) for r in mine}.values()
        summaries.append(
            {
                "case": case,
                "budget": budget,
                "cpu": where,
                "seeds": seeds,
                "ratio": CASES[case]["ratio"],
                "epochs_after_dense": epochs_after_dense(case, budget),
                "dense_accuracy": mean_sd(list({r["seed"]: r["dense_accuracy"] for r in mine}.values())),
                "dense_perplexity": statistics.fmean(r["dense_perplexity"] for r in mine)
                if "dense_perplexity" in mine[0]
                else None,
                "methods": per_method,
                "wall_s": sum(r["seconds"] for r in mine),
                "dense_wall_s": sum(dense),
            }
        )
    return {"rows": rows, "summaries": summaries}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=BUDGETS)
    parser.add_argument("--methods", nargs="+", default=list(methods.METHODS), choices=ENTRIES)
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--root", default="runs/suite", help="where the runs' workdirs are kept")
    parser.add_argument("--collect", action="store_true", help="train nothing: write the JSON from finished runs")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    previous = kept_rows(args.root, args.out)

    def write():
        write_json(
            args.out,
            {
                "command": " ".join(["python", "benchmarks/suite.py", *sys.argv[1:]]),
                "dense_recipes": DENSE,
                "peer_epochs": PEER_EPOCHS,
                **collect(args.root, previous),
            },
        )

    start = time.perf_counter()
    if not args.collect:
        # Seed-major: every seed's dense model, then its runs, so a sitting ends with whole seeds.
        for seed in args.seeds:
            for case in args.cases:
                budgets = [b for b in args.budgets if b in CASES[case].get("budgets", BUDGETS)]
                if not budgets:
                    continue
                train_dense(args.root, CASES[case]["dense"], seed)
                previous = kept_rows(args.root, args.out)  # rows of another dense model drop out
                done = {key(r) for r in previous}
                for budget in budgets:
                    for method in [m for m in args.methods if m in CASES[case].get("methods", ENTRIES)]:
                        if (case, budget, method, seed, cpu()) in done:
                            continue  # its row in the JSON still holds
                        run_one(args.root, case, budget, method, seed)
                        write()
    write()
    print(f"wrote {args.out} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
