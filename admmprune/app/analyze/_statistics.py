"""Command line: how far pruning criteria agree, and whether they can decide (L5).

    python -m admmprune.analyze runs/lenet5-mnist-admm-0.9          # a pipeline workdir
    python -m admmprune.analyze path/to/saved/model --dataset mnist  # a save_model directory
    python -m admmprune.analyze --config smoke --workdir /tmp/smoke  # train the dense model first

For every prunable channel group of a trained model it scores the channels by
every criterion of :mod:`admmprune.structure.criteria` that applies and writes to the
output directory (default ``WORKDIR/analysis``, or ``MODEL_DIR/../analysis``):

- ``similarity.csv``: per group and pair of criteria, the Spearman and Kendall
  (tau-b) rank correlations of their scores, and the Jaccard overlap of the
  channels each would prune at ``--ratio`` (the fraction removed);
- ``applicability.csv``: per group and criterion, the coefficient of variation
  of the scores, the relative gap at the cut, and a flag where the criterion
  cannot tell channels apart (:func:`applicability` states the thresholds);
- ``normality.csv``: per layer kernel, whether its trained weights look
  Gaussian, the assumption behind magnitude criteria and FPGM's geometric
  median (:func:`normality`);
- ``analysis.json`` with all of it and the scores themselves, ``summary.md``,
  and ``figures/``: per group a heat map of the Spearman correlations and
  histograms of the scores, per layer a normal Q-Q plot.

An existing output directory is only replaced with ``--overwrite``; the new
one is written next to it and renamed into place at the end. The logic is
importable: :func:`analyze` takes any parameter and spec trees.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from scipy import stats
from tqdm import tqdm

from admmprune.structure import criteria as criteria_lib
from admmprune._errors import UserError, run_cli
from admmprune._types import Params, Specs, path_str
from admmprune.core.projections import num_kept

#: Significance level of the normality tests.
ALPHA = 0.05
#: Shapiro-Wilk runs on a seeded random subsample of at most this many weights
#: (its p-value is not accurate above 5000).
SHAPIRO_MAX = 5000
#: A criterion whose scores vary less than this (coefficient of variation)
#: cannot tell the channels of a group apart.
CV_MIN = 0.01
#: Nor can one whose last pruned and first kept scores differ by less than this
#: relative amount: the cut falls inside a tie (float32 resolution).
GAP_MIN = 1e-6


# --- statistics -----------------------------------------------------------------


def normality(weights: Any, *, alpha: float = ALPHA, max_shapiro: int = SHAPIRO_MAX, seed: int = 0) -> dict[str, Any]:
    """Tests whether ``weights`` are a sample of a normal distribution.

    Three tests of the composite hypothesis "normal with some mean and std",
    each rejecting at ``alpha``:

    - Shapiro-Wilk, on a random subsample of at most ``max_shapiro`` weights
      drawn without replacement with ``numpy.random.default_rng(seed)`` (all
      weights when there are fewer);
    - Kolmogorov-Smirnov against the normal with the sample's mean and std.
      With fitted parameters its p-value is conservative (Lilliefors), so it
      rejects less often than it should;
    - Anderson-Darling for the normal family (SciPy's interpolated p-value,
      which is clipped to [0.01, 0.15]).

    With hundreds of thousands of weights the tests detect deviations far too
    small to matter; read the statistics (and the Q-Q plot), not only the
    flags.

    Args:
      weights: any array; it is flattened.
      alpha: the significance level.
      max_shapiro: the largest Shapiro-Wilk sample.
      seed: the subsample's seed.

    Returns:
      A dict: ``n``, ``mean``, ``std`` (fitted, ddof 1), ``shapiro_n``,
      ``shapiro_w``, ``shapiro_p``, ``shapiro_reject``, ``ks_d``, ``ks_p``,
      ``ks_reject``, ``ad_stat``, ``ad_p``, ``ad_reject``. Tests that cannot
      run (fewer than 8 weights, or all equal) give NaN and ``None``.
    """
    x = np.asarray(weights, np.float64).ravel()
    n = x.size
    mean = float(x.mean()) if n else math.nan
    std = float(x.std(ddof=1)) if n > 1 else math.nan
    out: dict[str, Any] = {"n": n, "mean": mean, "std": std, "shapiro_n": min(n, max_shapiro)}
    keys = ("shapiro_w", "shapiro_p", "ks_d", "ks_p", "ad_stat", "ad_p")
    if n < 8 or not std > 0:
        out.update(dict.fromkeys(keys, math.nan))
        out.update(shapiro_reject=None, ks_reject=None, ad_reject=None)
        return out
    shapiro = stats.shapiro(_subsample(x, max_shapiro, seed))
    ks = stats.kstest(x, "norm", args=(mean, std))
    ad = stats.anderson(x, "norm", method="interpolate")
    out.update(
        shapiro_w=float(shapiro.statistic),
        shapiro_p=float(shapiro.pvalue),
        ks_d=float(ks.statistic),
        ks_p=float(ks.pvalue),
        ad_stat=float(ad.statistic),
        ad_p=float(ad.pvalue),
    )
    for test in ("shapiro", "ks", "ad"):
        out[f"{test}_reject"] = bool(out[f"{test}_p"] < alpha)
    return out


def _subsample(weights: Any, max_n: int, seed: int) -> np.ndarray:
    """At most ``max_n`` of the flattened weights, drawn without replacement, seeded."""
    x = np.asarray(weights, np.float64).ravel()
    return x if x.size <= max_n else np.random.default_rng(seed).choice(x, max_n, replace=False)


def _constant(s: np.ndarray) -> bool:
    return s.size < 3 or bool(np.all(s == s[0]))


def rank_correlations(a: Any, b: Any) -> tuple[float, float]:
    """Spearman's rho and Kendall's tau-b of two score vectors.

    NaN when either vector is constant or has fewer than 3 entries: there is
    no ranking to compare.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if _constant(a) or _constant(b):
        return math.nan, math.nan
    return float(stats.spearmanr(a, b).statistic), float(stats.kendalltau(a, b).statistic)


