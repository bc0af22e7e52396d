"""Regenerates every results table and figure that the README and the docs show.

    python benchmarks/results.py                # run every benchmark, then render (hours on a 2-core CPU)
    python benchmarks/results.py --only NAME    # run some benchmarks (see --list), then render
    python benchmarks/results.py --render       # render only, from benchmarks/results/*.json
    python benchmarks/results.py --check        # exit 1 if the README or docs differ from what --render writes

Each benchmark script writes one JSON in ``benchmarks/results/`` with its
command, machine, JAX version, devices, load average and date
(``benchmarks/_provenance.py``). Rendering reads only those JSONs and writes:

- the tables between ``<!-- results:NAME -->`` and ``<!-- /results:NAME -->``
  markers in README.md and docs/*.md (the prose around them is written by
  hand, and names the figures it discusses);
- ``docs/results.md``, the results page of the docs, whole;
- the figures in ``docs/figures/``.

The training runs behind the comparisons are kept under ``runs/`` (not in
git): rerunning a comparison reuses finished runs and resumes interrupted
ones, so after a crash the runner picks up where it stopped. Delete the run
directories to retrain from scratch. Latencies are always re-timed.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
FIGURES = os.path.join(ROOT, "docs", "figures")
RESULTS_PAGE = os.path.join(ROOT, "docs", "results.md")
#: Files whose marked blocks are rendered (docs/results.md is rendered whole).
MARKED = ("README.md", "docs/distributed.md")

#: name -> the command that writes benchmarks/results/NAME.json (run from the repository root).
BENCHMARKS = {
    # --root runs/methods: the 0.9 runs are compare_methods' admm and magnitude runs of LeNet-5.
    "compare_magnitude": ["benchmarks/compare_magnitude.py", "--ratios", "0.9", "0.7", "0.5", "--root", "runs/methods"],
    "compare_lenet5-mnist": ["benchmarks/compare_methods.py", "lenet5-mnist"],
    "compare_resnet20-fashion": ["benchmarks/compare_methods.py", "resnet20-fashion"],
    "compare_resnet20-fashion-relaxation-gate-lr-0.05": [
        "benchmarks/compare_methods.py",
        "resnet20-fashion",
        "relaxation.gate_learning_rate=0.05",
        "--methods",
        "relaxation",
        "--root",
        "runs/methods-gate-lr",
        "--no-analysis",
        "--out",
        "benchmarks/results/compare_resnet20-fashion-relaxation-gate-lr-0.05.json",
    ],
    "admm_overhead": ["benchmarks/bench_admm_overhead.py", "--steps", "100", "--rounds", "8"],
    "collapse_latency": ["benchmarks/bench_collapse_latency.py"],
    "vs_torch": ["benchmarks/bench_vs_torch.py", "--epochs", "lenet5,resnet20"],
    "data_parallel": ["benchmarks/bench_data_parallel.py", "--steps", "30", "--rounds", "3"],
    # Resumable: runs kept under runs/suite; rerun until every case, budget and seed is done.
    "suite": ["benchmarks/suite.py"],
    # Reads the suite's dense models (runs/suite/dense); resumable with --resume.
    "oneshot": ["benchmarks/bench_oneshot.py", "--resume"],
}
CASES = ("lenet5-mnist", "resnet20-fashion")
MODEL_NAMES = {
    "lenet5": "LeNet-5",
    "resnet20": "ResNet-20",
    "vit": "ViT",
    "gpt": "GPT",
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "shakespeare_chars": "Shakespeare (characters)",
}
METHOD_STYLE = {  # (marker, color) per method, the same in every figure
    "admm": ("o", "C0"),
    "magnitude": ("s", "C1"),
    "l1_mask": ("^", "C2"),
    "slimming": ("v", "C3"),
    "relaxation": ("D", "C4"),
    "group_lasso": ("P", "C5"),
}


# --------------------------------------------------------------------------- loading


def load(results_dir: str = RESULTS) -> dict[str, dict]:
    """Every results JSON by name (the file name without ``.json``)."""
    out = {}
    for name in sorted(os.listdir(results_dir)):
        if name.endswith(".json"):
            with open(os.path.join(results_dir, name)) as f:
                out[name[: -len(".json")]] = json.load(f)
    return out


def _pct(x: float, digits: int = 1) -> str:
    return f"{100 * x:.{digits}f}%"


def _provenance(r: dict, name: str) -> str:
    """One line saying how, where and when a result was measured."""
    command = r.get("command") or " ".join(["python", *BENCHMARKS.get(name, [f"benchmarks/{name}.py"])])
    where = r["machine"]
    if r.get("jax"):
        where += f", jax {r['jax']}"
    if r.get("devices"):
        where += f", {r['devices']}"
    if r.get("load_average") is not None:
        where += f", load average {r['load_average']:g} at the end"
    return f"*`{command}`, {r['date']}; {where}.*"


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- tables


def _method_rows(res: dict, case: str) -> list[dict]:
    """A comparison's rows, then those of its variant runs (the relaxation at a higher gate lr)."""
    extra = res.get(f"compare_{case}-relaxation-gate-lr-0.05", {}).get("rows", [])
    return [*res[f"compare_{case}"]["rows"], *[{**x, "method": "relaxation, gate lr 0.05"} for x in extra]]


