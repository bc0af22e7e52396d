r"""A differentiable model of a network's multiply-accumulates (layer L3).

:func:`layer_macs` counts, once, the multiply-accumulates (MACs) per example
of every kernel from the traced program; :func:`gated_macs` scales each by the
fraction of its input and output channels kept, which is exactly what a
collapsed model costs when the keep values are 0/1, and a smooth function of
soft keep values (gates) in between. Only convolutions and matrix products
count: bias adds, activations, normalization and pooling are left out (they
are a few percent of a convnet's work, see :mod:`admmprune.structure.measure`).

A kernel's MACs, per example:

* ``conv_general_dilated``: output elements times the window size times the
  input channels per feature group, ``H_out * W_out * kh * kw * C_in / G *
  C_out``, as the op computes it (padding taps included, as XLA counts them;
  a transposed conv, which lowers to an input-dilated conv, counts the taps
  on the dilation's zeros too);
* ``dot_general``: output elements times the contracted size, ``in * out``
  for a dense layer.

With keep values :math:`k_c \in [0, 1]` per channel of each coupled group,

.. math:: \mathrm{MACs}(k) = \sum_{\text{kernels } w} \mathrm{MACs}_w
          \prod_{\text{axes } a \text{ of } w} \frac{\text{kept channels on } a}{C_a}

where a channel spec on axis :math:`a` (``Filter`` on the output axis,
``Channel`` on the input axis, one per branch of a concatenation) contributes
:math:`\sum_c k_c` for its slice and unconstrained channels count as kept.
A depthwise kernel's input axis has one entry, so its MACs follow its
output channels only, as collapse does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from admmprune._types import Specs, path_str
from admmprune.core.groups import memberships
from admmprune.core.sparsity import is_spec
from admmprune.models.layers import reference_forms
from admmprune.structure.measure import _as_function

__all__ = ["gated_macs", "layer_macs"]

# Calls whose inner jaxpr is followed with the same inputs and outputs.
_CALLS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


class _Walker:
    """Follows kernel leaves through a jaxpr and counts the MACs of the ops they feed.

    Every value carries ``(origins, data)``: the parameter leaves it is
    computed from and whether it depends on the example inputs. A value that
    depends on parameters only (a kernel cast, reshaped, masked, scaled by a
    gate) belongs to its largest leaf, which is what a conv or dot consuming
    it is attributed to.
    """

    def __init__(self, sizes: list[int]):
        self.sizes = sizes
        self.macs: dict[int, int] = {}

    def owner(self, origins: frozenset[int]) -> int | None:
        if not origins:
            return None
        best = max(self.sizes[i] for i in origins)
        largest = [i for i in origins if self.sizes[i] == best]
        return largest[0] if len(largest) == 1 else None

    def run(self, jaxpr: Any, ins: list[tuple[frozenset[int], bool]], times: int) -> list[tuple[frozenset[int], bool]]:
        env: dict[Any, tuple[frozenset[int], bool]] = {}
        for v in jaxpr.constvars:
            env[v] = (frozenset(), False)
        for v, a in zip(jaxpr.invars, ins, strict=True):
            env[v] = a

        def read(v: Any) -> tuple[frozenset[int], bool]:
            return (frozenset(), False) if hasattr(v, "val") else env[v]

        for eqn in jaxpr.eqns:
            args = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, args, times)
            for v, a in zip(eqn.outvars, outs, strict=True):
                env[v] = a
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, args: list[tuple[frozenset[int], bool]], times: int) -> list[tuple[frozenset[int], bool]]:
        name, p = eqn.primitive.name, eqn.params
        if name in ("conv_general_dilated", "dot_general"):
            self.count(eqn, args, times)
        if name == "scan":
            return self.run(p["jaxpr"].jaxpr, args, times * int(p["length"]))
        if name == "cond":
            return self.cond(p["branches"], args[1:], times)
        sub = next((p[k] for k in _CALLS if k in p), None)
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns") and len(inner.invars) == len(args) and len(inner.outvars) == len(eqn.outvars):
            return self.run(inner, args, times)
        origins = frozenset().union(*(o for o, _ in args)) if args else frozenset()
        data = any(d for _, d in args)
        # A value that depends on the inputs is an activation: it owns no kernel.
        return [(frozenset() if data else origins, data)] * len(eqn.outvars)

    def cond(self, branches: Any, args: list[tuple[frozenset[int], bool]], times: int) -> list[Any]:
        """Counts the most expensive branch: an upper bound of what runs."""
        best, outs = None, None
        for branch in branches:
            w = _Walker(self.sizes)
            o = w.run(branch.jaxpr, args, times)
            if best is None or sum(w.macs.values()) > sum(best.macs.values()):
                best, outs = w, o
        for i, n in best.macs.items():
            self.macs[i] = self.macs.get(i, 0) + n
        return outs

    def count(self, eqn: Any, args: list[tuple[frozenset[int], bool]], times: int) -> None:
        owners = [None if data else self.owner(origins) for origins, data in args]
        if sum(o is not None for o in owners) != 1 or not any(d for _, d in args):
            return  # a product of two activations, or of two parameters: no kernel's work
        out = math.prod(eqn.outvars[0].aval.shape)
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            shape = eqn.invars[0].aval.shape
            inner = math.prod(shape[a] for a in contract)
        else:
            _, rhs, _ = eqn.params["dimension_numbers"]
            kshape = eqn.invars[1].aval.shape
            inner = math.prod(kshape[a] for a in rhs[1:])  # input channels per group x window
        i = next(o for o in owners if o is not None)
        self.macs[i] = self.macs.get(i, 0) + out * inner * times


def layer_macs(fn: Callable[..., Any] | nnx.Module, *args: Any) -> dict[str, int]:
    """Multiply-accumulates per example of every kernel of ``fn(params, *example_args)``.

    Traces ``fn`` with :func:`jax.make_jaxpr` (nothing runs) and attributes
    every ``conv_general_dilated`` and ``dot_general`` to the leaf of
    ``params`` that feeds it, followed through casts, reshapes, masks and
    other ops on parameters alone, and into nested calls (``jit``, custom
    derivatives, remat). A ``scan`` body counts ``length`` times, a ``cond``
    its most expensive branch, a ``while`` body not at all (its trip count is
    unknown); a kernel used several times sums its uses.
    Products of two activations (attention) or two parameters are not
    counted. See the module docstring for the per-op formulas.

    Args:
      fn: ``fn(params, *example_args)``, or an ``nnx.Module`` called as
        ``fn(*example_args)`` (then ``params`` is its whole ``nnx.State``,
        paths such as ``conv1/kernel``).
      *args: ``params, *example_args`` for a function; ``*example_args`` for
        a module. Arrays or ``jax.ShapeDtypeStruct``. The first example
        argument's leading axis is the batch that the totals are divided by.

    Returns:
      ``{parameter path: MACs per example}`` for every kernel that feeds a
      conv or a matrix product.

    Raises:
      ValueError: without example arguments, or if a count does not divide
        by the batch size.
    """
    fn, args = _as_function(fn, args)
    if len(args) < 2:
        raise ValueError("layer_macs needs fn's params and at least one example input")
    params, example = args[0], args[1:]
    with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [path_str(p) for p, _ in with_path]
    sizes = [math.prod(np.shape(x)) for _, x in with_path]
    batch = np.shape(jax.tree.leaves(example)[0])[0]
    with reference_forms():  # convs as convs, not their fast CPU form
        closed = jax.make_jaxpr(lambda *a: fn(*a))(*args)  # a new function: no cached trace
    n_data = len(closed.jaxpr.invars) - len(paths)
    ins = [(frozenset({i}), False) for i in range(len(paths))] + [(frozenset(), True)] * n_data
    walker = _Walker(sizes)
    walker.run(closed.jaxpr, ins, 1)
    out = {}
    for i, n in sorted(walker.macs.items()):
        if n % batch:
            raise ValueError(f"{paths[i]}: {n} MACs do not divide by the batch size {batch}")
        out[paths[i]] = n // batch
    return out


def _axis_plan(specs: Specs) -> dict[str, list[list[Any]]]:
    """``{path: [members of one axis, ...]}`` for every leaf with channel memberships."""
    plan = {}
    for p, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]:
        axes: dict[int, list[Any]] = {}
        for m in memberships(spec):
            axes.setdefault(m.axis, []).append(m)
        if axes:
            plan[path_str(p)] = [axes[a] for a in sorted(axes)]
    return plan


def _axis_channels(members: list[Any], keep: Mapping[str, jax.Array], path: str, shapes: Mapping[str, Any]) -> int:
    """All channels of the axis the ``members`` slice (those outside every slice count as kept)."""
    for m in members:
        if m.size is None:
            return m.offset + int(np.shape(keep[m.group])[0])
    if path not in shapes:
        raise ValueError(
            f"{path}: its channel specs cover only part of the axis; pass params= so that its length is known"
        )
    return members[0].channel_layout(tuple(np.shape(shapes[path])))[2]


def gated_macs(
    macs: Mapping[str, int], keep: Mapping[str, jax.Array], specs: Specs, *, params: Any = None
) -> jax.Array:
    """The MACs of the model that keeps the channels ``keep`` says, differentiable in ``keep``.

    Each kernel's MACs from :func:`layer_macs` times, for every axis with
    channel specs, the kept fraction of that axis's channels (see the module
    docstring). With 0/1 ``keep`` this is the conv/dense MACs of the collapsed
    model: exact while each term (MACs / channels of the constrained axes,
    times the kept counts) and the sum stay below :math:`2^{24}`, the float32
    integers.

    Args:
      macs: ``{kernel path: MACs}`` from :func:`layer_macs`.
      keep: ``{group: (C,)}`` keep values in ``[0, 1]`` (gates, or 0/1).
      specs: the spec tree of the parameters; kernels it does not constrain
        count in full.
      params: the parameters (only shapes are read), needed only for a kernel
        whose channel specs cover part of an axis and end before its end (a
        layer reading the concatenation of a pruned and an unpruned branch).

    Returns:
      A float32 scalar.

    Raises:
      ValueError: if a group that constrains a counted kernel is missing
        from ``keep``, or ``params`` is needed and not given.
    """
    plan = _axis_plan(specs)
    shapes = {} if params is None else dict(zip(_paths(params), jax.tree.leaves(params), strict=True))
    missing = sorted({m.group for path in macs for axis in plan.get(path, ()) for m in axis} - set(keep))
    if missing:
        raise ValueError(f"keep has no values for groups {missing}")
    total = jnp.zeros((), jnp.float32)
    for path, n in macs.items():
        kept_counts, divisor = [], 1
        for members in plan.get(path, ()):
            channels = _axis_channels(members, keep, path, shapes)
            kept = jnp.asarray(channels, jnp.float32)
            for m in members:
                k = jnp.asarray(keep[m.group], jnp.float32)
                kept = kept - k.shape[0] + jnp.sum(k)
            kept_counts.append(kept)
            divisor *= channels
        # n / divisor is an integer for a conv or dense kernel: exact before the products.
        term = jnp.asarray(n / divisor, jnp.float32)
        for kept in kept_counts:
            term = term * kept
        total = total + term
    return total


def _paths(tree: Any) -> list[str]:
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
