"""Group extraction: traces ``fn``, runs the interpreter over its jaxpr and
reads every parameter's spec, the group names and the reasons off the records."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from admmprune._types import Params, path_str
from admmprune.core.sparsity import Channel, Coupled, Filter, validate
from admmprune.models.layers import reference_forms

from ._interpreter import Tracer
from ._records import BOUNDARY, UNSUPPORTED, AVal, Slot


class Found(NamedTuple):
    """What :func:`analyze` read off the records, before ``overrides`` and the group checks."""

    flat_specs: list[list[Any]]  # per tree
    group_order: list[str]
    unprunable: dict[str, tuple[str, ...]]
    unfollowed: tuple[str, ...]
    notes: tuple[str, ...]


_UNBOUND = re.compile(r"unbound axis name: ([^\s.,;:]+)")


def analyze(
    fn: Callable[..., Any],
    trees: Sequence[Params],
    args: Sequence[Any],
    masked: Callable[[str], bool],
    *,
    approximate: bool = False,
) -> Found:
    """Traces ``fn(*trees, *args)`` and reads the specs of every leaf of ``trees`` off the result.

    ``masked(path)``: is that leaf zeroed on pruned channels (a parameter that
    ADMM masks), as opposed to state that is only sliced when collapsing?
    """
    flats, paths = [], []
    for tree in trees:
        leaves_with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
        flats.append([leaf for _, leaf in leaves_with_path])
        paths.extend(path_str(p) for p, _ in leaves_with_path)
    axis_env: list[tuple[str, int]] = []
    while True:
        try:
            with reference_forms():  # the zoo layers as the lax ops the rules read
                # A new function each time: no cached trace.
                closed = jax.make_jaxpr(lambda *a: fn(*a), axis_env=axis_env)(*trees, *args)
            break
        except NameError as e:
            # A collective over a named axis (Linen BatchNorm(axis_name="batch") in training mode):
            # trace it as on one device of that axis, where it changes nothing.
            name = _UNBOUND.search(str(e))
            if name is None or name[1] in dict(axis_env):
                raise
            axis_env.append((name[1], 1))
    jaxpr = closed.jaxpr
    t = Tracer(paths, approximate=approximate)
    in_avals = []
    for i, v in enumerate(jaxpr.invars):
        shape = tuple(v.aval.shape)
        if i < len(paths):
            descs = tuple(None if n == 1 else t.new_slot(i, ax, n) for ax, n in enumerate(shape))
            in_avals.append(AVal(shape, descs, (masked(paths[i]),) * len(shape)))
        else:
            reason = f"input {i - len(paths)} of fn"
            descs = tuple(t.opaque(n, BOUNDARY, reason) for n in shape)
            in_avals.append(AVal(shape, descs, (False,) * len(shape)))
    outs = t.run(jaxpr, [t.constant(c, "constant") for c in closed.consts], in_avals)
    for k, a in enumerate(outs):
        for d in a.descs:
            t.poison(d, BOUNDARY, f"reaches output {k} of fn")

    # Every class is named after its earliest producer: program order.
    sp = t.spaces
    leaf_roots = {t.find(i) for i in range(len(sp))}
    roots = sorted(
        (r for r in leaf_roots if sp[r].children is None and sp[r].label is not None), key=lambda r: sp[r].label
    )
    names: dict[int, str] = {}
    for r in roots:
        named = sp[sp[r].label]
        base = named.base
        if named.offset != 0 or sp[r].size != named.base_size:
            base = f"{base}[{named.offset}:{named.offset + sp[r].size}]"
        name, n = base, 2
        while name in names.values():
            name, n = f"{base}#{n}", n + 1
        names[r] = name

    flat_specs: list[list[Any]] = []
    leaf = 0
    for tree_leaves in flats:
        specs = []
        for x in tree_leaves:
            shape = tuple(np.shape(x))
            members = []
            for d in in_avals[leaf].descs:
                lay = t.axes[t.sfind(d.id)].binding if isinstance(d, Slot) else None
                if lay is None:
                    continue
                pieces = t.resolve(lay.segs)
                total, offset = sum(sp[r].size for r in pieces), 0
                for r in pieces:
                    if not sp[r].poisoned and sp[r].label is not None:
                        whole = offset == 0 and sp[r].size == total
                        cls = Channel if t.axes[d.id].contracted else Filter
                        members.append(
                            cls(
                                axis=t.axes[d.id].axis - len(shape),
                                group=names[r],
                                repeat=lay.repeat,
                                offset=0 if whole else offset,
                                size=None if whole else sp[r].size,
                            )
                        )
                    offset += sp[r].size
            members.sort(key=lambda m: (m.axis, m.offset))
            spec = None if not members else members[0] if len(members) == 1 else Coupled(tuple(members))
            validate(spec, shape, paths[leaf])
            specs.append(spec)
            leaf += 1
        flat_specs.append(specs)

    entries: dict[str, list[tuple[str, str]]] = {names[r]: sp[r].reasons for r in roots if sp[r].poisoned}
    for sid, reasons in t.slot_reasons.items():
        entries.setdefault(t.slot_name(Slot(sid)), reasons)
    unprunable = {name: tuple(dict.fromkeys(text for _, text in rs)) for name, rs in entries.items()}
    # Channels that reach the inputs or outputs are not pruned anyway.
    unfollowed = tuple(
        name
        for name, rs in entries.items()
        if any(kind == UNSUPPORTED for kind, _ in rs) and not any(kind == BOUNDARY for kind, _ in rs)
    )
    notes = tuple(f"{names[r]}: {n}" for r in roots if not sp[r].poisoned for n in sp[r].notes)
    order = [names[r] for r in roots if not sp[r].poisoned]
    return Found(flat_specs, order, unprunable, unfollowed, notes)
