"""What each layer of a model reads, on calibration data: the input Gram
matrices of one-shot pruning (layer L3).

One-shot pruning solves, layer by layer, ``min ||X W - X W0||^2`` over
sparse ``W`` (:mod:`admmprune.core.layerwise`), and needs each layer's
input rows ``X``, or rather ``H = X^T X``, computed with the layers before it
already pruned. This module finds the layers of any JAX function of a
parameter pytree and computes those matrices:

- :func:`find_layers` traces ``fn(params, *args)`` to a jaxpr and lists the
  kernels that a ``dot_general`` contracts on their leading axes (a Dense
  kernel ``(in, out)``, a ``LinearGeneral`` kernel ``(*in, *out)``) or that a
  ``conv_general_dilated`` uses in HWIO layout, in the order the function
  first uses them, with the source line of the use. Kernels used any other
  way (an ``Einsum`` contracting a middle axis, a grouped convolution, a
  kernel inside a ``scan``) are listed in ``refused`` with the reason.
- :func:`input_gram` evaluates that jaxpr (jitted) on one batch and returns
  the Gram matrix of one layer's input rows, flattened like its kernel: a
  Dense layer's rows are its inputs, a convolution's are the im2col patches
  in the kernel's ``(kh, kw, in)`` order, so that ``X @ kernel.reshape(-1,
  out)`` is the layer's output before the bias.

The interpreter follows calls (``jit``, ``custom_jvp``/``custom_vjp``
functions, ``remat``) into their bodies and evaluates everything else as is;
XLA removes whatever the requested matrix does not need.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from admmprune._types import Params, path_str
from admmprune.models import layers as layers_lib

_CALLS = ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call", "remat", "checkpoint")
_LOOPS = ("scan", "while", "fori_loop", "cond", "switch")
# Primitives through which a kernel stays itself (a dtype cast, a copy).
_SAME = ("convert_element_type", "copy", "copy_p")


class Layer(NamedTuple):
    """A kernel that one-shot pruning can reconstruct.

    Attributes:
      path: the kernel's path in the parameter pytree (``"fc1/kernel"``).
      kind: ``"dense"`` (a ``dot_general``) or ``"conv"``.
      shape: the kernel's shape; the last ``outputs`` axes are its outputs.
      inputs: ``prod(shape[:-outputs])``, the length of an input row.
      outputs: how many trailing axes are outputs (1 but for ``LinearGeneral``).
      where: the source line of the operation that uses it.
    """

    path: str
    kind: str
    shape: tuple[int, ...]
    inputs: int
    outputs: int
    where: str


class Layers(NamedTuple):
    """:func:`find_layers`'s answer: the layers, and the kernels refused with why."""

    layers: list[Layer]
    refused: dict[str, str]


def _where(eqn: Any) -> str:
    """The source line of an equation: the innermost frame outside installed
    packages (the user's call of a Flax layer, not Flax's line)."""
    try:
        from jax._src import source_info_util  # private, only used for messages

        for frame in source_info_util.user_frames(eqn.source_info.traceback):
            if "site-packages" not in frame.file_name and "dist-packages" not in frame.file_name:
                return f"{frame.file_name}:{frame.start_line} ({frame.function_name})"
        return source_info_util.summarize(eqn.source_info)
    except Exception:  # noqa: BLE001 - a message without a location is still a message
        return "?"


def _sub(eqn: Any) -> tuple[Any, Sequence[Any]] | None:
    p = eqn.params
    sub = p.get("jaxpr", p.get("call_jaxpr", p.get("fun_jaxpr")))
    if sub is None:
        return None
    return (sub.jaxpr, sub.consts) if hasattr(sub, "consts") else (sub, ())


