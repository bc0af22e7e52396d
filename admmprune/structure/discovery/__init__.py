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
  kernel's free axis is a new group unless already bound (weight tying). A
  kernel with several free axes (attention's ``(in, heads, head_dim)``) is
  pruned along the first only: whole heads, never the per-head dimension too
  (which would also change a scale computed from it).
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
* ``tile``: an axis tiled ``reps`` times holds ``reps`` copies of its
  channels (``repeat``); a size-1 axis tiled (a class token over the batch)
  is a new axis.
* ``concatenate`` along channels: the spaces are laid end to end, and the
  consumer gets one ``Channel`` per branch with ``offset``/``size``;
  ``slice``/``split`` of channels split the space.
* reductions, pooling, ``transpose``, ``broadcast_in_dim``, ``squeeze``,
  ``pad``: follow the axes; a reduction over channels makes them
  unprunable: statistics over channels (LayerNorm, RMSNorm) change when the
  model is collapsed, because they average over the kept channels only. With
  ``approximate=True``, a ``reduce_sum`` over channels whose removed entries
  are zero is allowed and reported in :attr:`Discovery.notes` instead.
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
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from admmprune._types import Params, Specs, path_str
from admmprune.core.groups import channel_groups, memberships
from admmprune.core.sparsity import Coupled, is_spec, validate

# The method lives in private modules, each importing only those after it:
# _groups (trace fn, read the specs off the records) -> _interpreter (the jaxpr
# walk) -> _rules, _shape_rules (what each primitive does) -> _records (the
# abstract values and the union-find). This module builds the public results.
from ._groups import Found, analyze

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
        is not exactly its collapsed copy (statistics over channels, with
        ``approximate=True`` only).
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


def spec_paths(specs: Specs) -> dict[str, Any]:
    """``{path: spec}`` for every leaf of a spec tree, e.g. to pass as ``overrides``."""
    return {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]}


def _without(spec: Any, groups: set[str]) -> Any:
    """``spec`` without its memberships of ``groups`` (``None`` if nothing is left)."""
    every = memberships(spec)
    kept = tuple(m for m in every if m.group not in groups)
    if len(kept) == len(every):
        return spec
    return None if not kept else kept[0] if len(kept) == 1 else Coupled(kept)


def _names(spec: Any) -> set[str]:
    return {m.group for m in memberships(spec) if m.group is not None}


def _check_partial(paths: list[str], before: list[Any], after: list[Any]) -> None:
    """Raises if an override took some members out of a group and left others in it."""
    left = {p: _names(b) - _names(a) for p, b, a in zip(paths, before, after, strict=True)}
    for path, groups in left.items():
        for g in sorted(groups):
            still = [q for q, a in zip(paths, after, strict=True) if g in _names(a)]
            if still:
                raise ValueError(
                    f"the override of {path} takes it out of channel group {g!r}, whose other members "
                    f"({', '.join(still[:4])}{', ...' if len(still) > 4 else ''}) would still be pruned: the "
                    f"pruned model would not fit together; exclude the whole group (exclude=[{path!r}]) or "
                    "override every member"
                )


def _excluded(paths: list[str], specs: list[Any], patterns: Sequence[str]) -> dict[str, str]:
    """``{group: reason}`` for every group with a member whose path or layer matches a pattern."""
    out: dict[str, str] = {}
    for pattern in patterns:
        regex = re.compile(pattern)
        hits = [(p, s) for p, s in zip(paths, specs, strict=True) if regex.search(p)]
        if not hits:
            raise ValueError(f"exclude pattern {pattern!r} matches no parameter path (e.g. {paths[0]!r})")
        for path, spec in hits:
            for g in sorted(_names(spec)):
                out.setdefault(g, f"excluded: it reaches {path} (exclude pattern {pattern!r})")
    return out


