"""The statistics of the criteria analysis, and :func:`analyze`, which applies
them to every channel group of a model.

Pure functions of numbers (NumPy and SciPy): normality tests of weights, rank
correlations and Jaccard overlaps of channel scores, and whether a criterion
can tell a group's channels apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from scipy import stats
from tqdm.auto import tqdm

from admmprune._errors import UserError
from admmprune._types import Params, Specs, path_str
from admmprune.core.projections import num_kept
from admmprune.structure import criteria as criteria_lib

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
    shapiro = stats.shapiro(subsample(x, max_shapiro, seed))
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


def subsample(weights: Any, max_n: int, seed: int) -> np.ndarray:
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


def layer_kernels(params: Params) -> list[tuple[str, np.ndarray]]:
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
        for path, w in layer_kernels(params)
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
