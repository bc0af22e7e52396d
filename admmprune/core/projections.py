r"""Euclidean projections onto structured-sparsity sets (layer L1).

For a spec whose tensor splits into groups :math:`g = 1..G`, the set is

.. math:: S_k = \{p : |\{g : p_g \ne 0\}| \le k\},\qquad
          k = \mathrm{clip}(\lfloor \kappa G + \tfrac12 \rfloor, 1, G)

with :math:`\kappa` the keep ratio, and

.. math:: \Pi_{S_k}(x) = \arg\min_{p \in S_k} \|x - p\|_2^2

keeps the :math:`k` groups of largest :math:`\|x_g\|_2` and zeroes the rest,
because :math:`\|x - p\|^2` is the summed squared norm of the zeroed groups.
Ties are broken towards the lower group index, so the result is deterministic.

Every function here is pure, keeps shape and dtype, and runs under
``jax.jit`` with the keep ratio a traced scalar: a new ratio reuses the
compiled program. Scores are computed in float32 whatever the tensor's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from admmprune._types import Masks, Params, Specs, is_none, per_leaf
from admmprune.core.groups import channel_groups
from admmprune.core.sparsity import (
    CHANNEL_SPECS,
    JOINT_SPECS,
    Block,
    Column,
    Coupled,
    NofM,
    Spec,
    Unstructured,
)

# --- groups: each spec knows how it splits a tensor (admmprune.core.sparsity) ------


def num_groups(shape: Sequence[int], spec: Spec) -> int:
    """The number of groups ``spec`` splits a tensor of ``shape`` into."""
    if isinstance(spec, (NofM, Coupled)):
        raise TypeError(f"{spec!r} has no groups")
    return spec.num_groups(tuple(shape))


def _whole(x: jax.Array) -> jax.Array:
    """``x`` replicated where its type says it is split over devices (explicit
    sharding, ``jax.set_mesh`` with ``AxisType.Explicit``): a sort needs the
    whole axis. Scores and masks are small; under automatic sharding nothing changes."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    if spec is not None and any(a is not None for a in spec):
        return jax.sharding.reshard(x, jax.sharding.PartitionSpec())
    return x


