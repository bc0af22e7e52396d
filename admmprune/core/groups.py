"""Channel groups: the channels that are pruned together, built once from a spec tree (L1).

Structured pruning removes a layer's output channel together with everything
that acts on it: the layer's bias and normalization parameters, and the rows
of every kernel that reads it. The specs say which: every :class:`Filter
<admmprune.core.sparsity.Filter>` or :class:`Channel
<admmprune.core.sparsity.Channel>` spec with a ``group`` name (alone, or
inside a :class:`Coupled <admmprune.core.sparsity.Coupled>` spec) is a
*member* of that group, and channel ``c`` of the group spans entry ``c`` of
every member (its slice along the member's axis, after the member's
``repeat`` and ``offset``).

:func:`channel_groups` reads a spec tree once into a :class:`ChannelGroups`:
every :class:`ChannelGroup` with its name, channel count and members (leaf
index, path, spec, shape), validated (the members agree on the channel
count). Every module that works on groups (projections, criteria,
regularizers, gates, costs, collapse, discovery, the pipeline's report) takes
this one type instead of re-deriving its own view of the tree. It is frozen
and hashable, so it can be a static argument of ``jax.jit``.

The host-side helpers at the end (:meth:`ChannelGroups.alive`,
:meth:`ChannelGroups.widths`) say which channels a set of masks keeps; they
are numpy code for the shape-changing work outside ``jit``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

from admmprune._types import Masks, Params, Specs, path_str
from admmprune.core.sparsity import CHANNEL_SPECS, Channel, Coupled, Filter, Spec, is_spec

#: The last path component of a normalization layer's scale (BatchNorm,
#: LayerNorm, GroupNorm, RMSNorm in Flax).
NORM_SCALE = "scale"


def memberships(spec: Spec | None) -> tuple[Filter | Channel, ...]:
    """The channel-group memberships of one leaf's spec.

    ``Coupled`` specs have several, a ``Filter``/``Channel`` with a ``group``
    name has one, every other spec (and ``None``) none.
    """
    if isinstance(spec, Coupled):
        return spec.specs
    if isinstance(spec, CHANNEL_SPECS) and spec.group is not None:
        return (spec,)
    return ()


@dataclasses.dataclass(frozen=True)
class Member:
    """One parameter's share of a channel group.

    Attributes:
      leaf: the parameter's index among the leaves of the spec tree.
      path: the parameter's ``/``-joined path.
      spec: the ``Filter`` (the parameter produces the channels) or ``Channel``
        (it reads them) membership, with its axis, repeat, offset and size.
      shape: the parameter's shape, when the groups were built with params.
    """

    leaf: int
    path: str
    spec: Filter | Channel
    shape: tuple[int, ...] | None = None

    @property
    def produces(self) -> bool:
        """Whether the parameter produces the channels (a ``Filter`` member)."""
        return isinstance(self.spec, Filter)

    @property
    def leaf_name(self) -> str:
        """The last component of the path (``kernel``, ``bias``, ``scale``)."""
        return self.path.rpartition("/")[2]

    @property
    def module(self) -> str:
        """The path of the module that holds the parameter."""
        return self.path.rpartition("/")[0]

    @property
    def is_norm_scale(self) -> bool:
        """Whether the member is a normalization layer's scale in the group."""
        return self.produces and self.leaf_name == NORM_SCALE

    def alive(self, mask: Any) -> np.ndarray:
        """Per channel of the member's slice: does ``mask`` keep any of its entries? (numpy, host)"""
        mask = np.asarray(mask)
        axis, repeat, channels = self.spec.channel_layout(mask.shape)
        per_channel = np.moveaxis(mask, axis, 0).reshape(repeat, channels, -1).any(axis=(0, 2))
        return per_channel[self.spec.channel_slice(channels)]

    def expand(self, keep: Any, shape: tuple[int, ...]) -> np.ndarray:
        """The elementwise mask of ``shape`` that keeps the channels ``keep`` says
        (``True`` outside the member's slice) (numpy, host)."""
        axis, repeat, channels = self.spec.channel_layout(shape)
        full = np.ones(channels, bool)
        full[self.spec.channel_slice(channels)] = np.asarray(keep, bool)
        line = np.tile(full, repeat).reshape([-1 if i == axis else 1 for i in range(len(shape))])
        return np.broadcast_to(line, shape)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """Channels pruned together: channel ``c`` spans entry ``c`` of every member.

    Attributes:
      name: the group's name (the specs' ``group``; for a lone channel spec,
        see :func:`channel_groups`, its parameter's path).
      members: every parameter's share of the group, in spec-tree order.
      channels: the number of channels, when the groups were built with
        params (every member agrees on it).
    """

    name: str
    members: tuple[Member, ...]
    channels: int | None = None

    @property
    def producers(self) -> tuple[Member, ...]:
        """The members that produce the channels (``Filter`` specs)."""
        return tuple(m for m in self.members if m.produces)

    @property
    def consumers(self) -> tuple[Member, ...]:
        """The members that read the channels (``Channel`` specs)."""
        return tuple(m for m in self.members if not m.produces)

    @property
    def norm_scales(self) -> tuple[Member, ...]:
        """The normalization scales of the group (``Filter`` members whose path ends in ``scale``)."""
        return tuple(m for m in self.members if m.is_norm_scale)

    @property
    def leaves(self) -> tuple[int, ...]:
        """The members' leaf indices."""
        return tuple(m.leaf for m in self.members)