def headline(res: dict) -> str:
    """Per model and method: accuracy, params and FLOPs removed, the collapsed model's measured speedup."""
    rows, sources = [], []
    for case in CASES:
        r = res.get(f"compare_{case}")
        if r is None:
            continue
        sources.append(f"compare_{case}")
        model = f"{MODEL_NAMES.get(r['model'], r['model'])} / {MODEL_NAMES.get(r['dataset'], r['dataset'])}"
        dense = r["rows"][0]["dense_accuracy"]
        best = max(row["accuracy"] for row in r["rows"] if row["flops_removed"] > 0)
        rows.append([f"**{model}**", f"{r['ratio']:g}", "dense", _pct(dense, 2), "–", "–", "1.0x"])
        for row in _method_rows(res, case):
            acc = _pct(row["accuracy"], 2)
            rows.append(
                [
                    "",
                    "",
                    row["method"],
                    f"**{acc}**" if row["accuracy"] == best else acc,
                    _pct(row["params_removed"]),
                    _pct(row["flops_removed"]),
                    f"{row['speedup']:.1f}x",
                ]
            )
    table = _table(
        ["model / data", "ratio", "method", "accuracy", "params removed", "FLOPs removed", "speedup (collapsed)"], rows
    )
    return table + "\n\n" + "\n".join(_provenance(res[s], s) for s in sources)


def default_runs(res: dict) -> str:
    r = res["compare_magnitude"]
    rows = []
    for row in r["rows"]:
        kept = " / ".join(str(v) for v in row["layers"].values())
        change = 100 * (row["admm_accuracy"] - row["dense_accuracy"])
        rows.append(
            [
                f"{row['ratio']:g}",
                " → ".join(f"{x:g}" for x in row["stage_ratios"]),
                _pct(row["dense_accuracy"], 2),
                _pct(row["admm_accuracy"], 2),
                f"{change:+.2f}",
                f"{_pct(row['params_removed'])} ({row['params_dense']:,} → {row['params_pruned']:,})",
                _pct(row["flops_removed"]),
                kept,
                f"{row['admm_seconds']:.0f} s",
            ]
        )
    names = " / ".join(r["rows"][0]["layers"])
    table = _table(
        [
            "`--ratio`",
            "stages",
            "dense",
            "pruned (collapsed)",
            "change",
            "params removed",
            "FLOPs removed",
            f"kept {names}",
            "wall time",
        ],
        rows,
    )
    return table + "\n\n" + _provenance(r, "compare_magnitude")


def admm_vs_magnitude(res: dict) -> str:
    r = res["compare_magnitude"]
    rows = []
    for row in r["rows"]:
        a, m = row["admm_accuracy"], row["magnitude_accuracy"]
        rows.append(
            [
                f"{row['ratio']:g}",
                _pct(row["dense_accuracy"], 2),
                f"**{_pct(a, 2)}**" if a > m else _pct(a, 2),
                f"**{_pct(m, 2)}**" if m > a else _pct(m, 2),
                str(row["epochs_after_dense"]),
                f"{100 * (a - m):+.2f}",
            ]
        )
    table = _table(
        ["ratio", "dense", "ADMM", "magnitude + fine-tuning", "epochs after dense", "ADMM − magnitude"], rows
    )
    return table + "\n\n" + _provenance(r, "compare_magnitude")


