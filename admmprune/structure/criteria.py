r"""Channel-importance criteria for structured pruning, and selection by them (L2).

A *group* is a set of channels removed together: the specs that share a
``group`` name (:func:`admmprune.core.groups.channel_groups`), channel ``c``
spanning every member (the producing kernels' filters, their biases and
normalization parameters, and the consuming kernels' input rows). A channel
spec without a ``group`` name (what :data:`admmprune.core.sparsity.DEFAULT_RULES`
gives every kernel) is a group of its own, named by its parameter's path.

:func:`scores` gives every group one score per channel, higher meaning more
important; :func:`select` turns scores into masks (keep the highest) shaped
like the ones :func:`admmprune.hard_prune` returns, so that
:func:`admmprune.apply_masks` and :func:`admmprune.structure.collapse.collapse` take
them. The criteria (:data:`CRITERIA`), with :math:`W^m_c` the entries of
channel :math:`c` in member :math:`m` of the group:

``l1``, ``l2``
  :math:`\sum_m \|W^m_c\|_1` and :math:`(\sum_m \|W^m_c\|_2^2)^{1/2}`, over
  *all* members. Li et al. (2017) score a filter by its producing kernel
  alone; here the whole group counts because the whole group is removed, a
  residual group has several producing kernels (none of them "the" filter),
  and so that ``l2`` is exactly the score of the Euclidean projection that
  ADMM and :func:`admmprune.hard_prune` use: ``select(scores(p, s, "l2"), s,
  p, r)`` equals ``hard_prune(p, s, r)[1]``. Every criterion below that sums
  over members sums over the same set.
``fpgm``
  FPGM (He et al., 2019): for every producing kernel (a :class:`Filter
  <admmprune.core.sparsity.Filter>` member with two or more axes) with filters
  :math:`f_1..f_C`, :math:`\sum_j \|f_c - f_j\|_2`; a group with several
  producing kernels (a residual stage) sums them. Filters near the layer's
  geometric median score low: the others can stand in for them.
``bn_scale``
  Network Slimming (Liu et al., 2017): :math:`|\gamma_c|` of the group's
  normalization scale (a 1-D member whose path ends in ``scale``), averaged
  over the group's scales so that groups with several normalizations stay
  comparable in a global ranking.
``taylor``
  First-order Taylor (Molchanov et al., 2019, eq. 8 for a group):
  :math:`\frac1B \sum_b (\sum_m \sum_{i \in c} w^m_i g^{m,b}_i)^2`, the
  squared first-order change of the loss when the channel is zeroed,
  averaged over ``B`` batches' gradients :math:`g^b` (computed by the
  caller).
``lamp``
  LAMP (Lee et al., 2021) on channels: with the group's squared ``l2``
  scores sorted ascending, :math:`s_u / \sum_{v \ge u} s_v`. The largest
  channel scores 1 and every score lies in (0, 1] (0 for a zero channel),
  which makes groups comparable in a global ranking. Within a group the
  score increases with :math:`s_u`, so LAMP ranks channels exactly as
  ``l2`` does: it differs only in ``select(..., scope="global")``.
``random``
  :math:`U(0, 1)` per channel from a ``jax.random`` key: the baseline.

A criterion that cannot score a group (``bn_scale`` without a normalization
scale, ``fpgm`` without a producing kernel) gives it NaN scores;
:func:`unavailable` lists such groups and :func:`select` refuses them.

Everything is pure and runs under ``jax.jit`` (with ``specs`` and the
criterion static); scores are float32 whatever the parameters' dtype.

References:
  Li, Kadav, Durdanovic, Samet, Graf. Pruning Filters for Efficient ConvNets.
  ICLR 2017. He, Liu, Wang, Hu, Yang. Filter Pruning via Geometric Median for
  Deep Convolutional Neural Networks Acceleration. CVPR 2019. Liu, Li, Shen,
  Huang, Yan, Zhang. Learning Efficient Convolutional Networks through Network
  Slimming. ICCV 2017. Molchanov, Mallya, Tyree, Frosio, Kautz. Importance
  Estimation for Neural Network Pruning. CVPR 2019. Lee, Park, Mo, Ahn, Shin.
  Layer-adaptive Sparsity for the Magnitude-based Pruning (LAMP). ICLR 2021.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from admmprune._types import Masks, Params, Specs
from admmprune.core import groups as groups_lib
from admmprune.core.groups import ChannelGroup, ChannelGroups
from admmprune.core.projections import (
    expand_groups,
    group_scores,
    num_kept,
    projection_mask,
    to_groups,
    top_k_groups,
)
from admmprune.core.sparsity import Filter, Spec

#: Every criterion :func:`scores` knows, in the order reports list them.
CRITERIA = ("l1", "l2", "fpgm", "bn_scale", "taylor", "lamp", "random")
SCOPES = ("layer", "global")


def _groups(params: Params, specs: Specs) -> tuple[ChannelGroups, list[Any]]:
    """The groups the criteria score (lone channel specs included) and the leaves of ``params``."""
    groups = groups_lib.channel_groups(specs, params, lone=True)
    return groups, groups.flatten(params)


def _used(groups: ChannelGroups, leaves: Sequence[Any]) -> list[Any]:
    """``leaves`` with ``None`` where no group holds the leaf (not passed to ``jit``)."""
    held = groups.held
    return [x if i in held else None for i, x in enumerate(leaves)]


def _others(groups: ChannelGroups, leaves: Sequence[Any]) -> list[Any]:
    """``leaves`` with ``None`` but where a spec is outside every group."""
    outside = set(groups.outside())
    return [x if i in outside else None for i, x in enumerate(leaves)]


def _members(group: ChannelGroup) -> list[tuple[int, Spec]]:
    return [(m.leaf, m.spec) for m in group.members]


def channel_groups(params: Params, specs: Specs) -> dict[str, tuple[int, tuple[str, ...]]]:
    """``{group: (channels, member paths)}`` for every group the criteria score.

    Raises:
      ValueError: if a group's members disagree on their number of channels.
    """
    return {g.name: (g.channels, tuple(m.path for m in g.members)) for g in _groups(params, specs)[0]}


# --- the criteria, one group at a time ------------------------------------------


def _rows(x: ArrayLike, spec: Spec) -> jax.Array:
    return to_groups(jnp.asarray(x), spec).astype(jnp.float32)


def _l1(leaves, members) -> jax.Array:
    return sum(jnp.sum(jnp.abs(_rows(leaves[i], s)), axis=1) for i, s in members)


def _squared_l2(leaves, members) -> jax.Array:
    return sum(group_scores(jnp.asarray(leaves[i]), s) for i, s in members)


def _fpgm(leaves, members) -> jax.Array | None:
    producers = [(i, s) for i, s in members if isinstance(s, Filter) and np.ndim(leaves[i]) >= 2]
    if not producers:
        return None
    total = 0.0
    for i, s in producers:
        f = _rows(leaves[i], s)
        sq = jnp.sum(f * f, axis=1)
        d2 = sq[:, None] + sq[None, :] - 2.0 * (f @ f.T)
        # Clipped at 0 (rounding) and the diagonal zeroed exactly: sqrt has an
        # infinite slope at 0, and a channel's distance to itself is 0.
        d = jnp.where(jnp.eye(f.shape[0], dtype=jnp.bool_), 0.0, jnp.sqrt(jnp.maximum(d2, 0.0)))
        total = total + jnp.sum(d, axis=1)
    return total


def _bn_scale(leaves, members, paths) -> jax.Array | None:
    scales = [
        jnp.abs(_rows(leaves[i], s)[:, 0])
        for i, s in members
        if np.ndim(leaves[i]) == 1 and paths[i].rsplit("/", 1)[-1] == "scale"
    ]
    return None if not scales else sum(scales) / len(scales)


def _taylor(leaves, members, grads: list[list[Any]]) -> jax.Array:
    per_batch = []
    for g in grads:
        contrib = sum(jnp.sum(_rows(leaves[i], s) * _rows(g[i], s), axis=1) for i, s in members)
        per_batch.append(contrib * contrib)
    return sum(per_batch) / len(per_batch)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _scores_jit(groups: ChannelGroups, criterion: str, leaves, grads, key) -> list[jax.Array]:
    """One program for all groups: eager, each small op would dispatch (and
    compile for its shapes) on its own, seconds for a ResNet."""
    out = []
    for g, group in enumerate(groups):
        members, channels = _members(group), group.channels
        if criterion == "l1":
            s = _l1(leaves, members)
        elif criterion == "l2":
            s = jnp.sqrt(_squared_l2(leaves, members))
        elif criterion == "lamp":
            s = lamp_scores(_squared_l2(leaves, members))
        elif criterion == "fpgm":
            s = _fpgm(leaves, members)
        elif criterion == "bn_scale":
            s = _bn_scale(leaves, members, groups.paths)
        elif criterion == "taylor":
            s = _taylor(leaves, members, grads)
        else:
            s = jax.random.uniform(jax.random.fold_in(key, g), (channels,), jnp.float32)
        out.append(jnp.full((channels,), jnp.nan, jnp.float32) if s is None else s)
    return out


def lamp_scores(squared: ArrayLike) -> jax.Array:
    r"""LAMP scores of one layer: :math:`s_u / \sum_{v \ge u} s_v`, ``s`` sorted ascending.

    Ties are ordered by index (stable sort), as in Lee et al.'s reference code;
    a zero entry whose suffix sum is zero scores 0.

    Args:
      squared: ``(C,)`` non-negative scores, e.g. squared channel norms.

    Returns:
      ``(C,)`` float32 scores in ``[0, 1]``, with the maximum at 1 (unless all
      are zero).
    """
    s = jnp.asarray(squared, jnp.float32)
    order = jnp.argsort(s, stable=True)
    ranked = s[order]
    suffix = jnp.cumsum(ranked[::-1])[::-1]
    lamp = jnp.where(suffix > 0, ranked / jnp.where(suffix > 0, suffix, 1.0), 0.0)
    return jnp.zeros_like(s).at[order].set(lamp)


def _flat_grads(groups: ChannelGroups, params: Params, grads: Any) -> list[list[Any]]:
    """``grads`` (a sequence of trees, or one tree stacked on a leading axis) as lists of leaves."""
    if grads is None:
        raise ValueError("the taylor criterion needs grads: a list of gradient trees, one per batch")
    if jax.tree.structure(grads) == jax.tree.structure(params):
        stacked = _used(groups, groups.flatten(grads))
        pairs = [(np.shape(g), shape) for g, shape in zip(stacked, groups.shapes, strict=True) if g is not None]
        n = {g[0] for g, shape in pairs if g[1:] == shape}
        if len(n) != 1 or any(g[1:] != shape for g, shape in pairs):
            raise ValueError("stacked grads need one leading batch axis on every leaf")
        return [[None if g is None else g[b] for g in stacked] for b in range(n.pop())]
    if not isinstance(grads, Sequence) or not grads:
        raise ValueError("grads must be a non-empty list of gradient trees shaped like params")
    out = []
    for g in grads:
        try:
            leaves = _used(groups, groups.flatten(g))
        except (ValueError, TypeError):
            leaves = None
        if leaves is None or any(
            a is not None and np.shape(a) != x for a, x in zip(leaves, groups.shapes, strict=True)
        ):
            raise ValueError("every gradient tree in grads must have the shapes of params")
        out.append(leaves)
    return out


def scores(
    params: Params,
    specs: Specs,
    criterion: str,
    *,
    grads: Any = None,
    key: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Scores every channel of every group by ``criterion`` (higher = keep).

    Args:
      params: a pytree of arrays (an NNX ``State``, a Linen dict, ...).
      specs: a spec tree shaped like ``params``; groups as in the module doc.
      criterion: one of :data:`CRITERIA`.
      grads: for ``taylor``: the loss gradients of a few batches, as a list
        of trees shaped like ``params``, or one such tree whose leaves have a
        leading batch axis.
      key: for ``random``: a ``jax.random`` key.

    Returns:
      ``{group: (C,) float32 scores}`` in the order of the spec tree; NaN
      scores for a group the criterion does not apply to (see
      :func:`unavailable`).

    Raises:
      ValueError: for an unknown criterion, missing ``grads``/``key``, or
        a group whose members disagree on their channel count.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    if criterion == "random" and key is None:
        raise ValueError("the random criterion needs a jax.random key: scores(..., key=jax.random.key(0))")
    groups, leaves = _groups(params, specs)
    flat_grads = _flat_grads(groups, params, grads) if criterion == "taylor" else None
    out = _scores_jit(groups, criterion, _used(groups, leaves), flat_grads, key if criterion == "random" else None)
    return dict(zip(groups.names, out, strict=True))


def unavailable(group_scores: Mapping[str, ArrayLike]) -> tuple[str, ...]:
    """The groups whose scores are NaN: the criterion does not apply to them.

    Needs concrete scores (call it outside ``jit``).
    """
    return tuple(name for name, s in group_scores.items() if bool(np.isnan(np.asarray(s)).any()))


# --- selection ------------------------------------------------------------------


def _check_scores(group_scores: Mapping[str, Any], groups: ChannelGroups) -> list[Any]:
    """The scores in group order, after checking they fit the groups."""
    missing = [g for g in groups.names if g not in group_scores]
    unknown = [g for g in group_scores if g not in groups.names]
    if missing or unknown:
        raise ValueError(f"scores do not match the spec tree's groups: missing {missing}, unknown {unknown}")
    for name, c in ((g.name, g.channels) for g in groups):
        s = group_scores[name]
        if np.shape(s) != (c,):
            raise ValueError(f"group {name!r} has {c} channels, its scores shape {np.shape(s)}")
        if not isinstance(s, jax.core.Tracer) and np.isnan(np.asarray(s)).any():
            raise ValueError(
                f"group {name!r} has NaN scores: the criterion does not apply to it (bn_scale needs a "
                "normalization scale in the group, fpgm a producing kernel); choose another criterion"
            )
    return [group_scores[name] for name in groups.names]


def _global_keep(s: list[jax.Array], keep_ratio: ArrayLike) -> list[jax.Array]:
    """One threshold over all channels, each group's best channel kept first."""
    flat = jnp.concatenate([jnp.asarray(x, jnp.float32) for x in s])
    forced = jnp.concatenate([top_k_groups(x, 1) for x in s])
    order = jnp.argsort(-jnp.where(forced, jnp.inf, flat), stable=True)
    ranks = jnp.zeros(flat.shape, jnp.int32).at[order].set(jnp.arange(flat.shape[0], dtype=jnp.int32))
    keep = ranks < jnp.maximum(num_kept(flat.shape[0], keep_ratio), len(s))
    return jnp.split(keep, np.cumsum([x.shape[0] for x in s])[:-1])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _select_jit(groups: ChannelGroups, scope: str, round_to: int, s: list[jax.Array], leaves, keep_ratio) -> list[Any]:
    if scope == "global":
        keeps = _global_keep(s, keep_ratio)
        if round_to > 1:
            keeps = [
                top_k_groups(x, num_kept(x.shape[0], jnp.sum(k) / k.shape[0], round_to))
                for x, k in zip(s, keeps, strict=True)
            ]
    else:
        keeps = [top_k_groups(x, num_kept(x.shape[0], keep_ratio, round_to)) for x in s]
    masks: list[Any] = [None] * len(groups.specs)
    for group, keep in zip(groups, keeps, strict=True):
        for m in group.members:
            mask = expand_groups(keep, m.spec, groups.shapes[m.leaf])
            masks[m.leaf] = mask if masks[m.leaf] is None else masks[m.leaf] & mask
    for i, spec in enumerate(groups.specs):
        if leaves[i] is not None:
            masks[i] = projection_mask(jnp.asarray(leaves[i]), spec, keep_ratio)
    return masks


