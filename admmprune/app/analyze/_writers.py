"""The outputs of the criteria analysis: CSV files, ``analysis.json``,
``summary.md`` and PNG figures, written into a new directory that replaces the
output only when everything is written.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from admmprune._errors import UserError
from admmprune._types import Params
from admmprune.app.analyze._statistics import SHAPIRO_MAX, layer_kernels, subsample


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})


def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def summary_markdown(result: Mapping[str, Any]) -> str:
    """A short markdown summary of :func:`analyze`'s result."""
    lines = [
        "# Pruning-criteria analysis",
        "",
        f"Source: `{result.get('source', '-')}`. Criteria: {', '.join(result['criteria'])}"
        + "".join(f"; {c} skipped ({why})" for c, why in result["skipped"].items())
        + f". Pruned fraction for the overlaps: {result['ratio']:g}. {len(result['groups'])} channel groups.",
        "",
        "## Mean rank correlation per pair of criteria",
        "",
        "| a | b | Spearman | Kendall | Jaccard of pruned sets | groups |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["mean_similarity"]:
        lines.append(
            f"| {r['a']} | {r['b']} | {_fmt(r['spearman'])} | {_fmt(r['kendall'])} | {_fmt(r['jaccard'])} "
            f"| {r['spearman_groups']} |"
        )
    flagged = [r for r in result["applicability"] if r["flagged"]]
    t = result["thresholds"]
    lines += [
        "",
        f"## Criteria that cannot tell channels apart (cv < {t['cv_min']:g}, gap at the cut < {t['gap_min']:g})",
        "",
    ]
    lines += [f"- `{r['group']}`: {r['criterion']}: {r['reason']}" for r in flagged] or ["None."]
    lines += [
        "",
        f"## Gaussian weights? (alpha {t['alpha']:g}; Shapiro-Wilk on at most {t['shapiro_max']} weights)",
        "",
        "| layer | weights | mean | std | Shapiro p | KS p | AD p | rejected by |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["normality"]:
        by = [name for name, key in (("Shapiro", "shapiro"), ("KS", "ks"), ("AD", "ad")) if r[f"{key}_reject"]]
        lines.append(
            f"| `{r['layer']}` | {r['n']} | {_fmt(r['mean'], '.3g')} | {_fmt(r['std'], '.3g')} "
            f"| {_fmt(r['shapiro_p'], '.3g')} | {_fmt(r['ks_p'], '.3g')} | {_fmt(r['ad_p'], '.3g')} "
            f"| {', '.join(by) or 'none'} |"
        )
    rejected = [r["layer"] for r in result["normality"] if r["shapiro_reject"] or r["ks_reject"] or r["ad_reject"]]
    lines += ["", f"Normality rejected by at least one test for: {', '.join(rejected) or 'no layer'}.", ""]
    return "\n".join(lines)


def _file_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "." for ch in name)


def write_figures(result: Mapping[str, Any], params: Params | None, directory: str, *, progress: bool = False) -> None:
    """PNG figures: per group the Spearman heat map and score histograms, per
    layer a normal Q-Q plot (of the Shapiro subsample; needs ``params``).

    Fixed margins rather than a layout engine, few ticks, 80 dpi: a figure
    takes tens of milliseconds, and a ResNet has dozens.
    """
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas

    os.makedirs(directory, exist_ok=True)
    chosen = result["criteria"]
    for name, group in tqdm(result["groups"].items(), desc="figures", disable=None if progress else True, leave=False):
        usable = [c for c in chosen if not any(math.isnan(v) for v in group["scores"][c])]
        n = len(usable)
        matrix = np.full((n, n), np.nan)
        for r in result["similarity"]:
            if r["group"] == name:
                i, j = usable.index(r["a"]), usable.index(r["b"])
                matrix[i, j] = matrix[j, i] = r["spearman"]
        fig = Figure(figsize=(1.6 + 0.55 * n, 1.2 + 0.55 * n))
        fig.subplots_adjust(left=0.9 / (1.6 + 0.55 * n), bottom=0.8 / (1.2 + 0.55 * n), right=0.95, top=0.88)
        ax = fig.subplots()
        ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(n), usable, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(n), usable, fontsize=7)
        for i in range(n):
            for j in range(n):
                color = "white" if abs(matrix[i, j]) > 0.6 else "black"
                ax.text(j, i, _fmt(matrix[i, j], ".2f"), ha="center", va="center", fontsize=6, color=color)
        ax.set_title(f"{name}: Spearman", fontsize=8)
        fig.savefig(os.path.join(directory, f"{_file_name(name)}.correlation.png"), dpi=80)

        fig = Figure(figsize=(1.8 * n, 1.6))
        fig.subplots_adjust(left=0.02, right=0.98, bottom=0.15, top=0.75, wspace=0.1)
        for ax, c in zip(np.atleast_1d(fig.subplots(1, n)), usable, strict=True):
            ax.hist(group["scores"][c], bins=min(30, group["channels"]))
            ax.set_title(c, fontsize=7)
            ax.set_yticks([])
            ax.tick_params(labelsize=5)
            ax.locator_params(axis="x", nbins=3)
        fig.suptitle(f"{name}: channel scores", fontsize=8)
        fig.savefig(os.path.join(directory, f"{_file_name(name)}.scores.png"), dpi=80)

    if params is None:
        return
    for path, w in layer_kernels(params):
        layer = path.rsplit("/", 1)[0]
        (theory, ordered), (slope, intercept, _) = stats.probplot(subsample(w, SHAPIRO_MAX, result.get("seed", 0)))
        fig = Figure(figsize=(2.4, 2.4))
        fig.subplots_adjust(left=0.2, bottom=0.17, right=0.95, top=0.88)
        ax = fig.subplots()
        ax.plot(theory, ordered, ",", color="tab:blue")
        ax.plot(theory[[0, -1]], slope * theory[[0, -1]] + intercept, color="tab:red", linewidth=0.8)
        ax.set_title(f"{layer}: normal Q-Q", fontsize=7)
        ax.set_xlabel("normal quantiles", fontsize=6)
        ax.set_ylabel("weights", fontsize=6)
        ax.tick_params(labelsize=5)
        fig.savefig(os.path.join(directory, f"{_file_name(layer)}.qq.png"), dpi=80)