def methods_table(res: dict, case: str) -> str:
    name = f"compare_{case}"
    r = res[name]
    with_layers = len(r["rows"][0]["layers"]) <= 4
    best = max(row["accuracy"] for row in r["rows"] if row["flops_removed"] > 0)  # among models that were pruned
    rows = []
    for row in r["rows"]:
        acc = _pct(row["accuracy"], 2)
        cells = [
            row["method"],
            f"**{acc}**" if row["accuracy"] == best else acc,
            _pct(row["params_removed"]),
            _pct(row["flops_removed"]),
        ]
        if with_layers:
            cells.append(" / ".join(str(v) for v in row["layers"].values()))
        cells += [f"{row['latency_collapsed_ms']:.2f} ms", f"{row['speedup']:.1f}x", f"{row['seconds']:.0f} s"]
        rows.append(cells)
    head = ["method", "accuracy", "params removed", "FLOPs removed"]
    if with_layers:
        head.append("kept " + " / ".join(r["rows"][0]["layers"]))
    head += ["collapsed latency", "speedup", "wall time"]
    dense = r["rows"][0]
    intro = (
        f"Dense: {_pct(dense['dense_accuracy'], 2)}, {dense['latency_dense_ms']:.2f} ms at batch "
        f"{r.get('latency_batch', 256)} (latencies: median of interleaved rounds)."
    )
    return intro + "\n\n" + _table(head, rows) + "\n\n" + _provenance(r, name)


def admm_overhead(res: dict) -> str:
    r = res["admm_overhead"]
    rows = []
    for row in r["rows"]:
        lo, hi = min(row["round_ratios"]), max(row["round_ratios"])
        label = {100: "100 (library default)", 20: "20 (pipeline default)"}.get(row["interval"], str(row["interval"]))
        rows.append(
            [
                label,
                f"{row['plain_ms']:.2f} ms",
                f"{row['admm_ms']:.2f} ms",
                f"{row['ratio']:.3f}",
                f"{lo:.2f} – {hi:.2f}",
            ]
        )
    table = _table(["dual-update interval", "plain step", "step with `admm`", "median ratio", "per-round ratios"], rows)
    return table + "\n\n" + _provenance(r, "admm_overhead")


def collapse_latency(res: dict) -> str:
    r = res["collapse_latency"]
    rows = []
    for row in r["rows"]:
        fr = row["flops_dense"] / row["flops_collapsed"]
        sp = row["latency_dense_ms"] / row["latency_collapsed_ms"]
        shape = "x".join(map(str, row["input"]))
        rows.append(
            [
                f"{MODEL_NAMES.get(row['model'], row['model'])} ({shape})",
                f"{row['ratio']:g}",
                _pct(row["flops_removed"]),
                f"{fr:.1f}x",
                f"{row['latency_dense_ms']:.2f} ms",
                f"{row['latency_collapsed_ms']:.2f} ms",
                f"{sp:.1f}x",
                f"{sp / fr:.2f}",
            ]
        )
    table = _table(
        ["model", "ratio", "FLOPs removed", "FLOPs ratio", "dense", "collapsed", "speedup", "speedup / FLOPs ratio"],
        rows,
    )
    return table + "\n\n" + _provenance(r, "collapse_latency")


