"""Channel groups discovered from the traced program (layer L3).

Structured pruning must remove a channel from everything that produces it or
reads it: the producing kernel's output slice, its bias, the normalization
parameters and statistics acting on it, every branch added to it by a residual
connection, and the input rows of every layer that consumes it. Torch-Pruning
finds these sets by walking the autograd graph; in JAX the graph is the jaxpr
of the model's pure apply function. :func:`discover` traces ``fn(params,
*args)`` with :func:`jax.make_jaxpr` and follows every axis through every
equation, then returns a spec tree (:class:`admmprune.core.sparsity.Filter`,
:class:`~admmprune.core.sparsity.Channel`, :class:`~admmprune.core.sparsity.Coupled`)
that :func:`admmprune.core.projections.project_tree`, :func:`admmprune.core.admm.admm` and
:func:`admmprune.hard_prune` use unchanged.

How it works: an abstract interpretation of the jaxpr. Every axis of every
value carries a *layout*: ``repeat`` and a list of *channel spaces* (the axis
holds ``repeat`` copies of the spaces' channels laid end to end, the view of
:class:`~admmprune.core.sparsity.Filter`'s ``repeat``, ``offset`` and ``size``).
A dense or conv kernel whose output axis is not yet tied to anything creates
a new space, named after the layer (``conv1`` for ``conv1/kernel``). Every
parameter axis is a variable that gets bound to the layout it meets; equations
that align two axes (elementwise ops, bias adds, residual additions, the
contracted axes of ``dot_general``/``conv_general_dilated``) unify their
layouts with union-find. Concatenation along channels lays spaces end to end;
slicing and mismatched boundaries split spaces into sub-spaces. A space is
*unprunable* when it meets something whose channels cannot be removed with
it: the inputs or outputs of ``fn``, a constant, a non-channel (spatial) axis,
or an operation that cannot be followed. Unprunable spaces give no specs.

Each axis also carries a flag "the removed channels are exactly zero here",
used where channels are summed without a pruned parameter: a contraction of
two activations (attention scores) or a ``reduce_sum`` over channels is only
exact when the removed channels are zero on one side, which holds through
zero-preserving ops (``relu``, ``x * sigmoid(x)``, a pruned bias or
normalization scale) but not through, e.g., ``x + 1`` or ``sigmoid(x)``.

What each operation does:

* ``conv_general_dilated`` (also ``nnx.ConvTranspose``, which lowers to it
  with ``lhs_dilation``) and ``dot_general``: the contracted axes are tied
  (the kernel's input axis joins the producer's group as a ``Channel``); the
  kernel's free axis is a new group unless already bound (weight tying).
  Depthwise convs (``feature_group_count == C_in == C_out``) tie input and
  output channels, so the depthwise kernel joins its input's group. Other
  grouped convs, and depthwise with a channel multiplier, are unprunable.
* elementwise ops (``add``, ``mul``, activations, ``select_n``, ...): all
  operands' axes are tied, which merges residual branches and puts biases and
  normalization parameters in the group: BatchNorm ``scale``/``bias``,
  LayerNorm and GroupNorm ``scale``/``bias``, and BatchNorm's running
  ``mean``/``var`` when they are traced as inputs (:func:`discover_nnx`
  traces the non-``Param`` state and returns it as ``state_specs``; a Linen
  variables dict is traced whole). Statistics captured as constants make
  their channels unprunable, with a reason saying so.
* ``reshape``: flattening an NHWC map gives ``repeat = H * W``; splitting the
  channels (GroupNorm with ``1 < num_groups < C``, NCHW flattening) makes
  them unprunable, because single channels cannot be removed without moving
  group boundaries.
* ``concatenate`` along channels: the spaces are laid end to end, and the
  consumer gets one ``Channel`` per branch with ``offset``/``size``;
  ``slice``/``split`` of channels split the space.
* reductions, pooling, ``transpose``, ``broadcast_in_dim``, ``squeeze``,
  ``pad``: follow the axes; a reduction over channels other than an exact
  ``reduce_sum`` makes them unprunable, and an exact ``reduce_sum`` over
  channels (LayerNorm statistics) is reported in :attr:`Discovery.notes`,
  because statistics over channels change when the model is collapsed.
* ``gather`` and ``dynamic_slice`` along other axes (nearest upsampling,
  embedding lookups) keep the channels; along channels (a permutation) they
  make them unprunable.
* calls (``jit``/``pjit``, ``closed_call``, ``custom_jvp_call``,
  ``custom_vjp_call``, ``remat``) and ``cond`` are followed inside; random
  bits take the shape of what they are combined with.
* the inputs and outputs of ``fn``: their channels are never pruned (the
  output layer's units, and the input rows of the first layer).
* anything else (``scatter``, ``scan``, ``while``, sorting, ...): every
  channel it touches is unprunable, and the reason names the primitive and
  the user's source line (:attr:`Discovery.unprunable`,
  :attr:`Discovery.unfollowed`, logged by :func:`discover_specs`). With
  ``strict=True`` this raises :class:`DiscoveryError` instead. No operation
  is ever assumed to pass channels through without a rule that says so.

Shape-changing analysis runs on the host, outside ``jit``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from admmprune._types import Params, Specs, path_str
from admmprune.core.projections import coupled_groups, num_groups
from admmprune.core.sparsity import Channel, Coupled, Filter, is_spec, validate

log = logging.getLogger(__name__)


class DiscoveryError(ValueError):
    """Raised by ``strict`` discovery when an operation cannot be followed."""


@dataclasses.dataclass(frozen=True)
class Group:
    """One discovered channel group.

    Attributes:
      channels: how many channels the group has (top-k is taken over these).
      members: ``(parameter path, spec)`` for every parameter in the group.
    """

    channels: int
    members: tuple[tuple[str, Any], ...]


@dataclasses.dataclass(frozen=True)
class Discovery:
    """What :func:`discover` found.

    Attributes:
      specs: a spec tree shaped like ``params`` (``None`` = not pruned), for
        :func:`admmprune.core.projections.project_tree`, ADMM and hard pruning.
      state_specs: from :func:`discover_nnx` only: a spec tree shaped like the
        model's non-``Param`` state (BatchNorm running ``mean``/``var``), in
        the same groups, for physically removing pruned channels; ``None``
        from :func:`discover`, where everything traced is in ``params``.
      groups: ``{group name: Group}`` in program order, over ``specs`` and
        ``state_specs`` together.
      unprunable: ``{name: reasons}`` for every layer output whose channels
        cannot be pruned (the output layer, anything tied to the input, or an
        operation that cannot be followed), and for every parameter axis an
        unsupported operation touched (``"path[axis i]"``).
      unfollowed: the names in ``unprunable`` because of an operation that
        cannot be followed, rather than because they reach the inputs or
        outputs of ``fn`` (what ``strict`` raises for).
      notes: operations that are followed but after which the pruned model
        is not exactly its collapsed copy (statistics over channels).
    """

    specs: Specs
    state_specs: Specs | None
    groups: Mapping[str, Group]
    unprunable: Mapping[str, tuple[str, ...]]
    unfollowed: tuple[str, ...]
    notes: tuple[str, ...]

    def report(self) -> str:
        """A readable summary: groups with their members, what is not pruned, notes."""
        lines = [f"{len(self.groups)} channel groups:"]
        for name, group in self.groups.items():
            lines.append(f"  {name} ({group.channels} channels): " + ", ".join(p for p, _ in group.members))
        if self.unprunable:
            lines.append("not pruned:")
            for name, reasons in self.unprunable.items():
                lines.append(f"  {name}: " + "; ".join(reasons))
        if self.notes:
            lines.append("notes:")
            lines.extend(f"  {n}" for n in self.notes)
        return "\n".join(lines)


# --- abstract values ---------------------------------------------------------


class _Lay(NamedTuple):
    """An axis of ``repeat * C`` entries laid out as ``repeat`` copies of the
    channels of ``segs`` (space ids) end to end."""

    repeat: int
    segs: tuple[int, ...]


class _Slot(NamedTuple):
    """An axis of a parameter (or a value computed from parameters only)."""

    id: int


Desc = _Lay | _Slot | None  # None: a size-1 (broadcast) axis or freely shaped values


@dataclasses.dataclass(frozen=True)
class _AVal:
    shape: tuple[int, ...]
    descs: tuple[Any, ...]
    zero: tuple[bool, ...]  # per axis: removed channels along it are exactly zero
    allzero: bool = False  # the whole value is zero
    value: float | None = None  # a scalar constant's value


_BOUNDARY, _UNSUPPORTED = "boundary", "unsupported"

_CALLS = {
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
    "remat",
    "remat2",
    "checkpoint",
}
# Elementwise ops, by what they do to an operand whose removed channels are zero.
_ZERO_UNARY = {
    "neg", "abs", "sign", "floor", "ceil", "round", "sqrt", "cbrt", "square", "sin", "tan", "tanh", "asin",
    "atan", "sinh", "asinh", "atanh", "expm1", "log1p", "erf", "erf_inv", "real", "imag", "conj",
    "convert_element_type", "reduce_precision", "copy", "copy_p", "population_count", "stop_gradient",
}  # fmt: skip
_OTHER_UNARY = {
    "exp", "exp2", "log", "logistic", "cos", "acos", "cosh", "acosh", "rsqrt", "erfc", "lgamma", "digamma",
    "is_finite", "not", "clz", "bessel_i0e", "bessel_i1e",
}  # fmt: skip
_ALL_ZERO = {"add", "sub", "add_any"}  # zero if every operand is
_ANY_ZERO = {"mul", "and"}  # zero if one operand is
_FIRST_ZERO = {"div", "rem", "shift_left", "shift_right_logical", "shift_right_arithmetic"}
_NO_ZERO = {"atan2", "nextafter", "or", "xor", "eq", "ne", "lt", "le", "gt", "ge", "complex"}
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "reduce_xor"}
_ARG_REDUCE = {"argmax", "argmin"}
_CUMULATIVE = {"cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp"}
_WINDOW = {"reduce_window_sum", "reduce_window_max", "reduce_window_min"}
_RANDOM = {
    "random_seed", "random_bits", "random_split", "random_fold_in", "random_wrap", "random_unwrap",
    "threefry2x32", "rng_bit_generator", "rng_uniform",
}  # fmt: skip


def _where(eqn: Any) -> str:
    """The user's source line of an equation, or ``""``."""
    try:
        from jax._src import source_info_util  # private, only used for messages

        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - a message without a location is still a message
        return ""