def pruned(scores: Any, ratio: float) -> np.ndarray:
    """Boolean ``(C,)``: the channels removed at ``ratio`` (lowest scores first).

    The same channels :func:`admmprune.structure.criteria.select` removes at ``keep_ratio
    = 1 - ratio``: ``num_kept`` are kept, ties going to the lower index.
    """
    s = np.asarray(scores, np.float64)
    keep = int(num_kept(s.size, 1.0 - ratio))
    out = np.ones(s.size, bool)
    out[np.argsort(-s, kind="stable")[:keep]] = False
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """``|a & b| / |a | b|`` of two boolean sets; 1 when both are empty."""
    union = int(np.sum(a | b))
    return 1.0 if union == 0 else int(np.sum(a & b)) / union


def applicability(scores: Any, ratio: float) -> dict[str, Any]:
    """Whether a criterion can tell a group's channels apart at ``ratio``.

    ``cv`` is the coefficient of variation ``std / mean`` of the scores (all
    criteria score >= 0). With the scores sorted ascending and ``k`` channels
    pruned, ``rel_gap`` is ``(s[k] - s[k-1]) / max(|s[k]|, |s[k-1]|)``, the
    relative distance between the last pruned and the first kept channel (NaN
    when nothing or everything is pruned). ``flagged`` is set when:

    - the scores are NaN (the criterion does not apply to the group);
    - ``cv < CV_MIN`` (0.01): the scores are nearly constant, so the ranking
      is noise (BatchNorm scales at initialization, all 1);
    - ``rel_gap < GAP_MIN`` (1e-6): the cut falls inside a tie, so which of the
      tied channels go is arbitrary (zero Taylor scores of dead channels).

    Returns:
      ``{"channels", "pruned", "cv", "rel_gap", "flagged", "reason"}``.
    """
    s = np.asarray(scores, np.float64)
    k = int(np.sum(pruned(s, ratio))) if not np.isnan(s).any() else s.size - int(num_kept(s.size, 1.0 - ratio))
    out = {"channels": s.size, "pruned": k, "cv": math.nan, "rel_gap": math.nan, "flagged": True, "reason": ""}
    if np.isnan(s).any():
        out["reason"] = "does not apply (no score)"
        return out
    mean = float(s.mean())
    out["cv"] = float(s.std() / abs(mean)) if mean != 0 else math.nan
    if 0 < k < s.size:
        srt = np.sort(s)
        scale = max(abs(srt[k]), abs(srt[k - 1]))
        out["rel_gap"] = float((srt[k] - srt[k - 1]) / scale) if scale > 0 else 0.0
    reasons = []
    if not out["cv"] >= CV_MIN:
        reasons.append(f"scores nearly constant (cv {out['cv']:.2g} < {CV_MIN:g})")
    if out["rel_gap"] < GAP_MIN:
        reasons.append(f"the cut falls in a tie (relative gap {out['rel_gap']:.2g} < {GAP_MIN:g})")
    out["flagged"] = bool(reasons)
    out["reason"] = "; ".join(reasons)
    return out