def vs_torch(res: dict) -> str:
    r = res["vs_torch"]
    case = {c: [row for row in r["rows"] if row["case"] == c] for c in ("train", "eval", "epoch", "conv", "grad")}
    rows = []
    for row in case["train"]:
        rows.append(
            [
                f"{MODEL_NAMES[row['model']]} train step, batch {row['batch']}",
                f"{row['torch_ms']:.1f} ms",
                f"{row['admmprune_ms']:.1f} ms",
                f"{row['vs_torch']:.2f}",
            ]
        )
    for row in case["epoch"]:
        rows.append(
            [
                f"{MODEL_NAMES[row['model']]} epoch, {MODEL_NAMES[row['dataset']]} ({row['steps']} steps)",
                f"{row['torch_s']:.1f} s",
                f"{row['admmprune_s']:.1f} s (pipeline overhead {_pct(row['overhead'])})",
                f"{row['vs_torch']:.2f}",
            ]
        )
    for row in case["eval"]:
        what = "dense" if row["ratio"] == 0 else f"collapsed at {row['ratio']:g}"
        rows.append(
            [
                f"{MODEL_NAMES[row['model']]} eval forward, batch 256, {what}",
                f"{row['torch_ms']:.2f} ms",
                f"{row['admmprune_ms']:.2f} ms",
                f"{row['vs_torch']:.2f}",
            ]
        )
    table = _table(["case (28x28x1)", "PyTorch", "admmprune (JAX)", "JAX / PyTorch"], rows)
    speed = [
        [
            MODEL_NAMES[row["model"]],
            f"{row['ratio']:g}",
            "/".join(map(str, row["widths"])) if len(row["widths"]) <= 3 else f"{len(row['widths'])} convs",
            f"{row['flops_ratio']:.2f}x",
            f"{row['speedup']:.2f}x ({row['speedup'] / row['flops_ratio']:.2f})",
            f"{row['torch_speedup']:.2f}x ({row['torch_speedup'] / row['flops_ratio']:.2f})",
        ]
        for row in case["eval"]
        if row["ratio"] > 0
    ]
    table2 = _table(
        ["model", "ratio", "widths", "FLOPs ratio", "admmprune speedup (of FLOPs ratio)", "PyTorch speedup"], speed
    )
    tables = [table, table2]
    if case["conv"]:
        convs = [
            [
                f"{row['channels']} -> {row['channels']}, {row['size']}x{row['size']}",
                f"{row['torch_ms']:.2f} ms ({row['torch_gflops']:.0f} GFLOP/s)",
                f"{row['admmprune_ms']:.2f} ms ({row['admmprune_gflops']:.0f} GFLOP/s)",
                f"{row['vs_torch']:.2f}",
            ]
            for row in case["conv"]
        ]
        tables.append(_table(["3x3 conv alone, batch 256", "PyTorch", "admmprune (JAX)", "JAX / PyTorch"], convs))
    if case.get("grad"):
        grads = [
            [
                f"{row['channels']} -> {row['channels']}, {row['size']}x{row['size']}, d/d{row['wrt']}",
                f"{row['torch_ms']:.2f} ms ({row['torch_gflops']:.0f} GFLOP/s)",
                f"{row['admmprune_ms']:.2f} ms ({row['admmprune_gflops']:.0f} GFLOP/s)",
                f"{row['vs_torch']:.2f}",
            ]
            for row in case["grad"]
        ]
        header = "3x3 conv's gradient alone, batch 128"
        tables.append(_table([header, "PyTorch", "admmprune (JAX)", "JAX / PyTorch"], grads))
    note = (
        f"PyTorch {r['torch']} on {r['torch_threads']} threads against jax {r['jax']}, flax {r['flax']}; "
        f"medians over {r['rounds']} alternating rounds in one run; epochs include admmprune's compilation."
    )
    return "\n\n".join([*tables, note, _provenance(r, "vs_torch")])