@dataclasses.dataclass(frozen=True)
class ChannelGroups:
    """The channel groups of a spec tree, with what the tree says of every leaf.

    Iterating gives the groups in spec-tree order (of their first member);
    ``groups[name]`` one group.

    Attributes:
      groups: the groups.
      specs: every leaf's spec (``None`` = not pruned), in tree order.
      paths: every leaf's ``/``-joined path.
      shapes: every leaf's shape, when built with params.
      treedef: the spec tree's structure (its leaves: specs and ``None``).
    """

    groups: tuple[ChannelGroup, ...]
    specs: tuple[Spec | None, ...]
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...] | None
    treedef: Any

    def flatten(self, tree: Any) -> list[Any]:
        """The leaves of a tree shaped like the spec tree (params, masks, grads), in its order."""
        return self.treedef.flatten_up_to(tree)

    def unflatten(self, leaves: Any) -> Any:
        """A tree shaped like the spec tree from its leaves."""
        return self.treedef.unflatten(leaves)

    def __iter__(self) -> Iterator[ChannelGroup]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @property
    def held(self) -> frozenset[int]:
        """The leaves that some group holds."""
        return frozenset(m.leaf for g in self.groups for m in g.members)

    def outside(self) -> tuple[int, ...]:
        """The leaves with a spec that no group holds (pruned on their own)."""
        held = self.held
        return tuple(i for i, s in enumerate(self.specs) if s is not None and i not in held)

    def alive(self, masks: Masks) -> dict[str, np.ndarray]:
        """``{group: boolean (C,)}``: the channels each group keeps under ``masks`` (numpy, host).

        A channel is kept when every member of the group keeps some weight of
        it. Members without a mask do not vote, nor do leaves in several groups
        whose mask is all ``False``: the next conv of a fully pruned residual
        branch (input channels: the branch's group, all removed; output
        channels: the residual stream's) says nothing about the stream. A group
        none of whose members votes keeps everything and is left out.

        Args:
          masks: boolean masks shaped like the spec tree (``None`` = unmasked).
        """
        flat = self.flatten(masks)
        out: dict[str, np.ndarray] = {}
        for g in self.groups:
            for m in g.members:
                mask = flat[m.leaf]
                if mask is None or (len(memberships(self.specs[m.leaf])) > 1 and not np.any(np.asarray(mask))):
                    continue
                a = m.alive(mask)
                out[g.name] = a if g.name not in out else out[g.name] & a
        return out

    def widths(self, masks: Masks | None = None) -> dict[str, tuple[int, int]]:
        """``{group: (kept, total)}`` channel counts; without ``masks`` all are kept.

        Needs the groups built with params (for the totals).
        """
        alive = {} if masks is None else self.alive(masks)
        out = {}
        for g in self.groups:
            total = _require_channels(g)
            out[g.name] = (int(alive[g.name].sum()) if g.name in alive else total, total)
        return out


def _require_channels(group: ChannelGroup) -> int:
    if group.channels is None:
        raise ValueError(f"group {group.name!r}: channel counts need the groups built with params")
    return group.channels


def channel_groups(specs: Specs, params: Params | None = None, *, lone: bool = False) -> ChannelGroups:
    """Reads the channel groups of a spec tree, once.

    Args:
      specs: a spec tree (``None`` = not pruned).
      params: optional arrays (or ``jax.ShapeDtypeStruct``) shaped like
        ``specs``; with them every group knows its channel count, and the
        members are checked to agree on it.
      lone: also make a group of every ``Filter``/``Channel`` spec without a
        ``group`` name (what :data:`admmprune.core.sparsity.DEFAULT_RULES`
        gives every kernel), named by its parameter's path: the criteria score
        such a layer's channels like any group's.

    Returns:
      The groups, in the order of their first member in the tree.

    Raises:
      ValueError: if a group's members disagree on their number of channels,
        or (with ``lone``) a parameter has the name of a group.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    paths = tuple(path_str(p) for p, _ in flat)
    flat_specs = tuple(s for _, s in flat)
    shapes = None if params is None else tuple(tuple(np.shape(x)) for x in treedef.flatten_up_to(params))
    members: dict[str, list[Member]] = {}
    for i, spec in enumerate(flat_specs):
        for m in memberships(spec):
            members.setdefault(m.group, []).append(Member(i, paths[i], m, None if shapes is None else shapes[i]))
    if lone:
        for i, spec in enumerate(flat_specs):
            if isinstance(spec, CHANNEL_SPECS) and spec.group is None:
                if paths[i] in members:
                    raise ValueError(f"parameter {paths[i]!r} has the name of a group; rename the group")
                members[paths[i]] = [Member(i, paths[i], spec, None if shapes is None else shapes[i])]
    groups = []
    for name, ms in members.items():
        channels = None
        if shapes is not None:
            counts = {m.spec.num_groups(m.shape) for m in ms}
            if len(counts) != 1:
                raise ValueError(f"group {name!r}: members disagree on the channel count {sorted(counts)}")
            channels = counts.pop()
        groups.append(ChannelGroup(name, tuple(ms), channels))
    return ChannelGroups(tuple(groups), flat_specs, paths, shapes, treedef)


def as_groups(specs_or_groups: Specs | ChannelGroups, params: Params | None = None) -> ChannelGroups:
    """``specs_or_groups`` itself if it is a :class:`ChannelGroups`, else its groups."""
    if isinstance(specs_or_groups, ChannelGroups):
        return specs_or_groups
    return channel_groups(specs_or_groups, params)


__all__ = [
    "NORM_SCALE",
    "ChannelGroup",
    "ChannelGroups",
    "Member",
    "as_groups",
    "channel_groups",
    "memberships",
]