# --- the analysis ---------------------------------------------------------------


def _kernels(params: Params) -> list[tuple[str, np.ndarray]]:
    """``(path, weights)`` of every layer kernel (a ``kernel`` with two or more axes)."""
    flat = [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]
    return [(path, np.asarray(x)) for path, x in flat if path.rsplit("/", 1)[-1] == "kernel" and np.ndim(x) >= 2]


def _choose_criteria(requested: Sequence[str] | None, grads: Any, all_scores) -> tuple[list[str], dict[str, str]]:
    """The criteria to compare and why the others are left out."""
    skipped: dict[str, str] = {}
    if requested is None:
        chosen = [c for c in criteria_lib.CRITERIA if c != "taylor" or grads is not None]
        if grads is None:
            skipped["taylor"] = "needs gradients: give a dataset (--dataset) to compute them"
    else:
        unknown = [c for c in requested if c not in criteria_lib.CRITERIA]
        if unknown:
            raise UserError(f"unknown criterion {unknown[0]!r}; choose from {', '.join(criteria_lib.CRITERIA)}")
        if "taylor" in requested and grads is None:
            raise UserError("the taylor criterion needs gradients: give a dataset (--dataset) to compute them")
        chosen = list(dict.fromkeys(requested))
    out = []
    for c in chosen:
        if len(criteria_lib.unavailable(all_scores(c))) == len(all_scores(c)):
            reason = "no group has a normalization scale" if c == "bn_scale" else "no group has a producing kernel"
            if requested is not None:
                raise UserError(f"criterion {c} does not apply to this model: {reason}")
            skipped[c] = reason
        else:
            out.append(c)
    if not out:
        raise UserError("no criterion applies to this model")
    return out, skipped