def suite(res: dict) -> str:
    """Per case and budget: each method's mean and spread over seeds, and ADMM's paired difference."""
    r = res["suite"]
    parts = []
    for summary in r["summaries"]:
        first = next(row for row in r["rows"] if row["case"] == summary["case"])
        dense_mean, dense_sd = summary["dense_accuracy"]
        kind = "" if first.get("compression") is None else f", {summary['case'].rsplit('-', 1)[1]} sparsity"
        kind = ", MACs budget" if summary["case"].endswith("-macs") else kind
        perplexity = summary.get("dense_perplexity")
        dense_text = _pm(dense_mean, dense_sd) + ("" if perplexity is None else f", perplexity {perplexity:.2f}")
        head = (
            f"**{MODEL_NAMES[first['model']]} / {MODEL_NAMES[first['dataset']]}{kind} at ratio {summary['ratio']:g}, "
            f"{summary['budget']} budget** ({summary['epochs_after_dense']} epochs after the dense phase; "
            f"seeds {', '.join(map(str, summary['seeds']))}; dense {dense_text}; "
            f"{summary.get('cpu', 'CPU not recorded')}; "
            f"wall time {summary['wall_s'] / 60:.0f} min, dense phases {summary['dense_wall_s'] / 60:.0f} min more)"
        )
        rows = []
        for m in summary["methods"]:
            diff = m["admm_minus"]
            if m["method"] == "admm":
                vs = ""
            elif diff is None:
                vs = "(one seed)"
            else:
                vs = f"{100 * diff['mean']:+.2f} [{100 * diff['low']:+.2f}, {100 * diff['high']:+.2f}]"
            size = _pct(m["flops_removed"]) if m.get("compression") is None else f"{m['compression']:.1f}x"
            size = f"{size}, {m['speedup']:.1f}x faster" if m.get("speedup") else size  # the collapsed model's
            own = m.get("minus_method")
            own = "" if own is None else f"{100 * own['mean']:+.2f} [{100 * own['low']:+.2f}, {100 * own['high']:+.2f}]"
            if perplexity is not None:  # a language model: next-character accuracy, perplexity, speed
                rows.append(
                    [m["method"], f"{m['perplexity']:.2f}", _pm(m["mean"], m["sd"]), str(m["n"]), size, vs, own]
                )
                continue
            rows.append([m["method"], _pm(m["mean"], m["sd"]), str(m["n"]), size, vs, own])
        masked = summary["methods"][0].get("compression") is not None
        size_head = "fewer non-zero weights (pruned kernels)" if masked else "FLOPs removed"
        head_row = [
            "method",
            "accuracy (mean ± sd)",
            "seeds",
            size_head,
            "ADMM − method [95% CI]",
            "variant − its method",
        ]
        if any(m.get("speedup") for m in summary["methods"]):
            head_row[3] = "FLOPs removed, collapsed speed"
        if perplexity is not None:
            head_row[1:2] = ["perplexity", "next-character accuracy"]
        if not any(row[-1] for row in rows):
            head_row, rows = head_row[:-1], [row[:-1] for row in rows]
        table = _table(head_row, rows)
        parts.append(head + "\n\n" + table)
    note = (
        "ADMM − method: the mean over seeds of ADMM's accuracy minus the method's, in points, with its 95% "
        "Student-t confidence interval (same seed = same dense model); an interval that contains 0 is no evidence "
        "either way. A variant (a method with other settings: `benchmarks/suite.py` VARIANTS) is also compared "
        "with the method it varies."
    )
    return "\n\n".join([*parts, note, _provenance(r, "suite")])


def oneshot(res: dict) -> str:
    """One-shot pruning without retraining: per model and sparsity, every method over calibration seeds."""
    r = res["oneshot"]
    parts = []
    for dense in r["dense"]:
        name = dense["model"]
        summaries = [s for s in r["summaries"] if s["model"] == name]
        rows_of = [row for row in r["rows"] if row["model"] == name]
        if not summaries:
            continue
        lm = "perplexity" in dense
        dense_text = _pct(dense["accuracy"], 2) + (f", perplexity {dense['perplexity']:.2f}" if lm else "")
        seeds = sorted({row["seed"] for row in rows_of})
        unit = "sequences" if lm else "images"
        parts.append(
            f"**{MODEL_NAMES[name]} / {MODEL_NAMES[dense['dataset']]}** (dense {dense_text}; "
            f"{rows_of[0]['samples']} calibration {unit} from the training split, calibration seeds "
            f"{', '.join(map(str, seeds))}; the output layer stays dense)"
        )
        head = ["sparsity", "method", "accuracy (mean ± sd)", "ADMM − method [95% CI]", "pruning s", "peak MiB"]
        if lm:
            head[2:2] = ["perplexity", "ADMM's perplexity lower by [95% CI]"]
            head[2 + 2] = "next-character accuracy"
        rows = []
        for summary in summaries:
            for m in summary["methods"]:
                d = m["admm_minus"]
                vs = "" if d is None else f"{100 * d['mean']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]"
                cells = [
                    summary["sparsity"],
                    m["method"],
                    _pm(*m["accuracy"]),
                    vs,
                    f"{m['prune_s']:.1f}",
                    f"{m['peak_mib']:.0f}",
                ]
                if lm:
                    low = m.get("admm_lower")
                    lower = (
                        ""
                        if low is None
                        else f"{100 * low['mean']:.1f}% [{100 * low['low']:.1f}, {100 * low['high']:.1f}]"
                    )
                    ppl_mean, ppl_sd = m["perplexity"]
                    ppl = f"{ppl_mean:.2f}" if ppl_sd != ppl_sd else f"{ppl_mean:.2f} ± {ppl_sd:.2f}"
                    cells[2:2] = [ppl, lower]
                rows.append(cells)
        parts.append(_table(head, rows))
    note = (
        "No retraining after pruning. Every method prunes each layer in turn from the same calibration samples, "
        "which pass through the layers pruned before it; sparsity is per layer (N:M: at most N non-zeros in every M "
        "consecutive inputs of an output; layers whose inputs are not a multiple of M stay dense). ADMM − method: "
        "the mean over calibration seeds of the paired difference in points, with its 95% Student-t interval. "
        "Pruning time: median over seeds, including each layer's compilation on its first run."
    )
    return "\n\n".join([*parts, note, _provenance(r, "oneshot")])