def _build(
    found: Found,
    trees: Sequence[Params],
    overrides: Mapping[str, Any] | Specs | None,
    strict: bool,
    exclude: str | Sequence[str] = (),
) -> Discovery:
    """Applies ``overrides`` and ``exclude``, checks the groups and builds the :class:`Discovery`."""
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
        discovered = list(specs)
        for p, spec in overrides.items():
            validate(spec, shapes[index[p]], p)
            specs[index[p]] = spec
    # Built and checked (members agree on the channel count) once, by the core.
    shaped = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    table = {g.name: g for g in channel_groups(specs, shaped)}
    if overrides is not None:
        _check_partial(paths, discovered, specs)
    unprunable = dict(found.unprunable)
    excluded = _excluded(paths, specs, [exclude] if isinstance(exclude, str) else list(exclude))
    if excluded:
        specs = [_without(spec, set(excluded)) for spec in specs]
        for g, reason in excluded.items():
            unprunable[g] = (*unprunable.get(g, ()), reason)
        table = {g.name: g for g in channel_groups(specs, shaped)}
    groups: dict[str, Group] = {}
    for name in [g for g in found.group_order if g in table] + sorted(set(table) - set(found.group_order)):
        group = table[name]
        groups[name] = Group(group.channels, tuple((paths[m.leaf], specs[m.leaf]) for m in group.members))
    out, start = [], 0
    for leaves, treedef in flat:
        out.append(jax.tree_util.tree_unflatten(treedef, specs[start : start + len(leaves)]))
        start += len(leaves)
    return Discovery(out[0], out[1] if len(out) > 1 else None, groups, unprunable, found.unfollowed, found.notes)


def discover(
    fn: Callable[..., Any],
    params: Params,
    *args: Any,
    overrides: Mapping[str, Any] | Specs | None = None,
    strict: bool = False,
    approximate: bool = False,
    exclude: str | Sequence[str] = (),
) -> Discovery:
    """Finds the coupled channel groups of ``fn(params, *args)`` from its jaxpr.

    Args:
      fn: a pure function of the parameters and the inputs, in evaluation mode
        (so that BatchNorm reads its running statistics), e.g. a Linen
        ``model.apply`` with ``use_running_average=True``, or ``lambda p, x:
        nnx.merge(graphdef, p, state)(x)``. Training mode works too, with
        the predictions returned alone; a collective over a named axis (Linen
        ``BatchNorm(axis_name="batch")``) is traced as on one device of that
        axis, where it changes no channel. Everything it returns counts as
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
      approximate: also prune channels that a sum over them reads (the
        statistics of LayerNorm, RMSNorm or GroupNorm with one group). A
        collapsed model then averages over the kept channels only, so it is
        not exactly the masked model: :attr:`Discovery.notes` says where.
        By default such channels are not pruned, and ``unprunable`` names
        the operation and its source line.
      exclude: regular expressions (``re.search``) over parameter paths, such
        as ``"attn"`` or ``"^blocks/0/"``: every channel group with a member
        that matches is left unpruned, whole (all its producers and
        consumers), and ``unprunable`` says which path excluded it. Applied
        after ``overrides``.

    Returns:
      A :class:`Discovery`: ``specs`` shaped like ``params``, the groups, what
      is not pruned and why.

    Raises:
      DiscoveryError: with ``strict``, naming the primitives, their source
        lines and the groups or parameters they touch.
      ValueError: if an override names no parameter or breaks a group (takes
        some of its members out and leaves the others), or an ``exclude``
        pattern matches no parameter.

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

    found = analyze(fn, (params,), args, masked, approximate=approximate)
    return _build(found, (params,), overrides, strict, exclude)


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
    approximate: bool = False,
    exclude: str | Sequence[str] = (),
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
      approximate: as in :func:`discover`.
      exclude: as in :func:`discover`, over the paths of both states.

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
    found = analyze(fn, (params, rest), args, param_paths.__contains__, approximate=approximate)
    return _build(found, (params, rest), overrides, strict, exclude)


__all__ = ["Discovery", "DiscoveryError", "Group", "discover", "discover_nnx", "discover_specs", "spec_paths"]
