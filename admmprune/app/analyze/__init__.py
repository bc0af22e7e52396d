"""How far pruning criteria agree, and whether they can decide (L5).

For every prunable channel group of a trained model, :func:`analyze` scores the
channels by every criterion of :mod:`admmprune.structure.criteria` that
applies and compares them: the Spearman and Kendall (tau-b) rank correlations
of their scores and the Jaccard overlap of the channels each would prune
(:func:`rank_correlations`, :func:`jaccard`), whether each criterion can tell
the channels apart at the cut (:func:`applicability`), and whether each layer's
trained weights look Gaussian, the assumption behind magnitude criteria and
FPGM's geometric median (:func:`normality`). :func:`write` saves the result as
CSV files, ``analysis.json``, ``summary.md`` and figures.

:func:`analyze` takes any parameter and spec trees; for an admmprune model,
:func:`model_specs` gives its spec tree, and :func:`dataset_batches` with
:func:`taylor_grads` the gradients of the ``taylor`` criterion. The command
line ``python -m admmprune.analyze`` runs all of it on a saved model or a
pipeline's workdir.
"""

from admmprune.app.analyze._inputs import dataset_batches, model_specs, taylor_grads
from admmprune.app.analyze._statistics import (
    ALPHA,
    CV_MIN,
    GAP_MIN,
    SHAPIRO_MAX,
    analyze,
    applicability,
    jaccard,
    normality,
    pruned,
    rank_correlations,
)
from admmprune.app.analyze._writers import check_output, summary_markdown, write, write_figures

__all__ = [
    "ALPHA",
    "CV_MIN",
    "GAP_MIN",
    "SHAPIRO_MAX",
    "analyze",
    "applicability",
    "check_output",
    "dataset_batches",
    "jaccard",
    "model_specs",
    "normality",
    "pruned",
    "rank_correlations",
    "summary_markdown",
    "taylor_grads",
    "write",
    "write_figures",
]