def analyze(
    params: Params,
    specs: Specs,
    *,
    ratio: float = 0.5,
    criteria: Sequence[str] | None = None,
    grads: Any = None,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Compares pruning criteria on every channel group of ``params``.

    Args:
      params: a pytree of trained weights.
      specs: its spec tree (groups as in :mod:`admmprune.structure.criteria`).
      ratio: the fraction of channels removed, in (0, 1), for the Jaccard
        overlap of pruned sets and the gap at the cut.
      criteria: names from :data:`admmprune.structure.criteria.CRITERIA`; ``None``:
        every one that applies to some group (``taylor`` only with ``grads``).
      grads: gradient trees of a few batches, for ``taylor``.
      seed: the key of ``random`` and the Shapiro subsample's seed.
      progress: show a progress bar over the groups.

    Returns:
      A JSON-able dict (NaN where a value is undefined): ``ratio``,
      ``criteria``, ``skipped`` (criterion: why), ``thresholds``, ``groups``
      (``{group: {"channels", "members", "scores": {criterion: [...]}}}``),
      ``similarity``, ``mean_similarity``, ``applicability`` and
      ``normality`` (lists of rows, as in the CSV files).

    Raises:
      UserError: a ratio outside (0, 1), an unknown criterion, or one that
        cannot be computed for this model.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise UserError(f"the ratio must be a number in (0, 1), got {ratio!r}")
    cache: dict[str, dict[str, np.ndarray]] = {}

    def all_scores(c: str) -> dict[str, np.ndarray]:
        if c not in cache:
            kw = {"grads": grads} if c == "taylor" else {"key": jax.random.key(seed)} if c == "random" else {}
            cache[c] = {g: np.asarray(s, np.float64) for g, s in criteria_lib.scores(params, specs, c, **kw).items()}
        return cache[c]

    chosen, skipped = _choose_criteria(criteria, grads, all_scores)
    groups = criteria_lib.channel_groups(params, specs)
    result: dict[str, Any] = {
        "ratio": float(ratio),
        "criteria": chosen,
        "skipped": skipped,
        "thresholds": {"alpha": ALPHA, "shapiro_max": SHAPIRO_MAX, "cv_min": CV_MIN, "gap_min": GAP_MIN},
        "groups": {},
        "similarity": [],
        "applicability": [],
    }
    for name in tqdm(groups, desc="groups", disable=None if progress else True, leave=False):
        channels, members = groups[name]
        scores = {c: all_scores(c)[name] for c in chosen}
        result["groups"][name] = {
            "channels": channels,
            "members": list(members),
            "scores": {c: s.tolist() for c, s in scores.items()},
        }
        for c, s in scores.items():
            result["applicability"].append({"group": name, "criterion": c, **applicability(s, ratio)})
        usable = [c for c in chosen if not np.isnan(scores[c]).any()]
        cuts = {c: pruned(scores[c], ratio) for c in usable}
        for i, a in enumerate(usable):
            for b in usable[i:]:
                rho, tau = rank_correlations(scores[a], scores[b])
                result["similarity"].append(
                    {
                        "group": name,
                        "a": a,
                        "b": b,
                        "channels": channels,
                        "spearman": rho,
                        "kendall": tau,
                        "jaccard": jaccard(cuts[a], cuts[b]),
                    }
                )
    result["mean_similarity"] = _mean_similarity(result["similarity"], chosen)
    result["normality"] = [
        {"layer": path.rsplit("/", 1)[0], "kind": "conv" if w.ndim >= 3 else "dense", **normality(w, seed=seed)}
        for path, w in _kernels(params)
    ]
    return result


def _mean_similarity(rows: list[dict[str, Any]], chosen: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for i, a in enumerate(chosen):
        for b in chosen[i + 1 :]:
            mine = [r for r in rows if r["a"] == a and r["b"] == b]
            entry: dict[str, Any] = {"a": a, "b": b}
            for key in ("spearman", "kendall", "jaccard"):
                values = [r[key] for r in mine if not math.isnan(r[key])]
                entry[key] = float(np.mean(values)) if values else math.nan
                entry[f"{key}_groups"] = len(values)
            out.append(entry)
    return out


# --- models and data ------------------------------------------------------------


def model_specs(model: Any) -> Specs:
    """The spec tree the pipeline prunes: a declared chain, else traced discovery.

    Raises:
      UserError: a model without a chain whose input shape is unknown.
    """
    from flax import nnx

    from admmprune.structure import discovery, graph

    _, params, _ = nnx.split(model, nnx.Param, ...)
    if getattr(model, "chain", None) is not None:
        return graph.chain_specs(params, model.chain)
    in_shape = getattr(model, "config", {}).get("in_shape")
    if in_shape is None:
        raise UserError(f"{type(model).__name__} declares no chain and no in_shape: cannot trace its channel groups")
    return discovery.discover_nnx(model, jax.ShapeDtypeStruct((1, *in_shape), np.float32)).specs


def taylor_grads(model: Any, batches: Sequence[Mapping[str, Any]]) -> list[Params]:
    """Cross-entropy gradients of ``model``'s ``nnx.Param`` state, one per batch.

    The model runs in training mode, as in Molchanov et al., whose gradients
    are those of training; BatchNorm's statistics are not updated.
    """
    import optax
    from flax import nnx

    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def grad(params, rest, images, labels):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest, copy=True)(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.grad(loss)(params)

    return [grad(params, rest, b["image"], b["label"]) for b in batches]


def dataset_batches(
    model: Any, name: str, *, data_dir: str | None, batches: int, batch_size: int, normalize: bool, seed: int
) -> list[dict[str, np.ndarray]]:
    """``batches`` shuffled training batches of ``name`` that fit ``model``.

    Raises:
      UserError: the dataset cannot be had, or its images do not fit the model
        (or the model is not an image classifier).
    """
    from admmprune.runtime import data as data_lib

    info = data_lib.dataset_info(name, data_dir)
    model.eval()  # traced for its shape only: BatchNorm must not update its statistics
    try:
        out = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, *info.image_shape), np.float32))
    except Exception as e:  # noqa: BLE001 - whatever the model raises on a wrong shape: one line
        raise UserError(
            f"the model does not take {name} images of shape {info.image_shape} ({type(e).__name__}); "
            "give the dataset it was trained on"
        ) from None
    if getattr(out, "ndim", None) != 2:
        raise UserError("the taylor criterion needs an image classifier (logits of shape (batch, classes))")
    source = data_lib.load_source(name, f"train[:{batches * batch_size}]", data_dir)
    norm = (info.mean, info.std) if normalize and info.mean is not None else None
    loader = data_lib.make_loader(
        source, batch_size=batch_size, seed=seed, normalize=norm, shard_index=0, shard_count=1
    )
    return [batch for _, batch in zip(range(batches), loader)]


