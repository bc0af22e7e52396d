"""Channel dependency groups (layer L3).

Structured pruning removes a layer's output channel together with everything
that acts on that channel: the layer's bias, and the rows of the next layer's
kernel that read it. Such a set is one *group*, scored jointly and pruned as a
whole, so that what is pruned can be physically removed.

Models that declare their layers as a *chain* (each layer feeds the next) get
their groups from :func:`chain_specs`. :mod:`admmprune.structure.discovery` derives the
same spec trees for any architecture from the traced program (and equals
:func:`chain_specs` on the chains), with a declaration as an override.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from admmprune._types import Masks, Params, Specs, path_str
from admmprune.core.groups import channel_groups
from admmprune.core.sparsity import Channel, Coupled, Filter, Spec, is_spec


def chain_specs(params: Params, chain: Sequence[tuple[str, int]]) -> Specs:
    """Coupled filter-pruning specs for a chain of dense/conv layers.

    Every layer but the last has its output channels pruned in a group named
    after it: its ``kernel`` (last axis) and ``bias``, and the next layer's
    ``kernel`` input axis (``-2``). The last layer is the output layer: its
    outputs are never pruned.

    Args:
      params: the parameters, with ``<layer>/kernel`` and optional
        ``<layer>/bias`` paths (an NNX ``State`` or a nested dict).
      chain: ``(layer path, input repeat)`` in data-flow order; ``repeat`` is
        how many input rows each channel of the previous layer owns (``H * W``
        for a dense layer that reads a flattened ``(H, W, C)`` map, else 1).

    Returns:
      A spec tree shaped like ``params``; parameters outside the chain get
      ``None``.

    Raises:
      ValueError: if a layer of the chain has no kernel in ``params``.
    """
    table: dict[str, Any] = {}
    names = [name for name, _ in chain]
    for i, (name, repeat) in enumerate(chain):
        members = []
        if i > 0:
            members.append(Channel(axis=-2, group=names[i - 1], repeat=repeat))
        if i < len(chain) - 1:
            members.append(Filter(axis=-1, group=name))
            table[f"{name}/bias"] = Filter(axis=-1, group=name)
        table[f"{name}/kernel"] = None if not members else members[0] if len(members) == 1 else Coupled(tuple(members))

    found = set()

    def pick(path, leaf):
        del leaf
        name = path_str(path)
        if name in table:
            found.add(name)
        return table.get(name)

    specs = jax.tree_util.tree_map_with_path(pick, params)
    missing = [f"{n}/kernel" for n in names if f"{n}/kernel" not in found]
    if missing:
        raise ValueError(f"chain layers without a kernel in the params: {missing}")
    return specs


def kernel_specs(specs: Specs, spec: Spec) -> Specs:
    """``spec`` on the kernel of every layer whose output channels ``specs`` prunes.

    The layers that channel pruning prunes (a ``kernel`` with a ``Filter``
    spec, alone or in a ``Coupled`` one) get ``spec`` instead, e.g.
    :class:`~admmprune.core.sparsity.Unstructured` or
    :class:`~admmprune.core.sparsity.NofM`; everything else is not pruned:
    biases and normalization parameters, and the output layer, whose kernel
    only reads pruned channels.

    Args:
      specs: channel specs, from :func:`chain_specs` or discovery.
      spec: the spec of every pruned kernel.

    Returns:
      A spec tree shaped like ``specs``.
    """

    def pick(path, s):
        members = s.specs if isinstance(s, Coupled) else (s,)
        produces = any(isinstance(m, Filter) for m in members)
        return spec if produces and path_str(path).rpartition("/")[2] == "kernel" else None

    return jax.tree_util.tree_map_with_path(pick, specs, is_leaf=is_spec)


def group_widths(params: Params, specs: Specs, masks: Masks | None = None) -> dict[str, tuple[int, int]]:
    """``{group: (kept, total)}`` channel counts of every coupled group.

    A channel is kept when every member of its group keeps some weight of it
    (:meth:`admmprune.core.groups.ChannelGroups.alive`, which
    :func:`admmprune.structure.collapse.alive_channels` also is); without
    ``masks`` every channel is kept.
    """
    return channel_groups(specs, params).widths(masks)


__all__ = ["chain_specs", "group_widths", "kernel_specs"]