def to_groups(x: jax.Array, spec: Spec) -> jax.Array:
    """Rearranges ``x`` into a ``(num_groups, group_size)`` matrix.

    Block specs pad edge blocks with zeros, which changes no group norm. A
    channel spec with an ``offset``/``size`` slice has only the slice's rows.
    """
    shape = x.shape
    x = _whole(x)  # the reshapes below regroup entries across any split axis
    if isinstance(spec, Unstructured):
        return x.reshape(-1, 1)
    if isinstance(spec, CHANNEL_SPECS):
        axis, repeat, channels = spec.channel_layout(shape)
        y = jnp.moveaxis(x, axis, 0).reshape(repeat, channels, -1)
        return y.transpose(1, 0, 2).reshape(channels, -1)[spec.channel_slice(channels)]
    if isinstance(spec, Column):
        return x.reshape(-1, shape[-1])
    if isinstance(spec, Block):
        sizes = spec.block_sizes(shape)
        padded = [-(-n // b) * b for n, b in zip(shape, sizes, strict=True)]
        y = jnp.pad(x, [(0, p - n) for p, n in zip(padded, shape, strict=True)])
        split = [d for p, b in zip(padded, sizes, strict=True) for d in (p // b, b)]
        y = y.reshape(split)
        nd = len(shape)
        y = y.transpose([2 * i for i in range(nd)] + [2 * i + 1 for i in range(nd)])
        return y.reshape(num_groups(shape, spec), -1)
    raise TypeError(f"{spec!r} has no groups")


def from_groups(g: jax.Array, spec: Spec, shape: Sequence[int]) -> jax.Array:
    """Inverse of :func:`to_groups` for a tensor of ``shape``.

    Entries outside a channel spec's ``offset``/``size`` slice, which no group
    holds, are zero (``False``).
    """
    shape = tuple(shape)
    g = _whole(g)
    if isinstance(spec, (Unstructured, Column)):
        return g.reshape(shape)
    if isinstance(spec, CHANNEL_SPECS):
        axis, repeat, channels = spec.channel_layout(shape)
        if spec.sliced:
            sl = spec.channel_slice(channels)
            g = jnp.pad(g, [(sl.start, channels - sl.stop)] + [(0, 0)] * (g.ndim - 1))
        moved = (shape[axis],) + shape[:axis] + shape[axis + 1 :]
        y = g.reshape(channels, repeat, -1).transpose(1, 0, 2).reshape(moved)
        return jnp.moveaxis(y, 0, axis)
    if isinstance(spec, Block):
        sizes = spec.block_sizes(shape)
        counts = [-(-n // b) for n, b in zip(shape, sizes, strict=True)]
        nd = len(shape)
        y = g.reshape(counts + sizes)
        y = y.transpose([i // 2 + (nd if i % 2 else 0) for i in range(2 * nd)])
        y = y.reshape([c * b for c, b in zip(counts, sizes, strict=True)])
        return y[tuple(slice(0, n) for n in shape)]
    raise TypeError(f"{spec!r} has no groups")


def group_scores(x: jax.Array, spec: Spec) -> jax.Array:
    """Squared L2 norm of every group of ``x``, in float32, shape ``(G,)``."""
    g = to_groups(x, spec).astype(jnp.float32)
    return jnp.sum(g * g, axis=1)


def expand_groups(keep: jax.Array, spec: Spec, shape: Sequence[int]) -> jax.Array:
    """Broadcasts a per-group boolean ``(G,)`` to an elementwise mask of ``shape``.

    Entries outside a channel spec's ``offset``/``size`` slice are ``True``:
    the spec does not constrain them.
    """
    if isinstance(spec, CHANNEL_SPECS) and spec.sliced:
        channels = spec.channel_layout(tuple(shape))[2]
        sl = spec.channel_slice(channels)
        keep = jnp.pad(keep, (sl.start, channels - sl.stop), constant_values=True)
        spec = type(spec)(axis=spec.axis, group=spec.group, repeat=spec.repeat)
    if isinstance(spec, Block):
        group_size = math.prod(spec.block_sizes(tuple(shape)))
    else:
        group_size = math.prod(shape) // keep.shape[0]
    full = jnp.broadcast_to(keep[:, None], (keep.shape[0], group_size))
    return from_groups(full, spec, shape)


def groups_alive(support: jax.Array, spec: Spec) -> jax.Array:
    """Per-group boolean: does the group have any weight inside ``support``?"""
    return jnp.any(to_groups(support, spec), axis=1)


# --- selection ---------------------------------------------------------------


def num_kept(num_groups: int, keep_ratio: ArrayLike, round_to: int = 1) -> jax.Array:
    """``k = clip(round(keep_ratio * G), 1, G)`` as an int32 array.

    At least one group is always kept, so that no layer vanishes by rounding.
    With ``round_to = N > 1``, ``k`` is rounded to the nearest multiple of
    ``N`` (at least ``N``), or is ``G`` when that is smaller: kept widths that
    suit the hardware (8 for GPU tensor cores, 128 for TPU matrix units).
    """
    k = jnp.floor(jnp.asarray(keep_ratio, jnp.float32) * num_groups + 0.5)
    if round_to > 1:
        k = jnp.maximum(jnp.floor(k / round_to + 0.5), 1) * round_to
    return jnp.clip(k, 1, num_groups).astype(jnp.int32)


def top_k_groups(scores: jax.Array, k: ArrayLike, alive: jax.Array | None = None) -> jax.Array:
    """Boolean ``(G,)``: the ``k`` highest scores, ties to the lower index.

    Args:
      scores: ``(G,)`` group scores.
      k: how many to keep (may be traced).
      alive: optional ``(G,)`` boolean; dead groups are never kept.
    """
    scores = _whole(jnp.asarray(scores, jnp.float32))
    if alive is not None:
        scores = jnp.where(_whole(alive), scores, -jnp.inf)
    order = jnp.argsort(-scores, stable=True)
    ranks = jnp.zeros(scores.shape, jnp.int32).at[order].set(jnp.arange(scores.shape[0], dtype=jnp.int32))
    keep = ranks < k
    return keep if alive is None else keep & alive


def _nofm_mask(x: jax.Array, spec: NofM, support: jax.Array | None) -> jax.Array:
    axis = spec.axis % x.ndim
    a = _whole(jnp.abs(jnp.moveaxis(x, axis, -1)).astype(jnp.float32))
    if support is not None:
        a = jnp.where(_whole(jnp.moveaxis(support, axis, -1)), a, -1.0)
    length = a.shape[-1]
    blocks = -(-length // spec.m)
    a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, blocks * spec.m - length)], constant_values=-2.0)
    a = a.reshape(a.shape[:-1] + (blocks, spec.m))
    order = jnp.argsort(-a, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    keep = (ranks < spec.n).reshape(a.shape[:-2] + (blocks * spec.m,))[..., :length]
    keep = jnp.moveaxis(keep, -1, axis)
    return keep if support is None else keep & support


def projection_mask(
    x: jax.Array,
    spec: Spec,
    keep_ratio: ArrayLike,
    *,
    scores: jax.Array | None = None,
    support: jax.Array | None = None,
) -> jax.Array:
    """The elementwise boolean mask of :func:`project` (``True`` = kept)."""
    if isinstance(spec, NofM):
        return _nofm_mask(x, spec, support)
    n = num_groups(x.shape, spec)
    if scores is None:
        scores = group_scores(x, spec)
    elif scores.shape != (n,):
        raise ValueError(f"scores must have shape ({n},) for {spec!r} on {x.shape}, got {scores.shape}")
    alive = None if support is None else groups_alive(support, spec)
    keep = expand_groups(top_k_groups(scores, num_kept(n, keep_ratio), alive), spec, x.shape)
    return keep if support is None else keep & support


def project(
    x: ArrayLike,
    spec: Spec,
    keep_ratio: ArrayLike = 1.0,
    *,
    scores: jax.Array | None = None,
    support: jax.Array | None = None,
) -> jax.Array:
    r"""Euclidean projection of ``x`` onto the set ``spec`` at ``keep_ratio``.

    .. math:: \Pi(x) = \arg\min_p \|x - p\|_2^2 \ \text{s.t.}\
              |\{g : p_g \ne 0\}| \le k,\ \operatorname{supp}(p) \subseteq
              \text{support}

    For ``NofM`` the constraint is instead "at most ``n`` non-zeros in every
    ``m`` consecutive entries along the axis", and ``keep_ratio`` is unused.

    Args:
      x: the tensor.
      spec: a spec from :mod:`admmprune.core.sparsity`.
      keep_ratio: fraction of groups kept, a Python float or a traced scalar.
      scores: optional precomputed ``(G,)`` group scores used instead of the
        groups' L2 norms (to score a group jointly over several tensors).
        Then the result is the projection only if the scores are the norms.
      support: optional boolean mask of allowed non-zeros (weights removed
        in an earlier stage stay removed).

    Returns:
      An array with the shape and dtype of ``x``.
    """
    x = jnp.asarray(x)
    mask = projection_mask(x, spec, keep_ratio, scores=scores, support=support)
    return jnp.where(mask, x, jnp.zeros((), x.dtype))


# --- whole pytrees, with coupled channel groups ------------------------------


def coupled_groups(specs: Specs) -> dict[str, list[tuple[int, Spec]]]:
    """Maps each ``group`` name in a spec tree to ``(flat leaf index, spec)`` pairs.

    A plain view of :func:`admmprune.core.groups.channel_groups`, which the
    library itself uses.
    """
    return {g.name: [(m.leaf, m.spec) for m in g.members] for g in channel_groups(specs)}


def project_tree(
    tree: Params,
    specs: Specs,
    keep_ratio: Any = 1.0,
    *,
    support: Masks | None = None,
    round_to: int = 1,
) -> tuple[Params, Masks]:
    """Projects every pruned leaf of ``tree``; coupled groups are projected jointly.

    Leaves whose specs share a ``group`` name (see
    :class:`admmprune.core.sparsity.Filter`) are one constraint: a channel's score
    is its squared norm summed over every member, the top-k channels of the
    group are kept in every member, and all others are zeroed in all members.
    This is the exact projection onto that joint set. A leaf in several groups
    (:class:`admmprune.core.sparsity.Coupled`) keeps what all its groups keep.
    Leaves whose ``Unstructured``, ``Column`` or ``Block`` specs share a
    ``group`` name are one set too: the ``k`` groups (weights, columns,
    blocks) of largest norm among all of theirs are kept, ``k`` counted over
    all of them (the exact projection onto "at most ``k`` non-zero groups in
    these leaves together"). Every other leaf is projected on its own with
    :func:`project`.

    Args:
      tree: a pytree of arrays.
      specs: a spec tree shaped like ``tree`` (``None`` = not pruned).
      keep_ratio: a scalar, or a tree of scalars shaped like ``specs``. A group
        (channel or joint) uses the ratio of its first member.
      support: optional masks tree (``None`` leaves where not pruned).
      round_to: keep a multiple of this many channels in every coupled group
        (see :func:`num_kept`).

    Returns:
      ``(projected, masks)``: the projected tree, and a tree of boolean masks
      with ``None`` where ``specs`` is ``None``.

    Raises:
      ValueError: if a group's members disagree on their number of channels.
    """
    groups = channel_groups(specs, tree)
    leaves = groups.flatten(tree)
    ratios = per_leaf(keep_ratio, groups.treedef, len(leaves))
    supports = [None] * len(leaves) if support is None else groups.flatten(support)
    masks: list[Any] = [None] * len(leaves)

    for group in groups:
        scores = sum(group_scores(leaves[m.leaf], m.spec) for m in group.members)
        alive = None
        if support is not None:
            alive = jnp.all(jnp.stack([groups_alive(supports[m.leaf], m.spec) for m in group.members]), axis=0)
        keep = top_k_groups(scores, num_kept(group.channels, ratios[group.members[0].leaf], round_to), alive)
        for m in group.members:
            mask = expand_groups(keep, m.spec, leaves[m.leaf].shape)
            masks[m.leaf] = mask if masks[m.leaf] is None else masks[m.leaf] & mask

    joint: dict[str, list[int]] = {}
    for i in groups.outside():
        spec = groups.specs[i]
        if isinstance(spec, JOINT_SPECS) and spec.group is not None:
            joint.setdefault(spec.group, []).append(i)
        else:
            masks[i] = projection_mask(leaves[i], spec, ratios[i], support=supports[i])
    for members in joint.values():
        for i, mask in zip(members, _joint_masks(leaves, groups.specs, ratios, supports, members), strict=True):
            masks[i] = mask

    out = [x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype)) for x, m in zip(leaves, masks, strict=True)]
    return groups.unflatten(out), groups.unflatten(masks)


def _joint_masks(leaves, specs, ratios, supports, members: list[int]) -> list[jax.Array]:
    """The masks of leaves whose specs share a ``group`` name: the top-k of all their groups together."""
    scores = [group_scores(leaves[i], specs[i]) for i in members]
    sizes = [int(x.shape[0]) for x in scores]
    alive = None
    if supports[members[0]] is not None:
        alive = jnp.concatenate([groups_alive(supports[i], specs[i]) for i in members])
    keep = top_k_groups(jnp.concatenate(scores), num_kept(sum(sizes), ratios[members[0]]), alive)
    out, start = [], 0
    for i, size in zip(members, sizes, strict=True):
        mask = expand_groups(keep[start : start + size], specs[i], leaves[i].shape)
        out.append(mask if supports[i] is None else mask & supports[i])
        start += size
    return out


def apply_masks(tree: Params, masks: Masks) -> Params:
    """Zeroes the masked-out entries of every leaf that has a mask."""
    return jax.tree.map(
        lambda m, x: x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype)),
        masks,
        tree,
        is_leaf=is_none,
    )


__all__ = [
    "apply_masks",
    "coupled_groups",
    "expand_groups",
    "from_groups",
    "group_scores",
    "groups_alive",
    "num_groups",
    "num_kept",
    "project",
    "project_tree",
    "projection_mask",
    "to_groups",
    "top_k_groups",
]
