"""The abstract values of discovery and the union-find they point into.

An axis of a traced value is described by a :class:`Lay` (``repeat`` copies
of some channel spaces laid end to end) or a :class:`Slot` (an axis of a
parameter, not yet tied to anything). :class:`Records` keeps one
:class:`Space` per channel space and one :class:`ParamAxis` per parameter axis,
each a node of a union-find, together with the operations the primitive rules
are written in: unifying layouts, splitting spaces, marking them unprunable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

# Why a space is unprunable: it reaches the inputs or outputs of fn (never
# pruned anyway), or an operation that cannot be followed (what strict raises for).
BOUNDARY, UNSUPPORTED = "boundary", "unsupported"


class Lay(NamedTuple):
    """An axis of ``repeat * C`` entries laid out as ``repeat`` copies of the
    channels of ``segs`` (space ids) end to end."""

    repeat: int
    segs: tuple[int, ...]


class Slot(NamedTuple):
    """An axis of a parameter (or a value computed from parameters only)."""

    id: int


Desc = Lay | Slot | None  # None: a size-1 (broadcast) axis or freely shaped values


@dataclasses.dataclass(frozen=True)
class AVal:
    """The abstract value of a jaxpr variable: what each of its axes holds."""

    shape: tuple[int, ...]
    descs: tuple[Any, ...]
    zero: tuple[bool, ...]  # per axis: removed channels along it are exactly zero
    allzero: bool = False  # the whole value is zero
    value: float | None = None  # a scalar constant's value


# slots: the union-find reads these fields in its innermost loops.
@dataclasses.dataclass(slots=True, eq=False)
class Space:
    """A channel space: a node of the union-find over channels.

    ``poisoned``, ``reasons``, ``notes`` and ``label`` are only read at roots;
    ``base``, ``base_size`` and ``offset`` only at the space a root's label names.
    """

    parent: int
    size: int
    base: str | None  # the layer that produces it, if any
    base_size: int
    offset: int  # within the base layer's channels
    label: int | None  # root: the earliest named space of the class
    poisoned: bool
    reasons: list[tuple[str, str]]
    notes: list[str]
    children: tuple[int, ...] | None = None  # the sub-spaces it was split into


@dataclasses.dataclass(slots=True, eq=False)
class ParamAxis:
    """An axis of a parameter: a node of the union-find over parameter axes.

    ``binding`` is only read at roots; ``leaf``, ``axis``, ``size`` and
    ``contracted`` belong to the axis itself.
    """

    parent: int
    binding: Lay | None
    leaf: int
    axis: int
    size: int
    contracted: bool = False  # a contracted (input) axis: its specs are Channel, not Filter


def layer_name(path: str) -> str:
    """``conv1/kernel`` -> ``conv1``: a kernel's space is named after its layer."""
    return path.removesuffix("/kernel")


