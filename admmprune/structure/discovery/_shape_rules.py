"""The rules of discovery for the primitives that move, merge, slice or index
axes (``reshape``, ``transpose``, ``concatenate``, ``slice``, ``gather``, ...),
registered by name in ``SHAPE_RULES``; ``_rules`` merges them into the registry."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from ._records import UNSUPPORTED, AVal, Desc, Lay, Records, Slot


def _broadcast_in_dim(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x = ins[0]
    shape = t.out_shape(eqn)
    descs: list[Desc] = [None] * len(shape)
    zero = [x.allzero] * len(shape)
    for i, o in enumerate(eqn.params["broadcast_dimensions"]):
        if x.shape[i] == shape[o]:
            descs[o], zero[o] = x.descs[i], x.zero[i]
    return [AVal(shape, tuple(descs), tuple(zero), x.allzero, x.value)]


def _tile(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    """``jnp.tile``: an axis repeated ``reps`` times holds that many copies of
    its channels end to end (a ``Lay`` with ``repeat`` times ``reps``); a
    size-1 axis (a class token tiled over the batch) becomes a new axis."""
    x = ins[0]
    descs: list[Desc] = []
    for d, n, reps in zip(x.descs, x.shape, eqn.params["reps"], strict=True):
        if reps == 1 or d is None:
            descs.append(d)
        elif n == 1:
            descs.append(None)
        else:
            lay = t.materialize(d) if isinstance(d, Slot) else d
            descs.append(Lay(lay.repeat * reps, lay.segs))
    return [AVal(t.out_shape(eqn), tuple(descs), x.zero, x.allzero)]


def _reshape_blocks(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Groups of source and destination axes (size-1 axes left out) with equal products."""
    a = [i for i, n in enumerate(src) if n != 1]
    b = [i for i, n in enumerate(dst) if n != 1]
    blocks, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        bi, bo = [a[i]], [b[j]]
        pi, po = src[a[i]], dst[b[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po and i < len(a):
                bi.append(a[i])
                pi *= src[a[i]]
                i += 1
            elif po < pi and j < len(b):
                bo.append(b[j])
                po *= dst[b[j]]
                j += 1
            else:
                return None
        blocks.append((bi, bo))
    return blocks if i == len(a) and j == len(b) else None


def _reshape(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x = ins[0]
    shape = t.out_shape(eqn)
    blocks = _reshape_blocks(x.shape, shape)
    if eqn.params.get("dimensions") is not None or blocks is None or 0 in shape:
        return t.unsupported(eqn, ins, site)
    descs: list[Desc] = [None] * len(shape)
    zero = [x.allzero] * len(shape)
    for bi, bo in blocks:
        z = x.zero[bi[-1]]
        if len(bi) == 1 and len(bo) == 1:
            descs[bo[0]], zero[bo[0]] = x.descs[bi[0]], z
            continue
        # Merge the source axes into one: only the minor one may hold channels.
        minor = x.descs[bi[-1]]
        for a in bi[:-1]:
            if t.live(x.descs[a]):
                t.poison(
                    x.descs[a],
                    UNSUPPORTED,
                    f"{site} merges channels with the axes after them (only NHWC-style flattening, "
                    "channels last, can be followed)",
                )
        total = math.prod(x.shape[a] for a in bi)
        merged: Desc
        if isinstance(minor, Lay):
            merged = Lay(total // t.channels(minor), minor.segs)
        elif minor is None and all(x.descs[a] is None for a in bi):
            merged = None  # broadcast or random along all of them
        else:
            if isinstance(minor, Slot):
                t.poison(minor, UNSUPPORTED, f"{site} reshapes a parameter's channel axis")
            merged = t.opaque(total, UNSUPPORTED, f"an axis merged by {site}")
        if len(bo) == 1:
            descs[bo[0]], zero[bo[0]] = merged, z
            continue
        if merged is None:
            continue
        # Split it: the minor destination axis keeps whole copies of the channels.
        channels, last = t.channels(merged), shape[bo[-1]]
        if last % channels == 0 and merged.repeat % (last // channels) == 0:
            descs[bo[-1]], zero[bo[-1]] = Lay(last // channels, merged.segs), z
            for o in bo[:-1]:
                descs[o] = t.opaque(shape[o], UNSUPPORTED, f"a non-channel axis made by {site}")
        else:
            why = (
                f"{site} splits the channels into {tuple(shape[o] for o in bo)} (e.g. GroupNorm with "
                "1 < num_groups < channels): single channels cannot be removed without moving group boundaries"
            )
            if t.live(merged):
                t.poison(merged, UNSUPPORTED, why)
            for o in bo:
                descs[o] = t.opaque(shape[o], UNSUPPORTED, why)
    return [AVal(shape, tuple(descs), tuple(zero), x.allzero, x.value)]


def _transpose(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x = ins[0]
    perm = eqn.params["permutation"]
    return [AVal(t.out_shape(eqn), tuple(x.descs[p] for p in perm), tuple(x.zero[p] for p in perm), x.allzero)]


def _squeeze(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x = ins[0]
    gone = {d % len(x.shape) for d in eqn.params["dimensions"]}
    keep = [i for i in range(len(x.shape)) if i not in gone]
    return [AVal(t.out_shape(eqn), tuple(x.descs[i] for i in keep), tuple(x.zero[i] for i in keep), x.allzero)]


def _pad(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x, fill = ins
    shape = t.out_shape(eqn)
    descs = []
    for ax, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
        if (lo, hi, interior) == (0, 0, 0):
            descs.append(x.descs[ax])
            continue
        if t.live(x.descs[ax]):
            t.poison(x.descs[ax], UNSUPPORTED, f"{site} pads the channels")
        descs.append(t.opaque(shape[ax], UNSUPPORTED, f"a padded axis of {site}"))
    zero = tuple(z and fill.allzero for z in x.zero)
    return [AVal(shape, tuple(descs), zero, x.allzero and fill.allzero)]


def _rev(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x = ins[0]
    descs = list(x.descs)
    for ax in eqn.params["dimensions"]:
        if t.live(descs[ax]):
            t.poison(descs[ax], UNSUPPORTED, f"{site} reverses the order of the channels", report=False)
        descs[ax] = t.opaque(x.shape[ax], UNSUPPORTED, f"an axis reversed by {site}")
    return [AVal(x.shape, tuple(descs), x.zero, x.allzero)]


def _take(t: Records, d: Desc, start: int, stop: int, site: str) -> Desc:
    """Channels ``[start, stop)`` of an axis (stride 1), splitting spaces at the ends."""
    if d is None:
        return None
    if isinstance(d, Slot):
        t.poison(d, UNSUPPORTED, f"{site} takes part of a parameter's channel axis")
        return t.opaque(stop - start, UNSUPPORTED, f"part of a parameter taken by {site}")
    roots = t.resolve(d.segs)
    if all(t.spaces[r].poisoned for r in roots):
        return t.opaque(stop - start, UNSUPPORTED, f"a slice made by {site}")
    if d.repeat != 1:
        t.poison(d, UNSUPPORTED, f"{site} takes part of a flattened channel axis")
        return t.opaque(stop - start, UNSUPPORTED, f"a slice made by {site}")
    pieces, pos = [], 0
    for r in roots:
        n = t.spaces[r].size
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            sizes = [m for m in (lo - pos, hi - lo, pos + n - hi) if m > 0]
            if len(sizes) > 1:
                t.split(r, sizes)
                r = t.spaces[r].children[1 if lo > pos else 0]
            pieces.append(r)
        pos += n
    return Lay(1, tuple(pieces))


def _slice(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x = ins[0]
    p = eqn.params
    strides = p["strides"] or (1,) * len(x.shape)
    shape = t.out_shape(eqn)
    descs = []
    for ax, (lo, hi, s) in enumerate(zip(p["start_indices"], p["limit_indices"], strides, strict=True)):
        if (lo, hi, s) == (0, x.shape[ax], 1):
            descs.append(x.descs[ax])
        elif s == 1:
            descs.append(_take(t, x.descs[ax], lo, hi, site))
        else:
            if t.live(x.descs[ax]):
                t.poison(x.descs[ax], UNSUPPORTED, f"{site} takes every {s}th channel")
            descs.append(t.opaque(shape[ax], UNSUPPORTED, f"a strided slice made by {site}"))
    return [AVal(shape, tuple(descs), x.zero, x.allzero)]


def _split(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x = ins[0]
    ax = eqn.params["axis"] % len(x.shape)
    outs, start = [], 0
    for i, n in enumerate(eqn.params["sizes"]):
        descs = list(x.descs)
        descs[ax] = _take(t, x.descs[ax], start, start + int(n), site)
        outs.append(AVal(t.out_shape(eqn, i), tuple(descs), x.zero, x.allzero))
        start += int(n)
    return outs


def _concatenate(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    shape = t.out_shape(eqn)
    dim = eqn.params["dimension"]
    descs: list[Desc] = []
    for ax in range(len(shape)):
        if ax != dim:
            d = None
            for a in ins:
                if a.shape[ax] == shape[ax]:
                    d = t.unify(d, a.descs[ax], site)
            descs.append(d)
            continue
        segs: list[int] = []
        for a in ins:
            d = a.descs[ax]
            if isinstance(d, Slot):
                d = t.materialize(d)
            if d is None:
                d = Lay(1, (t.new_space(a.shape[ax], kind=UNSUPPORTED, reason=f"a size-1 part of {site}"),))
            if d.repeat != 1:
                t.poison(d, UNSUPPORTED, f"{site} concatenates flattened channel axes")
                d = t.opaque(a.shape[ax], UNSUPPORTED, f"part of {site}")
            segs.extend(d.segs)
        descs.append(Lay(1, tuple(segs)))
    zero = tuple(all(a.zero[ax] for a in ins) for ax in range(len(shape)))
    return [AVal(shape, tuple(descs), zero, all(a.allzero for a in ins))]


def _stack(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    """``jnp.stack``: operands of one shape along a new axis; each of their axes keeps its channels,
    the same in every operand (flax's BatchNorm stacks a mean and a mean of squares)."""
    shape, new = t.out_shape(eqn), eqn.params["axis"]
    if any(a.shape != ins[0].shape for a in ins):
        return t.unsupported(eqn, ins, site)
    descs: list[Desc] = []
    for ax in range(len(ins[0].shape)):
        d = None
        for a in ins:
            d = t.unify(d, a.descs[ax], site)
        descs.append(d)
    zero = [all(a.zero[ax] for a in ins) for ax in range(len(ins[0].shape))]
    allzero = all(a.allzero for a in ins)
    descs.insert(new, None)
    zero.insert(new, allzero)
    return [AVal(shape, tuple(descs), tuple(zero), allzero)]


def _gather(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    """Indexing along some axes: whole slices of the other axes pass through.

    Nearest-neighbour upsampling and embedding lookups gather along spatial or
    vocabulary axes and keep every channel; a gather along channels (a
    channel permutation) makes them unprunable.
    """
    x = ins[0]
    dn = eqn.params["dimension_numbers"]
    sizes = eqn.params["slice_sizes"]
    shape = t.out_shape(eqn)
    indexed = set(dn.start_index_map) | set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    kept = [a for a in range(len(x.shape)) if a not in dn.collapsed_slice_dims and a not in dn.operand_batching_dims]
    reason = f"an axis indexed by {site}"
    descs = [t.opaque(n, UNSUPPORTED, reason) for n in shape]
    zero = [False] * len(shape)
    for o, a in zip(dn.offset_dims, kept, strict=True):
        if a not in indexed and sizes[a] == x.shape[a]:
            d = x.descs[a]
            descs[o], zero[o] = (t.materialize(d) if isinstance(d, Slot) else d), x.zero[a]
        else:
            indexed.add(a)
    for a in indexed:
        if t.live(x.descs[a]):
            t.poison(x.descs[a], UNSUPPORTED, f"{site} selects entries along the channels", report=False)
    return [AVal(shape, tuple(descs), tuple(zero))]


def _dynamic_slice(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x = ins[0]
    shape = t.out_shape(eqn)
    descs = []
    for a, n in enumerate(shape):
        if n == x.shape[a]:
            descs.append(x.descs[a])
            continue
        if t.live(x.descs[a]):
            t.poison(x.descs[a], UNSUPPORTED, f"{site} takes part of the channels")
        descs.append(t.opaque(n, UNSUPPORTED, f"an axis sliced by {site}"))
    return [AVal(shape, tuple(descs), x.zero, x.allzero)]


SHAPE_RULES: dict[str, Callable[..., list[AVal]]] = {
    "stack": _stack,
    "broadcast_in_dim": _broadcast_in_dim,
    "tile": _tile,
    "reshape": _reshape,
    "transpose": _transpose,
    "squeeze": _squeeze,
    "pad": _pad,
    "rev": _rev,
    "slice": _slice,
    "split": _split,
    "concatenate": _concatenate,
    "gather": _gather,
    "dynamic_slice": _dynamic_slice,
}