def select(
    group_scores: Mapping[str, ArrayLike],
    specs: Specs,
    params: Params,
    keep_ratio: ArrayLike,
    *,
    scope: str = "layer",
    round_to: int = 1,
) -> Masks:
    """Masks that keep the highest-scoring channels of every group.

    ``scope="layer"`` keeps :func:`num_kept(C, keep_ratio, round_to)
    <admmprune.core.projections.num_kept>` channels of each group. ``"global"``
    ranks the channels of all groups together and keeps the ``num_kept(N,
    keep_ratio)`` best of all ``N`` (only meaningful for scores comparable
    across groups: ``lamp``, ``bn_scale``, ``taylor``, ``random``; ``l1`` and
    ``l2`` favour groups with more weights per channel), but always at least
    each group's best channel, so exactly ``max(num_kept(N, keep_ratio),
    number of groups)`` channels; with ``round_to > 1`` each group's count is
    then rounded as in ``num_kept``, and the total is only approximate. Ties
    go to the lower channel index (and the earlier group).

    Parameters with a spec outside every group (``Unstructured``, ``NofM``,
    ``Block``, ``Column``) get :func:`admmprune.core.projections.projection_mask`
    (magnitude). A leaf in several groups keeps what all of them keep.

    Args:
      group_scores: ``{group: (C,) scores}`` from :func:`scores`.
      specs: the spec tree the scores were computed for.
      params: the parameters (their shapes, and magnitudes for other specs).
      keep_ratio: the fraction of channels kept, in (0, 1]; may be traced.
      scope: ``"layer"`` or ``"global"``.
      round_to: keep a multiple of this many channels per group.

    Returns:
      A boolean masks tree shaped like ``params`` (``True`` = kept), ``None``
      where ``specs`` is ``None``.

    Raises:
      ValueError: for scores that do not match the groups, NaN scores (a
        criterion that does not apply; not checked under ``jit``), a bad
        scope or a concrete keep ratio outside (0, 1].
    """
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose from {', '.join(SCOPES)}")
    if not isinstance(keep_ratio, jax.core.Tracer) and not 0 < float(keep_ratio) <= 1:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}")
    groups, leaves = _groups(params, specs)
    s = _check_scores(group_scores, groups)
    return groups.unflatten(_select_jit(groups, scope, round_to, s, _others(groups, leaves), keep_ratio))


__all__ = ["CRITERIA", "SCOPES", "channel_groups", "lamp_scores", "scores", "select", "unavailable"]