def check_output(output: str, *, overwrite: bool = False) -> str:
    """The absolute output path, after checking a run may write it.

    Raises:
      UserError: it exists (and ``overwrite`` is off), or is not a directory.
    """
    output = os.path.abspath(output)
    if os.path.exists(output) and not os.path.isdir(output):
        raise UserError(f"output {output} exists and is not a directory")
    if os.path.exists(output) and not overwrite:
        raise UserError(f"output {output} already exists (a previous analysis?); pass --overwrite or another --output")
    return output


def write(
    result: Mapping[str, Any],
    output: str,
    *,
    params: Params | None = None,
    overwrite: bool = False,
    figures: bool = True,
    progress: bool = False,
) -> str:
    """Writes the CSV files, ``analysis.json``, ``summary.md`` and figures.

    Everything goes to a new directory next to ``output``, renamed to
    ``output`` at the end, so a failure never leaves a half-written analysis
    nor touches an earlier one.

    Args:
      result: :func:`analyze`'s result.
      output: the output directory.
      params: the analyzed weights, for the Q-Q plots.
      overwrite: replace an existing ``output``.
      figures: write ``figures/``.
      progress: show a progress bar.

    Returns:
      The absolute output path.

    Raises:
      UserError: ``output`` exists and ``overwrite`` is off.
    """
    output = check_output(output, overwrite=overwrite)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.tmp-", dir=parent)
    try:
        _write_csv(os.path.join(tmp, "similarity.csv"), result["similarity"])
        _write_csv(os.path.join(tmp, "applicability.csv"), result["applicability"])
        _write_csv(os.path.join(tmp, "normality.csv"), result["normality"])
        with open(os.path.join(tmp, "analysis.json"), "w") as f:
            json.dump(_json_safe(dict(result)), f, indent=1)
            f.write("\n")
        with open(os.path.join(tmp, "summary.md"), "w") as f:
            f.write(summary_markdown(result))
        if figures:
            write_figures(result, params, os.path.join(tmp, "figures"), progress=progress)
        old = None
        if os.path.exists(output):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.old-", dir=parent)
            os.replace(output, os.path.join(old, "analysis"))
        os.replace(tmp, output)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