def _dense_use(eqn: Any, operand: int, shape: tuple[int, ...]) -> tuple[int, str | None]:
    """``(outputs, None)`` if this ``dot_general`` contracts the kernel (operand
    ``operand``) on its leading axes, else ``(0, why not)``."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract, batch = (lc, lb) if operand == 0 else (rc, rb)
    if batch:
        return 0, "a batched dot_general (an Einsum with batch axes) uses it"
    if tuple(contract) != tuple(range(len(contract))):
        return 0, f"a dot_general contracts its axes {tuple(contract)}, not its leading ones"
    return len(shape) - len(contract), None


def _conv_use(eqn: Any) -> str | None:
    p = eqn.params
    n = len(p["dimension_numbers"].rhs_spec)
    if tuple(p["dimension_numbers"].rhs_spec) != (n - 1, n - 2, *range(n - 2)):
        return "a convolution uses it in a layout other than HWIO (spatial, in, out)"
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
        return "a grouped (e.g. depthwise) convolution uses it"
    return None


class _Walk:
    """Walks a jaxpr once, noting where each kernel is used."""

    def __init__(self, kernels: dict[Any, str], shapes: dict[str, tuple[int, ...]]):
        self.kernels = kernels  # var -> path, for vars that are a kernel
        self.shapes = shapes
        self.found: dict[str, Layer] = {}
        self.refused: dict[str, str] = {}

    def run(self, jaxpr: Any, origin: dict[Any, str], where: str = "") -> None:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            line = _where(eqn) if _where(eqn) != "?" else where
            paths = [origin.get(v) if not hasattr(v, "val") else None for v in eqn.invars]
            if not any(paths):
                continue
            if name in _CALLS and (sub := _sub(eqn)) is not None:
                inner, _ = sub
                if len(inner.invars) == len(eqn.invars):
                    self.run(inner, {iv: p for iv, p in zip(inner.invars, paths, strict=True) if p}, line)
                    continue
            if name in _SAME and paths[0]:
                origin[eqn.outvars[0]] = paths[0]
                continue
            for i, path in enumerate(paths):
                if path is None or path in self.found or path in self.refused:
                    continue
                shape = self.shapes[path]
                why: str | None
                if name == "dot_general":
                    outputs, why = _dense_use(eqn, i, shape)
                    kind = "dense"
                elif name == "conv_general_dilated" and i == 1:
                    outputs, why, kind = 1, _conv_use(eqn), "conv"
                elif name in _LOOPS:
                    outputs, why, kind = 0, f"a `{name}` uses it (layers inside loops are not reconstructed)", ""
                else:
                    outputs, why, kind = 0, f"a `{name}` uses it before any matmul or convolution", ""
                if why is not None:
                    self.refused[path] = f"{why} at {line}"
                else:
                    inputs = math.prod(shape[: len(shape) - outputs])
                    self.found[path] = Layer(path, kind, shape, inputs, outputs, line)


def _flat(params: Params) -> tuple[list[str], list[Any]]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return [path_str(p) for p, _ in leaves], [v for _, v in leaves]


def find_layers(fn: Callable[..., Any], params: Params, *args: Any, paths: Sequence[str] | None = None) -> Layers:
    """The layers of ``fn(params, *args)`` that one-shot pruning can reconstruct.

    Args:
      fn: a function of a parameter pytree and inputs (shapes are enough:
        ``jax.ShapeDtypeStruct`` s work).
      params: the parameter pytree.
      *args: example inputs.
      paths: the kernels to look for (default: every leaf with two or more axes).

    Returns:
      :class:`Layers`: the layers in the order ``fn`` first uses them, and the
      kernels looked for that are not layers, with the reason (by default
      only the leaves named ``kernel``: a 2-D bias or embedding is not one).
    """
    names, leaves = _flat(params)
    shapes = {n: tuple(np.shape(v)) for n, v in zip(names, leaves, strict=True)}
    wanted = [n for n in names if len(shapes[n]) >= 2] if paths is None else list(paths)
    unknown = [p for p in wanted if p not in shapes]
    if unknown:
        raise ValueError(f"no parameter at {unknown}; the parameters are {names}")
    treedef = jax.tree.structure(params)
    closed = _trace(fn, treedef, tuple(_spec(v) for v in leaves), tuple(_spec(a) for a in args))
    invars = closed.jaxpr.invars[: len(leaves)]
    origin = {v: n for v, n in zip(invars, names, strict=True) if n in wanted}
    walk = _Walk(origin, shapes)
    walk.run(closed.jaxpr, dict(origin))
    layers = list(walk.found.values())  # in the order of first use
    refused = {
        p: walk.refused.get(p, "the function never uses it")
        for p in wanted
        if p not in walk.found and (paths is not None or p.split("/")[-1] == "kernel")
    }
    return Layers(layers, refused)


def _rows(eqn: Any, operand: int, x: jax.Array, layer: Layer) -> jax.Array:
    """The layer's input rows, ``(rows, layer.inputs)``, from the other operand ``x``."""
    if layer.kind == "dense":
        (lc, rc), _ = eqn.params["dimension_numbers"]
        contract = list(lc if operand == 1 else rc)  # x's axes, in the kernel's leading-axis order
        x = jnp.moveaxis(x, contract, list(range(x.ndim - len(contract), x.ndim)))
        return x.reshape(-1, layer.inputs)
    p = eqn.params
    dn = p["dimension_numbers"]
    spatial = len(dn.lhs_spec) - 2
    x = jnp.transpose(x, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))  # channels last
    channels = x.shape[-1]
    window = layer.shape[:spatial]
    layout = ("N" + "HWDXYZ"[:spatial] + "C", "HWDXYZ"[:spatial] + "IO", "N" + "HWDXYZ"[:spatial] + "C")
    patches = jax.lax.conv_general_dilated_patches(
        x,
        window,
        p["window_strides"],
        p["padding"],
        lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"],
        dimension_numbers=layout,
        precision=jax.lax.Precision.HIGHEST,
    )
    # Patches' features are (in, *window); the kernel's rows are (*window, in).
    patches = patches.reshape(-1, channels, math.prod(window))
    return jnp.swapaxes(patches, 1, 2).reshape(-1, layer.inputs)