def _pm(mean: float, sd: float) -> str:
    return f"{100 * mean:.2f}%" if sd != sd else f"{100 * mean:.2f} ± {100 * sd:.2f}%"


def data_parallel(res: dict) -> str:
    r = res["data_parallel"]
    base = r["rows"][0]
    rows = []
    for row in r["rows"]:
        cells = [str(row["devices"])]
        for sh in ("replicated", "fsdp"):
            cells += [f"{row[sh + '_ms']:.2f}", f"{base[sh + '_ms'] / row[sh + '_ms']:.2f}x"]
        rows.append(cells)
    table = _table(["devices", "replicated: ms/step", "ratio vs 1", "fsdp: ms/step", "ratio vs 1"], rows)
    s = r["widest_spread"]
    note = (
        f"Median step time over {r['rounds']} rounds of {r['steps']} steps; the widest spread between the "
        f"rounds of one case was {s['ratio']:.2f}x ({s['devices']} devices, {s['sharding']})."
    )
    return table + "\n\n" + note + "\n\n" + _provenance(r, "data_parallel")


def blocks(res: dict) -> dict[str, str]:
    """Every marked block's markdown, by name."""
    out = {
        "headline": headline(res),
        "default_runs": default_runs(res),
        "admm_vs_magnitude": admm_vs_magnitude(res),
        "admm_overhead": admm_overhead(res),
        "collapse_latency": collapse_latency(res),
        "vs_torch": vs_torch(res),
        "data_parallel": data_parallel(res),
        "suite": suite(res),
    }
    if "oneshot" in res:
        out["oneshot"] = oneshot(res)
    for case in CASES:
        out[f"methods_{case}"] = methods_table(res, case)
    return out


# --------------------------------------------------------------------------- figures


