"""The pruning methods the pipeline runs, side by side with ADMM (L5).

Every method starts from the same trained dense model, trains for the same
number of epochs (``admm.epochs_per_stage`` per stage of ``prune.stages``,
then ``retrain.epochs`` with the masks fixed), prunes the same coupled
channel groups and ends in the same collapse and report:

``admm``
  Progressive ADMM stages, hard prune, retrain (:func:`admmprune.core.admm.admm`).
``magnitude``
  Filter pruning by a criterion (``prune.criterion``, default ``l2``: the
  classic "prune filters by norm" baseline of Li et al. 2017, on the whole
  group), layer-wise or global (``prune.scope``). One-shot: prune the dense
  model at the final ratio and fine-tune for all the epochs. Iterative
  (``magnitude.iterative``): prune at each stage's ratio and fine-tune
  ``admm.epochs_per_stage`` epochs in between.
``l1_mask``
  A learnable scale per channel of every group (:mod:`admmprune.structure.gates`),
  trained jointly with the weights under ``loss + strength * ||m||_1``; the
  channels with the smallest ``|m|`` are removed (``prune.ratio`` of each
  group, or ranked globally), the masks are folded into the weights, and the
  rest retrains. How many masks end below ``l1_mask.delta`` is reported.
``slimming``
  Network slimming (Liu et al. 2017): L1 on the BatchNorm scales of the
  groups (:func:`admmprune.core.regularizers.bn_l1`), then removal by the
  smallest ``|gamma|``. A model without normalization (LeNet-5) gets gates
  in their place, which makes it ``l1_mask``.
``relaxation``
  Continuous relaxation of channel gates: ``g = sigmoid(s / temperature)``
  per channel (logits trained with Adam), with a budget term ``flops_weight * relu(log(MACs(g)
  / target))^2`` (gated MACs from :func:`admmprune.structure.costs.gated_macs`) and a
  polarization term ``polarization_weight * mean(g (1 - g))`` that pushes
  gates to 0 or 1. The target is the MACs of the model that keeps ``1 -
  ratio`` of every group, so the method spends the same compute as the
  others but chooses the widths itself; channels whose gate ends below
  ``relaxation.threshold`` are removed (every group keeps at least its best
  channel, except a residual branch's inner group, which may close: collapse
  then removes the branch).
``group_lasso``
  Group-sparsity regularized training: proximal SGD with block soft
  thresholding of every channel group (:func:`admmprune.core.regularizers.group_lasso_prox`),
  then removal by the smallest group norms.

Each method is a registered :class:`Method`: a frozen dataclass of plain
values (built by :func:`build` from a run's settings, never from the config
itself) that says what only it knows: its phases, the optax transformation of
each of its phases, the penalty on its gates, how it scores and selects
channels, and what it adds to the report. The pipeline loops over the phases
and asks; it has no ``if method == ...``. Adding a method is one class and its
:func:`register` line.
"""

# Methods register on import, in this order, the order METHODS lists them in.
# isort: off
from admmprune.app.methods import _admm, _magnitude, _gated, _group_lasso

# isort: on
from admmprune.app.methods._admm import Admm
from admmprune.app.methods._base import (
    Method,
    Optimizer,
    Phase,
    PruneInputs,
    ScoredMethod,
    Target,
    Values,
    build,
    keep_at_least_one,
    names,
    register,
    registered,
    without,
)
from admmprune.app.methods._gated import L1Mask, Relaxation, Slimming
from admmprune.app.methods._group_lasso import GroupLasso
from admmprune.app.methods._magnitude import Magnitude

del _admm, _magnitude, _gated, _group_lasso  # imported for their registrations, in this order

#: The registered methods' names.
METHODS = names()
#: Methods with a regularized training phase ("sparsify") before the retrain.
SPARSIFYING = tuple(name for name, cls in registered().items() if cls.sparsifying)

__all__ = [
    "METHODS",
    "SPARSIFYING",
    "Admm",
    "GroupLasso",
    "L1Mask",
    "Magnitude",
    "Method",
    "Optimizer",
    "Phase",
    "PruneInputs",
    "Relaxation",
    "ScoredMethod",
    "Slimming",
    "Target",
    "Values",
    "build",
    "keep_at_least_one",
    "names",
    "register",
    "registered",
    "without",
]