class _Capture(Exception):
    """Raised inside the interpreter with the rows it was asked for: nothing after them is evaluated."""

    def __init__(self, rows: jax.Array):
        self.rows = rows


def _evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], origin: dict[Any, str], layer: Layer) -> list:
    env: dict[Any, Any] = {}

    def read(v):
        return v.val if hasattr(v, "val") else env[v]

    for v, x in zip(jaxpr.constvars, consts, strict=True):
        env[v] = x
    for v, x in zip(jaxpr.invars, args, strict=True):
        env[v] = x
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        paths = [None if hasattr(v, "val") else origin.get(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS and (sub := _sub(eqn)) is not None and len(sub[0].invars) == len(ins):
            inner, inner_consts = sub  # a call's body, evaluated here (its primitive binds only from a trace)
            inner_origin = {iv: p for iv, p in zip(inner.invars, paths, strict=True) if p}
            outs = _evaluate(inner, inner_consts, ins, inner_origin, layer)
            for v, x in zip(eqn.outvars, outs, strict=True):
                env[v] = x
            continue
        if layer.path in paths:
            i = paths.index(layer.path)
            if name in _SAME:
                origin[eqn.outvars[0]] = layer.path
            elif name in ("dot_general", "conv_general_dilated"):
                raise _Capture(_rows(eqn, i, ins[1 - i], layer))
        outs = eqn.primitive.bind(*ins, **eqn.params)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for v, x in zip(eqn.outvars, outs, strict=True):
            env[v] = x
    return [read(v) for v in jaxpr.outvars]


@functools.lru_cache(maxsize=64)
def _gram_program(closed: Any, names: tuple[str, ...], layer: Layer, treedef: Any) -> Callable[..., Any]:
    invars = closed.jaxpr.invars[: len(names)]
    origin = {v: n for v, n in zip(invars, names, strict=True) if n == layer.path}

    def gram(leaves, args):
        try:
            _evaluate(closed.jaxpr, closed.consts, [*leaves, *args], dict(origin), layer)
        except _Capture as c:
            rows = c.rows.astype(jnp.float32)
            return jnp.matmul(rows.T, rows, precision=jax.lax.Precision.HIGHEST), rows.shape[0]
        raise ValueError(f"{layer.path} was not used on this input")

    return jax.jit(gram)


def input_gram(fn: Callable[..., Any], params: Params, args: Sequence[Any], layer: Layer) -> tuple[jax.Array, int]:
    """``(X^T X, rows)`` of ``layer``'s input rows when ``fn(params, *args)`` runs.

    ``X`` is ``(rows, layer.inputs)`` in float32: the inputs of a Dense layer
    (every position of a sequence is a row), the patches of a convolution.
    Compiled once per layer and input shape.
    """
    names, leaves = _flat(params)
    treedef = jax.tree.structure(params)
    closed = _trace(fn, treedef, tuple(_spec(v) for v in leaves), tuple(_spec(a) for a in args))
    h, rows = _gram_program(closed, tuple(names), layer, treedef)(leaves, list(args))
    return h, int(rows)


def _spec(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype if hasattr(x, "dtype") else jnp.result_type(x))


@functools.lru_cache(maxsize=8)
def _trace(fn: Callable[..., Any], treedef: Any, leaves: tuple, args: tuple) -> Any:
    with layers_lib.reference_forms():  # the zoo's convs as lax convs
        return jax.make_jaxpr(lambda leaves, *a: fn(jax.tree.unflatten(treedef, leaves), *a))(list(leaves), *args)