def figures(res: dict, out_dir: str = FIGURES) -> list[str]:
    """Draws every figure from the results; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 100, "font.size": 9, "svg.hashsalt": "admmprune"})
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), metadata={"Software": None})
        plt.close(fig)
        written.append(name)

    fig, axes = plt.subplots(1, len(CASES), figsize=(10, 3.6))
    for ax, case in zip(axes, CASES, strict=True):
        r = res[f"compare_{case}"]
        ax.axhline(100 * r["rows"][0]["dense_accuracy"], color="gray", ls="--", lw=1, label="dense")
        for row in _method_rows(res, case):
            marker, color = METHOD_STYLE.get(row["method"].split(",")[0], ("x", "k"))
            ax.scatter(
                100 * row["flops_removed"],
                100 * row["accuracy"],
                marker=marker,
                color=color,
                s=40,
                facecolors="none" if "," in row["method"] else color,
                label=row["method"],
            )
        ax.set_title(f"{MODEL_NAMES.get(r['model'])} / {MODEL_NAMES.get(r['dataset'])}, ratio {r['ratio']:g}")
        ax.set_xlabel("FLOPs removed (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="lower left")
    save(fig, "methods_accuracy_flops.png")

    r = res["compare_magnitude"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ratios = [row["ratio"] for row in r["rows"]]
    for key, label in (("admm_accuracy", "ADMM"), ("magnitude_accuracy", "magnitude + fine-tuning")):
        style = METHOD_STYLE["admm" if key.startswith("admm") else "magnitude"]
        ax.plot(ratios, [100 * row[key] for row in r["rows"]], marker=style[0], color=style[1], label=label)
    ax.axhline(100 * r["rows"][0]["dense_accuracy"], color="gray", ls="--", lw=1, label="dense")
    ax.set_xlabel("ratio (fraction of channels removed per layer)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("LeNet-5 / MNIST")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "admm_vs_magnitude.png")

    r = res["collapse_latency"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for i, row in enumerate(r["rows"]):
        fr = row["flops_dense"] / row["flops_collapsed"]
        sp = row["latency_dense_ms"] / row["latency_collapsed_ms"]
        ax.scatter(fr, sp, color=f"C{i}", label=f"{MODEL_NAMES.get(row['model'])} at {row['ratio']:g}")
    top = max(row["flops_dense"] / row["flops_collapsed"] for row in r["rows"]) * 1.3
    ax.plot([1, top], [1, top], color="gray", lw=1, ls="--", label="speedup = FLOPs ratio")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("FLOPs ratio (dense / collapsed)")
    ax.set_ylabel(f"measured speedup (batch {r['batch']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    save(fig, "collapse_latency.png")

    r = res["data_parallel"]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    devices = [row["devices"] for row in r["rows"]]
    for sh in ("replicated", "fsdp"):
        ax.plot(devices, [r["rows"][0][sh + "_ms"] / row[sh + "_ms"] for row in r["rows"]], marker="o", label=sh)
    ax.axhline(1, color="gray", lw=1, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(devices, [str(d) for d in devices])
    ax.set_xlabel("CPU devices (sharing the machine's cores)")
    ax.set_ylabel("throughput ratio vs 1 device")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save(fig, "data_parallel.png")
    return written


def copy_criteria_figures(res: dict, out_dir: str = FIGURES) -> list[str]:
    """Copies the criteria analysis' correlation heat maps of each comparison's dense model, where they exist.

    They come from ``python -m admmprune.analyze`` (run by compare_methods.py,
    under ``runs/``); a clone without those runs keeps the committed copies.
    """
    written = []
    os.makedirs(out_dir, exist_ok=True)
    for case in CASES:
        src = res.get(f"compare_{case}", {}).get("criteria_figures")
        if not src or not os.path.isdir(os.path.join(ROOT, src)):
            continue
        for name in sorted(os.listdir(os.path.join(ROOT, src))):
            if name.endswith(".correlation.png"):
                dst = f"criteria_{case}_{name.replace('/', '_')}"
                shutil.copyfile(os.path.join(ROOT, src, name), os.path.join(out_dir, dst))
                written.append(dst)
    return written


# --------------------------------------------------------------------------- pages


def results_page(res: dict, b: dict[str, str]) -> str:
    """docs/results.md: every table and figure, with how each was measured."""
    criteria = sorted(n for n in os.listdir(FIGURES) if n.startswith("criteria_")) if os.path.isdir(FIGURES) else []
    parts = [
        "# Results",
        "",
        "<!-- Generated by `python benchmarks/results.py --render` from benchmarks/results/*.json: do not edit. -->",
        "",
        "Every figure here is regenerated by `python benchmarks/results.py` (see its docstring), which reruns the",
        "benchmarks and records the machine and date under each table. One seed each; the machine",
        "(2 CPU cores) is shared, so latencies are medians of interleaved rounds and differences",
        "under about 15% mean little.",
        "",
        "## Headline: every method on equal budgets",
        "",
        "Accuracy of the collapsed model, parameters and FLOPs removed against the dense model, and the",
        "collapsed model's measured speedup (eval-mode forward pass).",
        "",
        b["headline"],
        "",
        "![Accuracy against FLOPs removed, per method](figures/methods_accuracy_flops.png)",
        "",
    ]
    for case in CASES:
        r = res[f"compare_{case}"]
        parts += [
            f"### {MODEL_NAMES.get(r['model'])} on {MODEL_NAMES.get(r['dataset'])}, ratio {r['ratio']:g}",
            "",
            b[f"methods_{case}"],
            "",
        ]
        if r.get("overrides"):
            parts += ["Config overrides: " + ", ".join(f"`{o}`" for o in r["overrides"]) + ".", ""]
    parts += [
        "## The default run and ADMM against magnitude pruning",
        "",
        b["default_runs"],
        "",
        b["admm_vs_magnitude"],
        "",
        "![ADMM against one-shot magnitude pruning](figures/admm_vs_magnitude.png)",
        "",
        "## What the collapse buys",
        "",
        b["collapse_latency"],
        "",
        "![Measured speedup against FLOPs ratio](figures/collapse_latency.png)",
        "",
        "## ADMM's cost in the train step",
        "",
        b["admm_overhead"],
        "",
        "## Data parallelism",
        "",
        b["data_parallel"],
        "",
        "![Throughput ratio against devices](figures/data_parallel.png)",
        "",
    ]
    if criteria:
        parts += [
            "## Pruning criteria of the dense models",
            "",
            "Rank correlations between criteria per channel group (`python -m admmprune.analyze`).",
            "",
        ]
        parts += [f"![{n}](figures/{n})" for n in criteria] + [""]
    return "\n".join(parts)


_MARK = re.compile(r"(<!-- results:([\w.-]+) -->\n)(.*?)(<!-- /results:\2 -->)", re.DOTALL)


def fill(text: str, b: dict[str, str]) -> str:
    """Replaces every marked block of ``text`` with its rendering; an unknown name is an error."""

    def sub(m):
        if m.group(2) not in b:
            raise KeyError(f"no results block named {m.group(2)!r} (known: {', '.join(sorted(b))})")
        return f"{m.group(1)}{b[m.group(2)]}\n{m.group(4)}"

    return _MARK.sub(sub, text)


def rendered(res: dict) -> dict[str, str]:
    """What every rendered text file should contain, by path relative to the repository root."""
    b = blocks(res)
    out = {}
    for path in MARKED:
        with open(os.path.join(ROOT, path)) as f:
            out[path] = fill(f.read(), b)
    out[os.path.relpath(RESULTS_PAGE, ROOT)] = results_page(res, b)
    return out


def render(res: dict) -> None:
    copy_criteria_figures(res)
    print("figures:", ", ".join(figures(res)))
    for path, text in rendered(res).items():
        with open(os.path.join(ROOT, path), "w") as f:
            f.write(text)
        print("wrote", path)


def check(res: dict) -> list[str]:
    """The paths whose text differs from what the results render to."""
    stale = []
    for path, text in rendered(res).items():
        with open(os.path.join(ROOT, path)) as f:
            if f.read() != text:
                stale.append(path)
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--render", action="store_true", help="do not run benchmarks; render from the JSONs")
    parser.add_argument("--check", action="store_true", help="exit 1 if README/docs are stale")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and their commands")
    args = parser.parse_args()
    if args.list:
        for name, cmd in BENCHMARKS.items():
            print(f"{name:52s} python {' '.join(cmd)}")
        return 0
    if args.check:
        stale = check(load())
        for path in stale:
            print(f"{path} is not what benchmarks/results/*.json render to: run python benchmarks/results.py --render")
        return 1 if stale else 0
    if not args.render:
        for name in args.only or BENCHMARKS:
            print(f"== {name}: python {' '.join(BENCHMARKS[name])}", flush=True)
            done = subprocess.run([sys.executable, *BENCHMARKS[name]], check=False, cwd=ROOT)
            if done.returncode != 0:  # the JSONs written so far stay; a rerun reuses finished training runs
                print(f"{name} failed (exit {done.returncode}); rerun with --only {name}", file=sys.stderr)
                return 2
    render(load())
    return 0


if __name__ == "__main__":
    sys.exit(main())