class Records:
    """The union-find over channel spaces and parameter axes.

    Also the two helpers every primitive rule uses (:meth:`out_shape`, and
    :meth:`unsupported`, the fallback for what cannot be followed), here
    rather than in the interpreter so that the rules need not import it.
    """

    def __init__(self, paths: Sequence[str], *, approximate: bool = False):
        self.paths = list(paths)
        # Prune channels that statistics are taken over (a note, not a refusal).
        self.approximate = approximate
        self.spaces: list[Space] = []
        self.axes: list[ParamAxis] = []
        self.slot_reasons: dict[int, list[tuple[str, str]]] = {}

    # -- spaces --

    def new_space(self, size: int, *, base: str | None = None, kind: str | None = None, reason: str = "") -> int:
        i = len(self.spaces)
        self.spaces.append(
            Space(
                parent=i,
                size=size,
                base=base,
                base_size=size,
                offset=0,
                label=i if base is not None else None,
                poisoned=kind is not None,
                reasons=[(kind, reason)] if kind is not None else [],
                notes=[],
            )
        )
        return i

    def opaque(self, size: int, kind: str, reason: str) -> Lay | None:
        """A non-channel axis: unprunable if a channel axis is ever aligned with it."""
        return None if size == 1 else Lay(1, (self.new_space(size, kind=kind, reason=reason),))

    def find(self, i: int) -> int:
        spaces = self.spaces
        root = i
        while spaces[root].parent != root:
            root = spaces[root].parent
        while spaces[i].parent != root:
            s = spaces[i]
            i, s.parent = s.parent, root
        return root

    def resolve(self, segs: Sequence[int]) -> list[int]:
        """The current leaf classes (roots that were not split) of ``segs``."""
        out: list[int] = []
        for s in segs:
            r = self.find(s)
            kids = self.spaces[r].children
            out.extend([r] if kids is None else self.resolve(kids))
        return out

    def split(self, root: int, sizes: Sequence[int]) -> None:
        spaces = self.spaces
        parent = spaces[root]
        label = parent.label
        start = 0
        kids = []
        for n in sizes:
            k = self.new_space(n)
            kid = spaces[k]
            if label is not None:
                named = spaces[label]
                kid.base = named.base
                kid.base_size = named.base_size
                kid.offset = named.offset + start
                kid.label = k
            kid.poisoned = parent.poisoned
            kid.reasons = list(parent.reasons)
            kid.notes = list(parent.notes)
            kids.append(k)
            start += n
        parent.children = tuple(kids)

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if b < a:
            a, b = b, a
        sa, sb = self.spaces[a], self.spaces[b]
        sb.parent = a
        sa.poisoned = sa.poisoned or sb.poisoned
        sa.reasons += [r for r in sb.reasons if r not in sa.reasons]
        sa.notes += [n for n in sb.notes if n not in sa.notes]
        labels = [x for x in (sa.label, sb.label) if x is not None]
        sa.label = min(labels) if labels else None

    def unify_lay(self, x: Lay, y: Lay, site: str) -> Lay:
        if x.repeat != y.repeat:
            why = f"{site} aligns channel layouts that repeat {x.repeat} and {y.repeat} times"
            self.poison(x, UNSUPPORTED, why)
            self.poison(y, UNSUPPORTED, why)
            return x
        s1, s2 = list(x.segs), list(y.segs)
        i = j = 0
        while i < len(s1) and j < len(s2):
            a, b = self.find(s1[i]), self.find(s2[j])
            sa, sb = self.spaces[a], self.spaces[b]
            if sa.children is not None:
                s1[i : i + 1] = sa.children
                continue
            if sb.children is not None:
                s2[j : j + 1] = sb.children
                continue
            na, nb = sa.size, sb.size
            if na == nb:
                self.union(a, b)
                i, j = i + 1, j + 1
            elif na < nb:
                self.split(b, (na, nb - na))
            else:
                self.split(a, (nb, na - nb))
        return x

    # -- parameter axes --

    def new_slot(self, leaf: int, axis: int, size: int) -> Slot:
        i = len(self.axes)
        self.axes.append(ParamAxis(parent=i, binding=None, leaf=leaf, axis=axis, size=size))
        return Slot(i)

    def sfind(self, i: int) -> int:
        axes = self.axes
        while axes[i].parent != i:
            node = axes[i]
            node.parent = axes[node.parent].parent
            i = node.parent
        return i

    def bind(self, slot: Slot, lay: Lay, site: str) -> None:
        root = self.axes[self.sfind(slot.id)]
        if root.binding is None:
            root.binding = lay
        else:
            self.unify_lay(root.binding, lay, site)

    def materialize(self, slot: Slot) -> Lay:
        """The slot's layout; a new space named after its layer if it has none."""
        root = self.axes[self.sfind(slot.id)]
        if root.binding is None:
            own = self.axes[slot.id]
            root.binding = Lay(1, (self.new_space(own.size, base=layer_name(self.paths[own.leaf])),))
        return root.binding

    def slot_name(self, slot: Slot) -> str:
        own = self.axes[slot.id]
        return f"{self.paths[own.leaf]}[axis {own.axis}]"

    # -- descriptors --

    def unify(self, x: Desc, y: Desc, site: str) -> Desc:
        if x is None:
            return y
        if y is None:
            return x
        if isinstance(x, Slot) and isinstance(y, Slot):
            a, b = self.sfind(x.id), self.sfind(y.id)
            if a != b:
                ra, rb = self.axes[a], self.axes[b]
                la, lb = ra.binding, rb.binding
                rb.parent = a
                ra.binding = la if lb is None else lb if la is None else self.unify_lay(la, lb, site)
            return x
        if isinstance(x, Slot):
            x, y = y, x
        if isinstance(y, Slot):
            self.bind(y, x, site)
            return x
        return self.unify_lay(x, y, site)

    def live(self, d: Desc) -> bool:
        """Could channels along this axis still be pruned?"""
        if d is None:
            return False
        if isinstance(d, Slot):
            lay = self.axes[self.sfind(d.id)].binding
            return lay is None or self.live(lay)
        return any(not self.spaces[r].poisoned for r in self.resolve(d.segs))

    def poison(self, d: Desc, kind: str, reason: str, *, report: bool = True) -> None:
        """Marks the channels along ``d`` unprunable; ``report`` a parameter axis
        that nothing else tied to channels (not for kernels' spatial axes)."""
        if d is None:
            return
        if isinstance(d, Slot):
            root = self.axes[self.sfind(d.id)]
            if root.binding is None:
                root.binding = Lay(1, (self.new_space(self.axes[d.id].size),))
                if kind == UNSUPPORTED and report:
                    self.slot_reasons.setdefault(d.id, []).append((kind, reason))
            self.poison(root.binding, kind, reason)
            return
        for r in self.resolve(d.segs):
            space = self.spaces[r]
            space.poisoned = True
            if (kind, reason) not in space.reasons:
                space.reasons.append((kind, reason))

    def note(self, d: Desc, text: str) -> None:
        if isinstance(d, Lay):
            for r in self.resolve(d.segs):
                notes = self.spaces[r].notes
                if text not in notes:
                    notes.append(text)

    def channels(self, d: Desc) -> int:
        if isinstance(d, Slot):
            return self.axes[d.id].size
        return sum(self.spaces[r].size for r in self.resolve(d.segs))

    # -- shared by the rules and the interpreter --

    def out_shape(self, eqn: Any, i: int = 0) -> tuple[int, ...]:
        return tuple(eqn.outvars[i].aval.shape)

    def unsupported(self, eqn: Any, ins: list[AVal], site: str, why: str = "") -> list[AVal]:
        """The rule for what cannot be followed: every live channel it touches is unprunable."""
        reason = why or f"unsupported primitive {site}"
        for a in ins:
            for d in a.descs:
                if self.live(d):
                    self.poison(d, UNSUPPORTED, reason)
        outs = []
        for v in eqn.outvars:
            shape = tuple(getattr(v.aval, "shape", ()))
            outs.append(AVal(shape, tuple(self.opaque(n, UNSUPPORTED, reason) for n in shape), (False,) * len(shape)))
        return outs