# --- writing --------------------------------------------------------------------


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
        for ax, c in zip(np.atleast_1d(fig.subplots(1, n)), usable):
            ax.hist(group["scores"][c], bins=min(30, group["channels"]))
            ax.set_title(c, fontsize=7)
            ax.set_yticks([])
            ax.tick_params(labelsize=5)
            ax.locator_params(axis="x", nbins=3)
        fig.suptitle(f"{name}: channel scores", fontsize=8)
        fig.savefig(os.path.join(directory, f"{_file_name(name)}.scores.png"), dpi=80)

    if params is None:
        return
    for path, w in _kernels(params):
        layer = path.rsplit("/", 1)[0]
        (theory, ordered), (slope, intercept, _) = stats.probplot(_subsample(w, SHAPIRO_MAX, result.get("seed", 0)))
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


# --- the command line -----------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        raise UserError(f"{message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (``--config.FIELD=VALUE`` overrides are set
    aside for the train CLI's parser by ``_parse``)."""
    parser = _Parser(
        prog="python -m admmprune.analyze",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="With --config, any --config.FIELD=VALUE override of python -m admmprune.train applies.",
    )
    parser.add_argument("path", nargs="?", help="a saved model directory (save_model), or a pipeline workdir")
    parser.add_argument("--config", help="train the dense model of this config first (as python -m admmprune.train)")
    parser.add_argument("--workdir", help="with --config: the run's directory (default: the train CLI's)")
    parser.add_argument("--output", help="output directory (default: WORKDIR/analysis or MODEL_DIR/../analysis)")
    parser.add_argument("--ratio", default="0.5", help="fraction of channels pruned, for the overlaps (default 0.5)")
    parser.add_argument(
        "--criteria", help=f"comma-separated, from {','.join(criteria_lib.CRITERIA)} (default: all that apply)"
    )
    parser.add_argument(
        "--dataset",
        help="mnist, fashion_mnist, ...: training batches for the taylor criterion, normalized as the run's "
        "config says (default: the workdir's dataset; with a bare model dir, normalized as the train CLI does)",
    )
    parser.add_argument("--data-dir", help="the tfds data directory (default: the run's, or the tfds default)")
    parser.add_argument("--taylor-batches", default="4", help="batches of gradients for taylor (default 4)")
    parser.add_argument("--batch-size", default="128", help="batch size of those batches (default 128)")
    parser.add_argument("--seed", default="0", help="seed of the random criterion, the batches and subsamples")
    parser.add_argument("--no-figures", action="store_true", help="write no PNG figures")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    own, overrides = [], []
    items = iter(argv)
    for item in items:  # --config.FIELD=VALUE or --config.FIELD VALUE: for the train CLI's parser
        if item.startswith("--config."):
            overrides.append(item)
            if "=" not in item:
                overrides.append(next(items, ""))
        else:
            own.append(item)
    args = parser.parse_args(own)
    if overrides and args.config is None:
        raise UserError(f"{overrides[0]} overrides a config: it needs --config")
    if (args.path is None) == (args.config is None):
        raise UserError("give a saved model directory or workdir, or --config to train one (not both)")
    for name, low in (("ratio", None), ("taylor_batches", 1), ("batch_size", 1), ("seed", 0)):
        text = getattr(args, name)
        try:
            value = float(text) if low is None else int(text)
        except ValueError:
            value = None
        if value is None or (low is None and not 0 < value < 1) or (low is not None and value < low):
            what = "a number in (0, 1)" if low is None else f"an integer >= {low}"
            raise UserError(f"--{name.replace('_', '-')} must be {what}, got {text!r}")
        setattr(args, name, value)
    if args.criteria is not None:
        args.criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
        unknown = [c for c in args.criteria if c not in criteria_lib.CRITERIA]
        if unknown or not args.criteria:
            raise UserError(
                f"unknown criterion {(unknown or [''])[0]!r}; choose from {', '.join(criteria_lib.CRITERIA)}"
            )
    return args, overrides