def _layer_name(path: str) -> str:
    """``conv1/kernel`` -> ``conv1``: a kernel's space is named after its layer."""
    return path.removesuffix("/kernel")


class _Tracer:
    """The union-find state and the per-primitive rules."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        # Channel spaces. Root-level fields are only read at roots.
        self.parent: list[int] = []
        self.size: list[int] = []
        self.children: list[tuple[int, ...] | None] = []
        self.base: list[str | None] = []  # the layer that produces it, if any
        self.base_size: list[int] = []
        self.offset: list[int] = []  # within the base layer's channels
        self.label: list[int | None] = []  # root: the earliest named space of the class
        self.poisoned: list[bool] = []
        self.reasons: list[list[tuple[str, str]]] = []
        self.notes: list[list[str]] = []
        # Parameter axes.
        self.slot_parent: list[int] = []
        self.slot_binding: list[_Lay | None] = []
        self.slot_owner: list[tuple[int, int, int]] = []  # (leaf, axis, size)
        self.contracted: list[bool] = []
        self.slot_reasons: dict[int, list[tuple[str, str]]] = {}
        self.where: list[str] = []  # source lines of the calls being followed

    # -- spaces --

    def new_space(self, size: int, *, base: str | None = None, kind: str | None = None, reason: str = "") -> int:
        i = len(self.parent)
        self.parent.append(i)
        self.size.append(size)
        self.children.append(None)
        self.base.append(base)
        self.base_size.append(size)
        self.offset.append(0)
        self.label.append(i if base is not None else None)
        self.poisoned.append(kind is not None)
        self.reasons.append([(kind, reason)] if kind is not None else [])
        self.notes.append([])
        return i

    def opaque(self, size: int, kind: str, reason: str) -> _Lay | None:
        """A non-channel axis: unprunable if a channel axis is ever aligned with it."""
        return None if size == 1 else _Lay(1, (self.new_space(size, kind=kind, reason=reason),))

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def resolve(self, segs: Sequence[int]) -> list[int]:
        """The current leaf classes (roots that were not split) of ``segs``."""
        out: list[int] = []
        for s in segs:
            r = self.find(s)
            kids = self.children[r]
            out.extend([r] if kids is None else self.resolve(kids))
        return out

    def split(self, root: int, sizes: Sequence[int]) -> None:
        label = self.label[root]
        start = 0
        kids = []
        for n in sizes:
            k = self.new_space(n)
            if label is not None:
                self.base[k] = self.base[label]
                self.base_size[k] = self.base_size[label]
                self.offset[k] = self.offset[label] + start
                self.label[k] = k
            self.poisoned[k] = self.poisoned[root]
            self.reasons[k] = list(self.reasons[root])
            self.notes[k] = list(self.notes[root])
            kids.append(k)
            start += n
        self.children[root] = tuple(kids)

    def union(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        if b < a:
            a, b = b, a
        self.parent[b] = a
        self.poisoned[a] = self.poisoned[a] or self.poisoned[b]
        self.reasons[a] += [r for r in self.reasons[b] if r not in self.reasons[a]]
        self.notes[a] += [n for n in self.notes[b] if n not in self.notes[a]]
        labels = [x for x in (self.label[a], self.label[b]) if x is not None]
        self.label[a] = min(labels) if labels else None

    def unify_lay(self, x: _Lay, y: _Lay, site: str) -> _Lay:
        if x.repeat != y.repeat:
            why = f"{site} aligns channel layouts that repeat {x.repeat} and {y.repeat} times"
            self.poison(x, _UNSUPPORTED, why)
            self.poison(y, _UNSUPPORTED, why)
            return x
        s1, s2 = list(x.segs), list(y.segs)
        i = j = 0
        while i < len(s1) and j < len(s2):
            a, b = self.find(s1[i]), self.find(s2[j])
            if self.children[a] is not None:
                s1[i : i + 1] = self.children[a]
                continue
            if self.children[b] is not None:
                s2[j : j + 1] = self.children[b]
                continue
            na, nb = self.size[a], self.size[b]
            if na == nb:
                self.union(a, b)
                i, j = i + 1, j + 1
            elif na < nb:
                self.split(b, (na, nb - na))
            else:
                self.split(a, (nb, na - nb))
        return x

    # -- parameter axes --

    def new_slot(self, leaf: int, axis: int, size: int) -> _Slot:
        i = len(self.slot_parent)
        self.slot_parent.append(i)
        self.slot_binding.append(None)
        self.slot_owner.append((leaf, axis, size))
        self.contracted.append(False)
        return _Slot(i)

    def sfind(self, i: int) -> int:
        while self.slot_parent[i] != i:
            self.slot_parent[i] = self.slot_parent[self.slot_parent[i]]
            i = self.slot_parent[i]
        return i

    def bind(self, slot: _Slot, lay: _Lay, site: str) -> None:
        r = self.sfind(slot.id)
        if self.slot_binding[r] is None:
            self.slot_binding[r] = lay
        else:
            self.unify_lay(self.slot_binding[r], lay, site)

    def materialize(self, slot: _Slot) -> _Lay:
        """The slot's layout; a new space named after its layer if it has none."""
        r = self.sfind(slot.id)
        if self.slot_binding[r] is None:
            leaf, _, size = self.slot_owner[slot.id]
            self.slot_binding[r] = _Lay(1, (self.new_space(size, base=_layer_name(self.paths[leaf])),))
        return self.slot_binding[r]

    def slot_name(self, slot: _Slot) -> str:
        leaf, axis, _ = self.slot_owner[slot.id]
        return f"{self.paths[leaf]}[axis {axis}]"

    # -- descriptors --

    def unify(self, x: Desc, y: Desc, site: str) -> Desc:
        if x is None:
            return y
        if y is None:
            return x
        if isinstance(x, _Slot) and isinstance(y, _Slot):
            a, b = self.sfind(x.id), self.sfind(y.id)
            if a != b:
                la, lb = self.slot_binding[a], self.slot_binding[b]
                self.slot_parent[b] = a
                self.slot_binding[a] = la if lb is None else lb if la is None else self.unify_lay(la, lb, site)
            return x
        if isinstance(x, _Slot):
            x, y = y, x
        if isinstance(y, _Slot):
            self.bind(y, x, site)
            return x
        return self.unify_lay(x, y, site)

    def live(self, d: Desc) -> bool:
        """Could channels along this axis still be pruned?"""
        if d is None:
            return False
        if isinstance(d, _Slot):
            lay = self.slot_binding[self.sfind(d.id)]
            return lay is None or self.live(lay)
        return any(not self.poisoned[r] for r in self.resolve(d.segs))

    def poison(self, d: Desc, kind: str, reason: str, *, report: bool = True) -> None:
        """Marks the channels along ``d`` unprunable; ``report`` a parameter axis
        that nothing else tied to channels (not for kernels' spatial axes)."""
        if d is None:
            return
        if isinstance(d, _Slot):
            r = self.sfind(d.id)
            if self.slot_binding[r] is None:
                size = self.slot_owner[d.id][2]
                self.slot_binding[r] = _Lay(1, (self.new_space(size),))
                if kind == _UNSUPPORTED and report:
                    self.slot_reasons.setdefault(d.id, []).append((kind, reason))
            self.poison(self.slot_binding[r], kind, reason)
            return
        for r in self.resolve(d.segs):
            self.poisoned[r] = True
            if (kind, reason) not in self.reasons[r]:
                self.reasons[r].append((kind, reason))

    def note(self, d: Desc, text: str) -> None:
        if isinstance(d, _Lay):
            for r in self.resolve(d.segs):
                if text not in self.notes[r]:
                    self.notes[r].append(text)

    def channels(self, d: Desc) -> int:
        if isinstance(d, _Slot):
            return self.slot_owner[d.id][2]
        return sum(self.size[r] for r in self.resolve(d.segs))

    # -- the interpreter --

    def run(self, jaxpr: Any, consts: Sequence[_AVal], args: Sequence[_AVal]) -> list[_AVal]:
        env: dict[Any, _AVal] = {}
        for v, a in itertools.chain(zip(jaxpr.constvars, consts), zip(jaxpr.invars, args)):
            env[v] = a
        for eqn in jaxpr.eqns:
            ins = [self.read(env, v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, a in zip(eqn.outvars, outs, strict=True):
                env[v] = a
        return [self.read(env, v) for v in jaxpr.outvars]

    def read(self, env: dict, v: Any) -> _AVal:
        if hasattr(v, "val"):  # a Literal
            return self.constant(v.val, "literal")
        return env[v]

    def constant(self, val: Any, what: str) -> _AVal:
        shape = tuple(np.shape(val))
        try:
            arr = np.asarray(val)
            allzero = arr.size <= 1 << 16 and arr.dtype.kind in "biuf" and not np.any(arr)
            value = float(arr) if arr.shape == () and arr.dtype.kind in "biuf" else None
        except Exception:  # noqa: BLE001 - e.g. typed PRNG keys: nothing to know
            allzero, value = False, None
        reason = (
            f"a {what} of shape {shape} acts on them (e.g. a variable captured by fn instead of passed in "
            "params: pass it as a parameter, or use discover_nnx, to prune through it)"
        )
        descs = tuple(self.opaque(n, _UNSUPPORTED, reason) for n in shape)
        return _AVal(shape, descs, (allzero,) * len(shape), allzero, value)

    def eqn(self, eqn: Any, ins: list[_AVal]) -> list[_AVal]:
        name = eqn.primitive.name
        # Inside library functions (jnp.sort is a jit) the user's line is the call's.
        where = _where(eqn) or (self.where[-1] if self.where else "?")
        site = f"`{name}` at {where}"
        if name in _CALLS or name == "cond":
            self.where.append(where)
            try:
                return self.call(eqn, ins, site) if name in _CALLS else self.cond(eqn, ins, site)
            finally:
                self.where.pop()
        rule = _RULES.get(name)
        if rule is None:
            for group, fn in _GROUP_RULES:
                if name in group:
                    rule = fn
                    break
        if rule is None:
            return self.unsupported(eqn, ins, site)
        return rule(self, eqn, ins, site)

    def out_shape(self, eqn: Any, i: int = 0) -> tuple[int, ...]:
        return tuple(eqn.outvars[i].aval.shape)

    def unsupported(self, eqn: Any, ins: list[_AVal], site: str, why: str = "") -> list[_AVal]:
        reason = why or f"unsupported primitive {site}"
        for a in ins:
            for d in a.descs:
                if self.live(d):
                    self.poison(d, _UNSUPPORTED, reason)
        outs = []
        for v in eqn.outvars:
            shape = tuple(getattr(v.aval, "shape", ()))
            outs.append(_AVal(shape, tuple(self.opaque(n, _UNSUPPORTED, reason) for n in shape), (False,) * len(shape)))
        return outs

    def call(self, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
        p = eqn.params
        sub = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
        if sub is None:
            return self.unsupported(eqn, ins, site)
        jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())
        if len(jaxpr.invars) != len(ins) or len(jaxpr.outvars) != len(eqn.outvars):
            return self.unsupported(eqn, ins, site)
        return self.run(jaxpr, [self.constant(c, "constant") for c in consts], ins)

    def cond(self, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
        results = [
            self.run(b.jaxpr, [self.constant(c, "constant") for c in b.consts], ins[1:]) for b in eqn.params["branches"]
        ]
        outs = []
        for per_branch in zip(*results, strict=True):
            shape = per_branch[0].shape
            descs = []
            for ax in range(len(shape)):
                d = None
                for a in per_branch:
                    d = self.unify(d, a.descs[ax], site)
                descs.append(d)
            zero = tuple(all(a.zero[ax] for a in per_branch) for ax in range(len(shape)))
            outs.append(_AVal(shape, tuple(descs), zero, all(a.allzero for a in per_branch)))
        return outs


# --- rules ---------------------------------------------------------------------


def _z(a: _AVal, ax: int, nd: int) -> bool:
    return a.zero[ax] if len(a.shape) == nd else a.allzero


def _absorbs(a: _AVal, sign: int) -> bool:
    """``max(0, a) == 0`` (``sign=1``) or ``min(0, a) == 0`` (``sign=-1``)."""
    return a.allzero or (a.value is not None and sign * a.value <= 0)


def _elementwise(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    name = eqn.primitive.name
    shape = t.out_shape(eqn)
    nd = len(shape)
    if any(len(a.shape) not in (0, nd) for a in ins) or len(eqn.outvars) != 1:
        return t.unsupported(eqn, ins, site)
    descs = []
    for ax in range(nd):
        d = None
        for a in ins:
            if len(a.shape) == nd and a.shape[ax] == shape[ax]:
                d = t.unify(d, a.descs[ax], site)
        descs.append(d)
    data = ins
    if name == "select_n":
        data = ins[1:]
    elif name == "clamp":
        data = ins[1:2]
    zero = []
    for ax in range(nd):
        zs = [_z(a, ax, nd) for a in data]
        if name in _ZERO_UNARY or name in _FIRST_ZERO:
            z = zs[0]
        elif name in _ALL_ZERO or name == "select_n":
            z = all(zs)
        elif name in _ANY_ZERO:
            z = any(zs)
        elif name in ("max", "min"):
            sign = 1 if name == "max" else -1
            z = (zs[0] and (zs[1] or _absorbs(ins[1], sign))) or (zs[1] and _absorbs(ins[0], sign))
        elif name == "clamp":
            lo, hi = ins[0], ins[2]
            z = zs[0] and _absorbs(lo, 1) and _absorbs(hi, -1)
        elif name == "integer_pow":
            z = zs[0] and eqn.params["y"] > 0
        elif name == "pow":
            z = zs[0] and ins[1].value is not None and ins[1].value > 0
        else:
            z = False
        zero.append(z)
    if name in _ANY_ZERO:
        allzero = any(a.allzero for a in data)
    elif name in _ALL_ZERO or name == "select_n":
        allzero = all(a.allzero for a in data)
    elif name in _ZERO_UNARY or name in _FIRST_ZERO:
        allzero = data[0].allzero
    else:
        allzero = False
    return [_AVal(shape, tuple(descs), tuple(zero), allzero)]


def _passthrough(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    """One output per input, unchanged (``optimization_barrier``, ``device_put``)."""
    if len(ins) != len(eqn.outvars):
        return t.unsupported(eqn, ins, site)
    return list(ins)


def _free(t: _Tracer, a: _AVal, ax: int) -> Desc:
    """A kernel's output axis: its parameter's space, created on first use."""
    d = a.descs[ax]
    return t.materialize(d) if isinstance(d, _Slot) else d


def _contract(t: _Tracer, x: _AVal, ax: int, y: _AVal, ay: int, site: str) -> None:
    for a, i in ((x, ax), (y, ay)):
        if isinstance(a.descs[i], _Slot):
            t.contracted[a.descs[i].id] = True
    dx = x.descs[ax]
    if isinstance(dx, _Slot) and isinstance(y.descs[ay], _Slot):
        dx = t.materialize(dx)  # the inner dimension of a product of parameters (low rank)
    d = t.unify(dx, y.descs[ay], site)
    if t.live(d) and not (x.zero[ax] or y.zero[ay]):
        t.poison(
            d,
            _UNSUPPORTED,
            f"{site} sums over channels whose pruned entries are not zero on either side "
            "(e.g. a product of two activations after a non-zero-preserving op)",
        )


def _dot_general(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x, y = ins
    (xc, yc), (xb, yb) = eqn.params["dimension_numbers"]
    for a, b in zip(xc, yc):
        _contract(t, x, a, y, b, site)
    descs, zero = [], []
    for a, b in zip(xb, yb):
        descs.append(t.unify(x.descs[a], y.descs[b], site))
        zero.append(x.zero[a] or y.zero[b])
    for a in range(len(x.shape)):
        if a not in xc and a not in xb:
            descs.append(_free(t, x, a))
            zero.append(x.zero[a] or y.allzero)
    for b in range(len(y.shape)):
        if b not in yc and b not in yb:
            descs.append(_free(t, y, b))
            zero.append(y.zero[b] or x.allzero)
    return [_AVal(t.out_shape(eqn), tuple(descs), tuple(zero), x.allzero or y.allzero)]


def _conv(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x, k = ins
    p = eqn.params
    lhs, rhs, out = p["dimension_numbers"]
    shape = t.out_shape(eqn)
    if p["batch_group_count"] != 1:
        return t.unsupported(eqn, ins, site)
    descs: list[Desc] = [None] * len(shape)
    zero = [False] * len(shape)
    descs[out[0]], zero[out[0]] = x.descs[lhs[0]], x.zero[lhs[0]] or k.allzero
    for o in out[2:]:
        descs[o] = t.opaque(shape[o], _UNSUPPORTED, f"a spatial axis of {site}")
    groups = p["feature_group_count"]
    c_in, c_out, per_group = x.shape[lhs[1]], k.shape[rhs[0]], k.shape[rhs[1]]
    f = out[1]
    if groups == 1:
        _contract(t, x, lhs[1], k, rhs[1], site)
        descs[f], zero[f] = _free(t, k, rhs[0]), k.zero[rhs[0]] or x.allzero
    elif per_group == 1 and c_out == c_in:
        # Depthwise: output channel c reads input channel c only.
        descs[f] = t.unify(x.descs[lhs[1]], k.descs[rhs[0]], site)
        zero[f] = x.zero[lhs[1]] or k.zero[rhs[0]]
    else:
        why = (
            f"{site} is a grouped convolution (feature_group_count={groups}, {per_group} input and "
            f"{c_out // groups} output channels per group): single channels cannot be removed"
        )
        for d in (x.descs[lhs[1]], k.descs[rhs[1]], k.descs[rhs[0]]):
            t.poison(d, _UNSUPPORTED, why)
        descs[f] = t.opaque(shape[f], _UNSUPPORTED, why)
    return [_AVal(shape, tuple(descs), tuple(zero), x.allzero or k.allzero)]


def _broadcast_in_dim(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x = ins[0]
    shape = t.out_shape(eqn)
    descs: list[Desc] = [None] * len(shape)
    zero = [x.allzero] * len(shape)
    for i, o in enumerate(eqn.params["broadcast_dimensions"]):
        if x.shape[i] == shape[o]:
            descs[o], zero[o] = x.descs[i], x.zero[i]
    return [_AVal(shape, tuple(descs), tuple(zero), x.allzero, x.value)]


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


def _reshape(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
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
                    _UNSUPPORTED,
                    f"{site} merges channels with the axes after them (only NHWC-style flattening, "
                    "channels last, can be followed)",
                )
        total = math.prod(x.shape[a] for a in bi)
        merged: Desc
        if isinstance(minor, _Lay):
            merged = _Lay(total // t.channels(minor), minor.segs)
        elif minor is None and all(x.descs[a] is None for a in bi):
            merged = None  # broadcast or random along all of them
        else:
            if isinstance(minor, _Slot):
                t.poison(minor, _UNSUPPORTED, f"{site} reshapes a parameter's channel axis")
            merged = t.opaque(total, _UNSUPPORTED, f"an axis merged by {site}")
        if len(bo) == 1:
            descs[bo[0]], zero[bo[0]] = merged, z
            continue
        if merged is None:
            continue
        # Split it: the minor destination axis keeps whole copies of the channels.
        channels, last = t.channels(merged), shape[bo[-1]]
        if last % channels == 0 and merged.repeat % (last // channels) == 0:
            descs[bo[-1]], zero[bo[-1]] = _Lay(last // channels, merged.segs), z
            for o in bo[:-1]:
                descs[o] = t.opaque(shape[o], _UNSUPPORTED, f"a non-channel axis made by {site}")
        else:
            why = (
                f"{site} splits the channels into {tuple(shape[o] for o in bo)} (e.g. GroupNorm with "
                "1 < num_groups < channels): single channels cannot be removed without moving group boundaries"
            )
            if t.live(merged):
                t.poison(merged, _UNSUPPORTED, why)
            for o in bo:
                descs[o] = t.opaque(shape[o], _UNSUPPORTED, why)
    return [_AVal(shape, tuple(descs), tuple(zero), x.allzero, x.value)]


def _transpose(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x = ins[0]
    perm = eqn.params["permutation"]
    return [_AVal(t.out_shape(eqn), tuple(x.descs[p] for p in perm), tuple(x.zero[p] for p in perm), x.allzero)]


def _squeeze(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x = ins[0]
    gone = {d % len(x.shape) for d in eqn.params["dimensions"]}
    keep = [i for i in range(len(x.shape)) if i not in gone]
    return [_AVal(t.out_shape(eqn), tuple(x.descs[i] for i in keep), tuple(x.zero[i] for i in keep), x.allzero)]


def _reduce(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x = ins[0]
    name = eqn.primitive.name
    axes = {a % len(x.shape) for a in eqn.params["axes"]}
    for a in axes:
        d = x.descs[a]
        if not t.live(d):
            continue
        if name == "reduce_sum" and x.zero[a]:
            t.note(
                d,
                f"{site} sums over the channels (e.g. LayerNorm statistics): after collapsing, "
                "means over them are taken over the kept channels only",
            )
        else:
            t.poison(d, _UNSUPPORTED, f"{site} reduces over the channels")
    keep = [i for i in range(len(x.shape)) if i not in axes]
    zeros = name in _REDUCE
    return [
        _AVal(
            t.out_shape(eqn),
            tuple(x.descs[i] for i in keep),
            tuple(zeros and x.zero[i] for i in keep),
            zeros and x.allzero,
        )
    ]


def _cumulative(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x = ins[0]
    ax = eqn.params["axis"] % len(x.shape)
    descs = list(x.descs)
    if t.live(descs[ax]):
        t.poison(descs[ax], _UNSUPPORTED, f"{site} accumulates along the channels")
    descs[ax] = t.opaque(x.shape[ax], _UNSUPPORTED, f"an axis accumulated by {site}")
    return [_AVal(x.shape, tuple(descs), (False,) * len(x.shape))]


def _window(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x = ins[0]
    p = eqn.params
    shape = t.out_shape(eqn)
    descs = []
    for ax in range(len(x.shape)):
        trivial = (
            p["window_dimensions"][ax] == 1
            and p["window_strides"][ax] == 1
            and tuple(p["padding"][ax]) == (0, 0)
            and p["base_dilation"][ax] == 1
            and p["window_dilation"][ax] == 1
        )
        if trivial:
            descs.append(x.descs[ax])
            continue
        if t.live(x.descs[ax]):
            t.poison(x.descs[ax], _UNSUPPORTED, f"{site} pools over the channels")
        descs.append(t.opaque(shape[ax], _UNSUPPORTED, f"a pooled axis of {site}"))
    return [_AVal(shape, tuple(descs), x.zero, x.allzero)]


def _pad(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x, fill = ins
    shape = t.out_shape(eqn)
    descs = []
    for ax, (lo, hi, interior) in enumerate(eqn.params["padding_config"]):
        if (lo, hi, interior) == (0, 0, 0):
            descs.append(x.descs[ax])
            continue
        if t.live(x.descs[ax]):
            t.poison(x.descs[ax], _UNSUPPORTED, f"{site} pads the channels")
        descs.append(t.opaque(shape[ax], _UNSUPPORTED, f"a padded axis of {site}"))
    zero = tuple(z and fill.allzero for z in x.zero)
    return [_AVal(shape, tuple(descs), zero, x.allzero and fill.allzero)]


def _rev(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x = ins[0]
    descs = list(x.descs)
    for ax in eqn.params["dimensions"]:
        if t.live(descs[ax]):
            t.poison(descs[ax], _UNSUPPORTED, f"{site} reverses the order of the channels", report=False)
        descs[ax] = t.opaque(x.shape[ax], _UNSUPPORTED, f"an axis reversed by {site}")
    return [_AVal(x.shape, tuple(descs), x.zero, x.allzero)]


def _take(t: _Tracer, d: Desc, start: int, stop: int, site: str) -> Desc:
    """Channels ``[start, stop)`` of an axis (stride 1), splitting spaces at the ends."""
    if d is None:
        return None
    if isinstance(d, _Slot):
        t.poison(d, _UNSUPPORTED, f"{site} takes part of a parameter's channel axis")
        return t.opaque(stop - start, _UNSUPPORTED, f"part of a parameter taken by {site}")
    roots = t.resolve(d.segs)
    if all(t.poisoned[r] for r in roots):
        return t.opaque(stop - start, _UNSUPPORTED, f"a slice made by {site}")
    if d.repeat != 1:
        t.poison(d, _UNSUPPORTED, f"{site} takes part of a flattened channel axis")
        return t.opaque(stop - start, _UNSUPPORTED, f"a slice made by {site}")
    pieces, pos = [], 0
    for r in roots:
        n = t.size[r]
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            sizes = [m for m in (lo - pos, hi - lo, pos + n - hi) if m > 0]
            if len(sizes) > 1:
                t.split(r, sizes)
                r = t.children[r][1 if lo > pos else 0]
            pieces.append(r)
        pos += n
    return _Lay(1, tuple(pieces))


def _slice(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x = ins[0]
    p = eqn.params
    strides = p["strides"] or (1,) * len(x.shape)
    shape = t.out_shape(eqn)
    descs = []
    for ax, (lo, hi, s) in enumerate(zip(p["start_indices"], p["limit_indices"], strides)):
        if (lo, hi, s) == (0, x.shape[ax], 1):
            descs.append(x.descs[ax])
        elif s == 1:
            descs.append(_take(t, x.descs[ax], lo, hi, site))
        else:
            if t.live(x.descs[ax]):
                t.poison(x.descs[ax], _UNSUPPORTED, f"{site} takes every {s}th channel")
            descs.append(t.opaque(shape[ax], _UNSUPPORTED, f"a strided slice made by {site}"))
    return [_AVal(shape, tuple(descs), x.zero, x.allzero)]


def _split(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x = ins[0]
    ax = eqn.params["axis"] % len(x.shape)
    outs, start = [], 0
    for i, n in enumerate(eqn.params["sizes"]):
        descs = list(x.descs)
        descs[ax] = _take(t, x.descs[ax], start, start + int(n), site)
        outs.append(_AVal(t.out_shape(eqn, i), tuple(descs), x.zero, x.allzero))
        start += int(n)
    return outs


def _concatenate(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
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
            if isinstance(d, _Slot):
                d = t.materialize(d)
            if d is None:
                d = _Lay(1, (t.new_space(a.shape[ax], kind=_UNSUPPORTED, reason=f"a size-1 part of {site}"),))
            if d.repeat != 1:
                t.poison(d, _UNSUPPORTED, f"{site} concatenates flattened channel axes")
                d = t.opaque(a.shape[ax], _UNSUPPORTED, f"part of {site}")
            segs.extend(d.segs)
        descs.append(_Lay(1, tuple(segs)))
    zero = tuple(all(a.zero[ax] for a in ins) for ax in range(len(shape)))
    return [_AVal(shape, tuple(descs), zero, all(a.allzero for a in ins))]


def _gather(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
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
    descs = [t.opaque(n, _UNSUPPORTED, reason) for n in shape]
    zero = [False] * len(shape)
    for o, a in zip(dn.offset_dims, kept, strict=True):
        if a not in indexed and sizes[a] == x.shape[a]:
            d = x.descs[a]
            descs[o], zero[o] = (t.materialize(d) if isinstance(d, _Slot) else d), x.zero[a]
        else:
            indexed.add(a)
    for a in indexed:
        if t.live(x.descs[a]):
            t.poison(x.descs[a], _UNSUPPORTED, f"{site} selects entries along the channels", report=False)
    return [_AVal(shape, tuple(descs), tuple(zero))]


def _dynamic_slice(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    x = ins[0]
    shape = t.out_shape(eqn)
    descs = []
    for a, n in enumerate(shape):
        if n == x.shape[a]:
            descs.append(x.descs[a])
            continue
        if t.live(x.descs[a]):
            t.poison(x.descs[a], _UNSUPPORTED, f"{site} takes part of the channels")
        descs.append(t.opaque(n, _UNSUPPORTED, f"an axis sliced by {site}"))
    return [_AVal(shape, tuple(descs), x.zero, x.allzero)]


def _random(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    """Random values take any shape: they never tie channels."""
    outs = []
    for v in eqn.outvars:
        shape = tuple(getattr(v.aval, "shape", ()))
        outs.append(_AVal(shape, (None,) * len(shape), (False,) * len(shape)))
    return outs


def _iota(t: _Tracer, eqn: Any, ins: list[_AVal], site: str) -> list[_AVal]:
    shape = t.out_shape(eqn)
    reason = f"{site} numbers the entries of this axis"
    return [_AVal(shape, tuple(t.opaque(n, _UNSUPPORTED, reason) for n in shape), (False,) * len(shape))]


_RULES: dict[str, Callable[..., list[_AVal]]] = {
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "broadcast_in_dim": _broadcast_in_dim,
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
    "iota": _iota,
    "select_n": _elementwise,
    "clamp": _elementwise,
    "integer_pow": _elementwise,
    "pow": _elementwise,
    "max": _elementwise,
    "min": _elementwise,
    "device_put": _passthrough,
    "optimization_barrier": _passthrough,
}
_GROUP_RULES = (
    (_ZERO_UNARY | _OTHER_UNARY | _ALL_ZERO | _ANY_ZERO | _FIRST_ZERO | _NO_ZERO, _elementwise),
    (_REDUCE | _ARG_REDUCE, _reduce),
    (_CUMULATIVE, _cumulative),
    (_WINDOW, _window),
    (_RANDOM, _random),
)


# --- the public functions --------------------------------------------------------


class _Found(NamedTuple):
    flat_specs: list[list[Any]]  # per tree
    group_order: list[str]
    unprunable: dict[str, tuple[str, ...]]
    unfollowed: tuple[str, ...]
    notes: tuple[str, ...]


def _analyze(
    fn: Callable[..., Any], trees: Sequence[Params], args: Sequence[Any], masked: Callable[[str], bool]
) -> _Found:
    """Traces ``fn(*trees, *args)`` and reads the specs of every leaf of ``trees`` off the result.

    ``masked(path)``: is that leaf zeroed on pruned channels (a parameter that
    ADMM masks), as opposed to state that is only sliced when collapsing?
    """
    flats, paths = [], []
    for tree in trees:
        leaves_with_path = jax.tree_util.tree_flatten_with_path(tree)[0]
        flats.append([leaf for _, leaf in leaves_with_path])
        paths.extend(path_str(p) for p, _ in leaves_with_path)
    closed = jax.make_jaxpr(fn)(*trees, *args)
    jaxpr = closed.jaxpr
    t = _Tracer(paths)
    in_avals = []
    for i, v in enumerate(jaxpr.invars):
        shape = tuple(v.aval.shape)
        if i < len(paths):
            descs = tuple(None if n == 1 else t.new_slot(i, ax, n) for ax, n in enumerate(shape))
            in_avals.append(_AVal(shape, descs, (masked(paths[i]),) * len(shape)))
        else:
            reason = f"input {i - len(paths)} of fn"
            descs = tuple(t.opaque(n, _BOUNDARY, reason) for n in shape)
            in_avals.append(_AVal(shape, descs, (False,) * len(shape)))
    outs = t.run(jaxpr, [t.constant(c, "constant") for c in closed.consts], in_avals)
    for k, a in enumerate(outs):
        for d in a.descs:
            t.poison(d, _BOUNDARY, f"reaches output {k} of fn")

    # Every class is named after its earliest producer: program order.
    leaf_roots = {t.find(i) for i in range(len(t.parent))}
    roots = sorted(
        (r for r in leaf_roots if t.children[r] is None and t.label[r] is not None), key=lambda r: t.label[r]
    )
    names: dict[int, str] = {}
    for r in roots:
        label = t.label[r]
        base = t.base[label]
        if t.offset[label] != 0 or t.size[r] != t.base_size[label]:
            base = f"{base}[{t.offset[label]}:{t.offset[label] + t.size[r]}]"
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
                lay = t.slot_binding[t.sfind(d.id)] if isinstance(d, _Slot) else None
                if lay is None:
                    continue
                pieces = t.resolve(lay.segs)
                total, offset = sum(t.size[r] for r in pieces), 0
                for r in pieces:
                    if not t.poisoned[r] and t.label[r] is not None:
                        whole = offset == 0 and t.size[r] == total
                        cls = Channel if t.contracted[d.id] else Filter
                        members.append(
                            cls(
                                axis=t.slot_owner[d.id][1] - len(shape),
                                group=names[r],
                                repeat=lay.repeat,
                                offset=0 if whole else offset,
                                size=None if whole else t.size[r],
                            )
                        )
                    offset += t.size[r]
            members.sort(key=lambda m: (m.axis, m.offset))
            spec = None if not members else members[0] if len(members) == 1 else Coupled(tuple(members))
            validate(spec, shape, paths[leaf])
            specs.append(spec)
            leaf += 1
        flat_specs.append(specs)

    entries: dict[str, list[tuple[str, str]]] = {names[r]: t.reasons[r] for r in roots if t.poisoned[r]}
    for sid, reasons in t.slot_reasons.items():
        entries.setdefault(t.slot_name(_Slot(sid)), reasons)
    unprunable = {name: tuple(dict.fromkeys(text for _, text in rs)) for name, rs in entries.items()}
    # Channels that reach the inputs or outputs are not pruned anyway.
    unfollowed = tuple(
        name
        for name, rs in entries.items()
        if any(kind == _UNSUPPORTED for kind, _ in rs) and not any(kind == _BOUNDARY for kind, _ in rs)
    )
    notes = tuple(f"{names[r]}: {n}" for r in roots if not t.poisoned[r] for n in t.notes[r])
    order = [names[r] for r in roots if not t.poisoned[r]]
    return _Found(flat_specs, order, unprunable, unfollowed, notes)


def spec_paths(specs: Specs) -> dict[str, Any]:
    """``{path: spec}`` for every leaf of a spec tree, e.g. to pass as ``overrides``."""
    return {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]}


def _build(
    found: _Found, trees: Sequence[Params], overrides: Mapping[str, Any] | Specs | None, strict: bool
) -> Discovery:
    """Applies ``overrides``, checks the groups and builds the :class:`Discovery`."""
    if strict and found.unfollowed:
        lines = "\n".join(f"  {n}: " + "; ".join(found.unprunable[n]) for n in found.unfollowed)
        raise DiscoveryError(f"cannot follow the channels of:\n{lines}")
    flat = [jax.tree_util.tree_flatten_with_path(tree) for tree in trees]
    paths = [path_str(p) for leaves, _ in flat for p, _ in leaves]
    shapes = [tuple(np.shape(x)) for leaves, _ in flat for _, x in leaves]
    specs = [s for tree_specs in found.flat_specs for s in tree_specs]
    if overrides is not None:
        if any(jax.tree.structure(overrides, is_leaf=is_spec) == treedef for _, treedef in flat):
            overrides = spec_paths(overrides)
        index = {p: i for i, p in enumerate(paths)}
        unknown = sorted(set(overrides) - set(index))
        if unknown:
            raise ValueError(f"overrides name parameters that do not exist: {unknown}")
        for p, spec in overrides.items():
            validate(spec, shapes[index[p]], p)
            specs[index[p]] = spec
    groups: dict[str, Group] = {}
    members_of = coupled_groups(specs)
    for name in [g for g in found.group_order if g in members_of] + sorted(set(members_of) - set(found.group_order)):
        members = members_of[name]
        counts = {num_groups(shapes[i], s) for i, s in members}
        if len(counts) != 1:
            raise ValueError(f"group {name!r}: members disagree on the channel count {sorted(counts)}")
        groups[name] = Group(counts.pop(), tuple((paths[i], specs[i]) for i, _ in members))
    out, start = [], 0
    for leaves, treedef in flat:
        out.append(jax.tree_util.tree_unflatten(treedef, specs[start : start + len(leaves)]))
        start += len(leaves)
    return Discovery(out[0], out[1] if len(out) > 1 else None, groups, found.unprunable, found.unfollowed, found.notes)


def discover(
    fn: Callable[..., Any],
    params: Params,
    *args: Any,
    overrides: Mapping[str, Any] | Specs | None = None,
    strict: bool = False,
) -> Discovery:
    """Finds the coupled channel groups of ``fn(params, *args)`` from its jaxpr.

    Args:
      fn: a pure function of the parameters and the inputs, in evaluation mode
        (so that BatchNorm reads its running statistics), e.g. a Linen
        ``model.apply`` with ``use_running_average=True``, or ``lambda p, x:
        nnx.merge(graphdef, p, state)(x)``. Everything it returns counts as
        output, whose channels are never pruned: return predictions only, not
        updated state. Arrays it captures instead of taking them in ``params``
        are constants; channels they act on are not pruned, because they
        could not be removed from a constant (this is what happens to
        BatchNorm statistics with :func:`admmprune.models.apply_fn`: use
        :func:`discover_nnx` for NNX modules).
      params: a pytree of arrays (or ``jax.ShapeDtypeStruct``): an NNX
        ``State``, a Linen variables dict (``{"params": ..., "batch_stats":
        ...}``: ``specs["params"]`` is for ADMM, ``specs["batch_stats"]`` for
        slicing the statistics), or any pytree. Every leaf is assumed to be
        zeroed on pruned channels, except a Linen variables dict's
        collections other than ``params``.
      *args: example inputs (arrays or ``jax.ShapeDtypeStruct``); only their
        shapes matter. Their channels are never pruned. Bind non-array
        arguments with :func:`functools.partial`.
      overrides: specs that take precedence over discovery: ``{parameter path:
        spec or None}``, or a spec tree shaped like ``params`` such as a
        declared chain's :func:`admmprune.structure.graph.chain_specs`.
      strict: raise :class:`DiscoveryError` rather than leave unpruned the
        channels that an operation which cannot be followed touches.

    Returns:
      A :class:`Discovery`: ``specs`` shaped like ``params``, the groups, what
      is not pruned and why.

    Raises:
      DiscoveryError: with ``strict``, naming the primitives, their source
        lines and the groups or parameters they touch.
      ValueError: if an override names no parameter or breaks a group.

    Examples:
      >>> fn, params = models.apply_fn(models.get("lenet5"))
      >>> found = discover(fn, params, jnp.zeros((2, 28, 28, 1)))
      >>> list(found.groups), list(found.unprunable)
      (['conv1', 'conv2', 'fc1'], ['fc2'])
      >>> found.groups["conv2"].members[-1]
      ('fc1/kernel', Coupled(specs=(Channel(axis=-2, group='conv2', repeat=16, offset=0, size=None), \
Filter(axis=-1, group='fc1', repeat=1, offset=0, size=None))))
    """
    linen_vars = isinstance(params, Mapping) and "params" in params and len(params) > 1

    def masked(path: str) -> bool:
        return not linen_vars or path.startswith("params/")

    return _build(_analyze(fn, (params,), args, masked), (params,), overrides, strict)


def discover_specs(fn: Callable[..., Any], params: Params, *args: Any, **kwargs: Any) -> Specs:
    """:func:`discover`'s spec tree; logs the report once, warning of unfollowed ops."""
    found = discover(fn, params, *args, **kwargs)
    log.info("channel discovery:\n%s", found.report())
    for name in found.unfollowed:
        log.warning("channels of %s are not pruned: %s", name, "; ".join(found.unprunable[name]))
    return found.specs


def discover_nnx(
    model: Any,
    *args: Any,
    overrides: Mapping[str, Any] | None = None,
    strict: bool = False,
) -> Discovery:
    """:func:`discover` for a Flax NNX module, covering its BatchNorm statistics.

    The module is split into ``nnx.Param`` variables and the rest of its state
    (``BatchStat``, RNG state, ...), and ``model(*args)`` is traced in
    evaluation mode (``eval()`` on a copy) as a function of both, so that
    BatchNorm's running ``mean`` and ``var`` are followed like its ``scale``
    and ``bias``. ``specs`` is shaped like the ``nnx.Param`` state (what ADMM
    and hard pruning take) and ``state_specs`` like the rest, in the same
    groups, for removing channels physically. The module is not modified; an
    abstract one (``nnx.eval_shape``) works too.

    Args:
      model: an ``nnx.Module``.
      *args: example inputs for ``model(*args)``.
      overrides: ``{path: spec or None}`` over both states; defaults to the
        model's ``pruning_overrides`` attribute if it has one.
      strict: as in :func:`discover`.

    Returns:
      A :class:`Discovery` with ``specs`` and ``state_specs``.
    """
    from flax import nnx  # imported here: the rest of this module works without flax

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def fn(params, rest, *args):
        copy = nnx.merge(graphdef, params, rest, copy=True)
        copy.eval()
        return copy(*args)

    if overrides is None:
        overrides = getattr(model, "pruning_overrides", None)
    param_paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}
    found = _analyze(fn, (params, rest), args, param_paths.__contains__)
    return _build(found, (params, rest), overrides, strict)


__all__ = ["Discovery", "DiscoveryError", "Group", "discover", "discover_nnx", "discover_specs", "spec_paths"]
