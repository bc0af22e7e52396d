"""The rules of discovery for each primitive, and their registry.

A rule takes the records, the equation, its inputs' abstract values and a
``site`` (the primitive and the user's source line, for messages), ties the
channel axes it aligns, and returns its outputs' abstract values. This module
holds the arithmetic ones (elementwise ops, contractions, reductions);
``_shape_rules`` those that move, merge, slice or index axes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._records import BOUNDARY, UNSUPPORTED, AVal, Desc, Records, Slot
from ._shape_rules import SHAPE_RULES

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


def _z(a: AVal, ax: int, nd: int) -> bool:
    return a.zero[ax] if len(a.shape) == nd else a.allzero


def _absorbs(a: AVal, sign: int) -> bool:
    """``max(0, a) == 0`` (``sign=1``) or ``min(0, a) == 0`` (``sign=-1``)."""
    return a.allzero or (a.value is not None and sign * a.value <= 0)


def _elementwise(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
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
    return [AVal(shape, tuple(descs), tuple(zero), allzero)]


def _passthrough(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    """One output per input, unchanged (``optimization_barrier``, ``device_put``, ``reshard``)."""
    if len(ins) != len(eqn.outvars):
        return t.unsupported(eqn, ins, site)
    return list(ins)


def _collective(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    """A sum, max or min across devices of a named axis (``psum``: BatchNorm's ``pmean`` over its
    ``axis_name``): each channel stays itself, and a channel zero on every device stays zero."""
    if any(not isinstance(a, str) for a in eqn.params.get("axes", ())):
        return t.unsupported(eqn, ins, site)  # it also reduces positional axes
    return _passthrough(t, eqn, ins, site)


def _free(t: Records, a: AVal, ax: int) -> Desc:
    """A kernel's output axis: its parameter's space, created on first use."""
    d = a.descs[ax]
    return t.materialize(d) if isinstance(d, Slot) else d


def _contract(t: Records, x: AVal, ax: int, y: AVal, ay: int, site: str) -> None:
    for a, i in ((x, ax), (y, ay)):
        if isinstance(a.descs[i], Slot):
            t.axes[a.descs[i].id].contracted = True
    dx = x.descs[ax]
    if isinstance(dx, Slot) and isinstance(y.descs[ay], Slot):
        dx = t.materialize(dx)  # the inner dimension of a product of parameters (low rank)
    d = t.unify(dx, y.descs[ay], site)
    if t.live(d) and not (x.zero[ax] or y.zero[ay]):
        t.poison(
            d,
            UNSUPPORTED,
            f"{site} sums over channels whose pruned entries are not zero on either side "
            "(e.g. a product of two activations after a non-zero-preserving op)",
        )


def _one_output_axis(t: Records, a: AVal, free: list[int], site: str) -> None:
    """A kernel with several output axes (attention's ``(in, heads, head_dim)``)
    is pruned along the first only: a head goes whole, never the head and a
    part of every other head, and attention's scale, which models compute
    from the per-head dimension, stays what it was."""
    kernel_axes = [i for i in free if isinstance(a.descs[i], Slot)]
    if not kernel_axes:
        return
    outer = [i for i in free if i < kernel_axes[0] and a.shape[i] == 1]
    if outer:  # a single head, (in, 1, head_dim): its dimension is as inner as with several
        for i in kernel_axes:
            t.poison(
                _free(t, a, i),
                BOUNDARY,
                f"{site}: {t.slot_name(a.descs[i])} is an inner output axis of a kernel whose outer output axis "
                f"{outer[0]} has size 1 (e.g. the per-head dimension of a single head, from which attention's "
                "scale is computed)",
            )
        return
    if len(kernel_axes) > 1:
        _free(t, a, kernel_axes[0])  # named after the layer first
    for i in kernel_axes[1:]:
        first = t.slot_name(a.descs[kernel_axes[0]])
        t.poison(
            _free(t, a, i),
            BOUNDARY,
            f"{site}: {t.slot_name(a.descs[i])} is an inner output axis of a kernel that {first} already "
            "prunes (e.g. the per-head dimension, where whole heads are pruned)",
        )


def _dot_general(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x, y = ins
    (xc, yc), (xb, yb) = eqn.params["dimension_numbers"]
    _one_output_axis(t, x, [a for a in range(len(x.shape)) if a not in xc and a not in xb], site)
    _one_output_axis(t, y, [b for b in range(len(y.shape)) if b not in yc and b not in yb], site)
    for a, b in zip(xc, yc, strict=True):
        _contract(t, x, a, y, b, site)
    descs, zero = [], []
    for a, b in zip(xb, yb, strict=True):
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
    return [AVal(t.out_shape(eqn), tuple(descs), tuple(zero), x.allzero or y.allzero)]


def _conv(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
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
        descs[o] = t.opaque(shape[o], UNSUPPORTED, f"a spatial axis of {site}")
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
            t.poison(d, UNSUPPORTED, why)
        descs[f] = t.opaque(shape[f], UNSUPPORTED, why)
    return [AVal(shape, tuple(descs), tuple(zero), x.allzero or k.allzero)]


def _reduce(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x = ins[0]
    name = eqn.primitive.name
    axes = {a % len(x.shape) for a in eqn.params["axes"]}
    for a in axes:
        d = x.descs[a]
        if not t.live(d):
            continue
        if name == "reduce_sum" and x.zero[a] and t.approximate:
            t.note(
                d,
                f"{site} sums over the channels (e.g. LayerNorm statistics): after collapsing, "
                "means over them are taken over the kept channels only",
            )
        elif name == "reduce_sum" and x.zero[a]:
            t.poison(
                d,
                BOUNDARY,
                f"{site} sums over the channels (e.g. the statistics of a LayerNorm or RMSNorm): "
                "a collapsed model would average over the kept channels only, another function "
                "(discover(..., approximate=True) prunes them anyway, with a note)",
            )
        else:
            t.poison(d, UNSUPPORTED, f"{site} reduces over the channels")
    keep = [i for i in range(len(x.shape)) if i not in axes]
    zeros = name in _REDUCE
    return [
        AVal(
            t.out_shape(eqn),
            tuple(x.descs[i] for i in keep),
            tuple(zeros and x.zero[i] for i in keep),
            zeros and x.allzero,
        )
    ]


def _cumulative(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    x = ins[0]
    ax = eqn.params["axis"] % len(x.shape)
    descs = list(x.descs)
    if t.live(descs[ax]):
        t.poison(descs[ax], UNSUPPORTED, f"{site} accumulates along the channels")
    descs[ax] = t.opaque(x.shape[ax], UNSUPPORTED, f"an axis accumulated by {site}")
    return [AVal(x.shape, tuple(descs), (False,) * len(x.shape))]


def _window(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
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
            t.poison(x.descs[ax], UNSUPPORTED, f"{site} pools over the channels")
        descs.append(t.opaque(shape[ax], UNSUPPORTED, f"a pooled axis of {site}"))
    return [AVal(shape, tuple(descs), x.zero, x.allzero)]


def _random(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    """Random values take any shape: they never tie channels."""
    outs = []
    for v in eqn.outvars:
        shape = tuple(getattr(v.aval, "shape", ()))
        outs.append(AVal(shape, (None,) * len(shape), (False,) * len(shape)))
    return outs


def _iota(t: Records, eqn: Any, ins: list[AVal], site: str) -> list[AVal]:
    shape = t.out_shape(eqn)
    reason = f"{site} numbers the entries of this axis"
    return [AVal(shape, tuple(t.opaque(n, UNSUPPORTED, reason) for n in shape), (False,) * len(shape))]


# By primitive name; GROUP_RULES covers the families of elementwise ops, reductions, ...
RULES: dict[str, Callable[..., list[AVal]]] = {
    "dot_general": _dot_general,
    "conv_general_dilated": _conv,
    "iota": _iota,
    "select_n": _elementwise,
    "clamp": _elementwise,
    "integer_pow": _elementwise,
    "pow": _elementwise,
    "max": _elementwise,
    "min": _elementwise,
    "device_put": _passthrough,
    "optimization_barrier": _passthrough,
    # Sharding annotations (explicit-axes meshes): the values are unchanged.
    "reshard": _passthrough,
    "sharding_constraint": _passthrough,
    "mesh_cast": _passthrough,
    "psum": _collective,
    "pmax": _collective,
    "pmin": _collective,
    **SHAPE_RULES,
}
GROUP_RULES = (
    (_ZERO_UNARY | _OTHER_UNARY | _ALL_ZERO | _ANY_ZERO | _FIRST_ZERO | _NO_ZERO, _elementwise),
    (_REDUCE | _ARG_REDUCE, _reduce),
    (_CUMULATIVE, _cumulative),
    (_WINDOW, _window),
    (_RANDOM, _random),
)