def _find_model(path: str) -> tuple[str, dict[str, Any]]:
    """``(model dir, the run's data settings or {})`` for a model dir or workdir."""
    if not os.path.exists(path):
        raise UserError(f"no such model directory or workdir: {path}")
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a directory: give a saved model directory or a pipeline workdir")
    model_dir = path
    if os.path.isfile(os.path.join(path, "config.json")):  # a pipeline workdir
        model_dir = os.path.join(path, "dense")
        if not os.path.isdir(model_dir):
            raise UserError(
                f"workdir {path} has no dense model yet (WORKDIR/dense): let its run finish the dense phase"
            )
    run_config = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "config.json")
    data: dict[str, Any] = {}
    if os.path.isfile(run_config):
        with open(run_config) as f:
            data = json.load(f).get("data", {})
    return model_dir, data


def run(args: argparse.Namespace, overrides: list[str]) -> str:
    """What the command does, for parsed arguments; returns the output directory."""
    import admmprune

    if args.config is not None:
        from admmprune import train

        config, workdir = train.parse_args(
            ["--config", args.config, *overrides, *(["--workdir", args.workdir] if args.workdir else [])]
        )
        model_dir = os.path.join(workdir, "dense")
        data = {"name": config.data.name, "data_dir": config.data.data_dir, "normalize": config.data.normalize}
    else:
        model_dir, data = _find_model(args.path)
    default = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "analysis")
    output = check_output(args.output or default, overwrite=args.overwrite)
    if args.config is not None:
        from admmprune.app import pipeline

        pipeline.run(config, workdir, stop_after="dense")
    try:
        model = admmprune.load(model_dir)
    except UserError as e:
        raise UserError(f"{model_dir} is not a model saved by admmprune (save_model): {e}") from None
    dataset = args.dataset or data.get("name")
    grads = None
    if dataset is not None and (args.criteria is None or "taylor" in args.criteria):
        batches = dataset_batches(
            model,
            dataset,
            data_dir=args.data_dir or data.get("data_dir"),
            batches=args.taylor_batches,
            batch_size=args.batch_size,
            normalize=bool(data.get("normalize", True)),
            seed=args.seed,
        )
        grads = taylor_grads(model, batches)
    from flax import nnx

    _, params, _ = nnx.split(model, nnx.Param, ...)
    result = analyze(
        params,
        model_specs(model),
        ratio=args.ratio,
        criteria=args.criteria,
        grads=grads,
        seed=args.seed,
        progress=True,
    )
    result = {"source": os.path.abspath(model_dir), "seed": args.seed, "dataset": dataset, **result}
    return write(result, output, params=params, overwrite=args.overwrite, figures=not args.no_figures, progress=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body():
        args, overrides = _parse(argv)
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # tfds's absl warnings are not actionable here
        output = run(args, overrides)
        print(f"analysis in {output} (summary.md, analysis.json, *.csv{'' if args.no_figures else ', figures/'})")

    return run_cli(body, interrupted="interrupted; nothing was written to the output directory")



__all__ = [
    "ALPHA",
    "CV_MIN",
    "GAP_MIN",
    "SHAPIRO_MAX",
    "analyze",
    "applicability",
    "build_parser",
    "check_output",
    "dataset_batches",
    "jaccard",
    "main",
    "model_specs",
    "normality",
    "pruned",
    "rank_correlations",
    "run",
    "summary_markdown",
    "taylor_grads",
    "write",
    "write_figures",
]
