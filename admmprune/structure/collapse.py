"""Collapse: physically remove pruned channels from a Flax NNX model (layer L3).

After hard pruning, a channel group (see :mod:`admmprune.structure.discovery`) whose
channel is removed is zero in every parameter that produces it and in every
input row that reads it, so the channel can be cut out of all of them: the
kernels lose output columns and input rows, biases and normalization scales,
offsets and running statistics lose entries, depthwise kernels lose their
channels. :func:`collapse` returns a new, smaller model that computes exactly
what :func:`masked` (the original model with the pruned weights zeroed)
computes, in training mode (batch statistics) and evaluation mode alike.

How a channel is judged kept: a group keeps a channel when *every* member's
mask keeps some weight of it (``AND`` over the members of
:func:`admmprune.core.projections.groups_alive`); masks from
:func:`admmprune.hard_prune` agree across a group, so this only matters for
hand-made masks. :func:`consistent_masks` spreads each group's decision to all
of its members, and :func:`masked` applies those masks, so that the reference
model and the collapsed one always agree.

Why the removed channels may go: the masked model's removed channel is zero
where it is produced (kernel column, bias, BatchNorm ``scale`` and ``bias``
all zero; a BatchNorm then outputs ``0 * (x - mean) / std + 0 = 0`` whatever
its statistics, and in training mode the batch statistics of the zero channel
are ``0``), stays zero through zero-preserving activations, and is read by
zeroed rows. Discovery only forms groups for which this holds.

A group that keeps *no* channel is removed where the model can do without
it: a registered model listing the group's layers in ``removable_layers``
(the inner convs of a ResNet block) is rebuilt with width 0 there, and the
block drops the branch's convs. A fully pruned residual branch is *not* just
its shortcut: ``bn2(conv2(0))`` is the constant ``bias`` in training mode and
``bias - mean * scale / std`` in evaluation mode, so the rebuilt block keeps
``bn2`` and adds that constant (see :class:`admmprune.models.resnet.BasicBlock`).
Elsewhere the group keeps one channel, its first, still zeroed: Flax layers
need every width ``>= 1``, and one dead channel computes exactly zero and
costs a few weights.

Two ways to build the smaller model:

* a registered model (:func:`admmprune.models.name_of` knows its class, and it
  has ``config``, ``widths_arg`` and ``width_layers`` or a declared
  ``chain``) is rebuilt from its ``config`` with the new widths (entry ``i``
  of ``widths`` becomes the output width of the collapsed kernel of
  ``width_layers[i]``), so ``config`` and ``widths`` describe the collapsed
  model and a checkpoint can record them;
* any other module is copied structurally: its graph definition is merged
  with abstract variables of the new shapes, and the size attributes of the
  Flax layers it contains (``Linear``, ``Conv`` including depthwise
  ``feature_group_count``, ``ConvTranspose``, ``BatchNorm``, ``LayerNorm``,
  ``RMSNorm``, ``GroupNorm``, ``Embed``) are set from their new variables.
  Custom modules must read their sizes from their variables' shapes (as
  ``__call__`` code usually does), not from attributes holding widths.

Either way the target is built with ``nnx.eval_shape`` or from abstract
variables, its shapes are checked against the sliced variables, and it is
filled with ``nnx.update``; train/eval flags (``use_running_average``,
``deterministic``) are copied from the input module. Everything here runs on
the host, outside ``jit``: it changes shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from admmprune import models
from admmprune._errors import UserError
from admmprune._types import Masks, Specs, path_str
from admmprune.core.groups import channel_groups, memberships
from admmprune.core.sparsity import is_spec
from admmprune.structure.discovery import Discovery

#: Module attributes that say train or eval mode; copied onto the collapsed model.
_MODE_FLAGS = ("use_running_average", "deterministic")


# --- which channels each group keeps ---------------------------------------------


def _split_specs(specs: Specs | Discovery, state_specs: Specs | None) -> tuple[Specs, Specs | None]:
    if isinstance(specs, Discovery):
        return specs.specs, specs.state_specs if state_specs is None else state_specs
    return specs, state_specs


def alive_channels(specs: Specs | Discovery, masks: Masks) -> dict[str, np.ndarray]:
    """``{group: boolean (C,)}``: the channels each group keeps.

    A channel is kept when every member of the group keeps some weight of it
    (``AND`` over the members of :func:`admmprune.core.projections.groups_alive`).
    Members without a mask do not vote, nor do leaves in several groups whose
    mask is all ``False`` (a fully pruned branch's next conv); a group none of whose members has a
    mask keeps everything and is left out of the result.

    Args:
      specs: the spec tree of the parameters, or a :class:`Discovery`.
      masks: boolean masks shaped like the parameters (``None`` = unmasked),
        e.g. from :func:`admmprune.hard_prune`.

    Returns:
      A numpy boolean vector per group, on the host.
    """
    specs, _ = _split_specs(specs, None)
    return channel_groups(specs).alive(masks)


def consistent_masks(specs: Specs | Discovery, masks: Masks) -> Masks:
    """``masks`` with each group's removed channels removed from all its members.

    The result is what :func:`collapse` realizes: every member of a group
    drops the channels that :func:`alive_channels` says the group drops, on
    top of what its own mask drops. Masks from :func:`admmprune.hard_prune`
    come back unchanged (as numpy arrays).
    """
    specs, _ = _split_specs(specs, None)
    groups = channel_groups(specs)
    alive = groups.alive(masks)
    out = [None if m is None else np.asarray(m) for m in groups.flatten(masks)]
    for g in groups:
        if g.name in alive:
            for member in g.members:
                if out[member.leaf] is not None:
                    out[member.leaf] = out[member.leaf] & member.expand(alive[g.name], out[member.leaf].shape)
    return groups.unflatten(out)


def _where(mask: Any, x: Any) -> jax.Array:
    x = np.asarray(x)
    return jnp.asarray(np.where(np.asarray(mask), x, np.zeros((), x.dtype)))


def _zeroed(params: Any, specs: Specs, masks: Masks) -> Any:
    _, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    leaves = treedef.flatten_up_to(params)
    flat_masks = treedef.flatten_up_to(consistent_masks(specs, masks))
    out = [x if m is None else _where(m, x) for x, m in zip(leaves, flat_masks, strict=True)]
    return treedef.unflatten(out)


def masked(model: nnx.Module, masks: Masks, specs: Specs | Discovery | None = None) -> nnx.Module:
    """A copy of ``model`` whose masked-out parameters are zero: the reference for :func:`collapse`.

    Only ``nnx.Param`` variables are masked; BatchNorm statistics are kept as
    they are (a removed channel has zero ``scale`` and ``bias``, so its output
    is zero whatever its statistics). The input is not modified.

    Args:
      model: an ``nnx.Module``.
      masks: boolean masks shaped like ``nnx.state(model, nnx.Param)``.
      specs: if given, the masks are first made consistent over each group
        (:func:`consistent_masks`), so that the result computes exactly what
        ``collapse(model, masks, specs)`` computes even for masks that
        disagree within a group.

    Returns:
      A new module of the same structure.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if specs is None:
        params = jax.tree.map(
            lambda m, x: x if m is None else _where(m, x),
            masks,
            params,
            is_leaf=lambda v: v is None,
        )
    else:
        specs, _ = _split_specs(specs, None)
        params = _zeroed(params, specs, masks)
    return nnx.merge(graphdef, params, rest, copy=True)


# --- slicing -------------------------------------------------------------------------


def _kept_index(n: int, members: Sequence[Any], kept: Mapping[str, np.ndarray], where: str) -> np.ndarray | None:
    """Indices kept along an axis of ``n`` entries that ``members`` act on; ``None``: all."""
    repeats = {m.repeat for m in members}
    if len(repeats) != 1:
        raise ValueError(f"{where}: members on one axis disagree on repeat {sorted(repeats)}")
    repeat = repeats.pop()
    channels = n // repeat
    keep = np.ones(channels, bool)
    for m in members:
        if m.group not in kept:
            continue
        stop = m.channel_slice(channels).stop
        if len(kept[m.group]) != stop - m.offset:
            raise ValueError(
                f"{where}: group {m.group!r} has {len(kept[m.group])} channels, the spec covers {stop - m.offset}"
            )
        keep[m.offset : stop] &= kept[m.group]
    if keep.all():
        return None
    return (np.arange(repeat)[:, None] * channels + np.flatnonzero(keep)[None, :]).reshape(-1)


def slice_channels(tree: Any, specs: Specs | None, kept: Mapping[str, np.ndarray]) -> Any:
    """Cuts the channels ``kept`` drops out of every leaf of a plain pytree that ``specs`` places in a group.

    The functional half of :func:`collapse`, for models it cannot rebuild: a
    Flax Linen, Equinox or hand-written model's variables are sliced here, and
    the caller builds the smaller model from the new shapes (a Linen module
    with smaller width attributes, say). The smaller model computes what the
    masked one computes when the pruned weights are already zero (as
    :func:`admmprune.hard_prune` leaves them) and the groups come from
    discovery. Runs on the host, outside ``jit``.

    Args:
      tree: the variables, e.g. a Linen ``{"params": ..., "batch_stats": ...}``
        dict with the pruned weights zeroed.
      specs: a spec tree with ``tree``'s structure, e.g. the ``specs`` of
        :func:`admmprune.structure.discovery.discover` traced on ``model.apply`` with
        the whole variables dict; ``None`` leaves a leaf whole.
      kept: ``{group: bool per channel}``, e.g. :func:`alive_channels` of the
        masks. A group missing from it keeps every channel; a group that keeps
        none leaves zero-width arrays, which most layers cannot take, so keep
        one channel there (:func:`collapse` does).

    Returns:
      ``tree`` with the dropped channels cut out of every grouped leaf (kernel
      columns and rows, biases, normalization parameters and statistics,
      at each member's ``offset`` and ``repeat``).

    Raises:
      ValueError: if a group's channel count disagrees with a spec's extent.
    """
    if specs is None:
        return tree
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    leaves = treedef.flatten_up_to(tree)
    out = []
    for (path, spec), x in zip(flat, leaves, strict=True):
        members = memberships(spec)
        if members:
            x = np.asarray(x)
            shape = x.shape
            by_axis: dict[int, list[Any]] = {}
            for m in members:
                by_axis.setdefault(m.axis % len(shape), []).append(m)
            for axis, ms in sorted(by_axis.items()):
                idx = _kept_index(shape[axis], ms, kept, f"{path_str(path)}[axis {axis}]")
                if idx is not None:
                    x = np.take(x, idx, axis=axis)
            x = jnp.asarray(x)
        out.append(x)
    return treedef.unflatten(out)


def _shapes(state: Any) -> dict[str, tuple[int, ...]]:
    # Shapes only: a model whose arrays were cast (say to bfloat16) keeps its dtypes through nnx.update.
    return {path_str(p): tuple(np.shape(x)) for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}


def _with_stand_ins(alive: Mapping[str, np.ndarray], removable: set[str] = frozenset()) -> dict[str, np.ndarray]:
    """``alive`` with one zeroed channel standing in for each empty group that may not vanish
    (see the module docstring)."""
    kept = {}
    for group, a in alive.items():
        if not a.any() and group not in removable:
            a = a.copy()
            a[0] = True
        kept[group] = a
    return kept


def _shape_problems(got: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
    """``"path: built ..., collapsed ..."`` for every path whose built and collapsed shapes differ."""
    return [
        f"{p}: built {got.get(p)}, collapsed {want.get(p)}"
        for p in sorted(set(want) | set(got))
        if got.get(p) != want.get(p)
    ]


def _check_shapes(target: nnx.Module, states: Sequence[Any], how: str) -> None:
    want: dict[str, Any] = {}
    for s in states:
        want.update(_shapes(s))
    problems = _shape_problems(_shapes(nnx.state(target)), want)
    if problems:
        raise ValueError(
            f"the model {how} does not fit the collapsed variables (are the groups consistent with the "
            "architecture's width constraints, and were the state specs given?):\n  " + "\n  ".join(problems[:10])
        )


# --- building the smaller module ---------------------------------------------------------


def _modules(node: Any) -> dict[tuple[Any, ...], nnx.Module]:
    return {tuple(p): m for p, m in nnx.iter_graph(node) if isinstance(m, nnx.Module)}


def _copy_mode(source: nnx.Module, target: nnx.Module) -> None:
    targets = _modules(target)
    for path, m in _modules(source).items():
        t = targets.get(path)
        if t is None or type(t) is not type(m):
            continue
        for flag in _MODE_FLAGS:
            if flag in vars(m):
                setattr(t, flag, getattr(m, flag))


def _width_layers(model: Any) -> Sequence[str] | None:
    layers = getattr(model, "width_layers", None)
    if layers is not None:
        return layers
    chain = getattr(model, "chain", None)
    return None if chain is None else [name for name, _ in chain[:-1]]


def _registered_name(model: Any) -> str | None:
    try:
        name = models.name_of(model)
    except UserError:
        return None
    has = all(hasattr(model, a) for a in ("config", "widths_arg", "widths"))
    return name if has and _width_layers(model) is not None else None


def removable_groups(model: Any, specs: Specs, params: Any) -> set[str]:
    """Groups that may keep no channel: all their width layers are in ``model.removable_layers``."""
    removable = set(getattr(model, "removable_layers", ()))
    if not removable:
        return set()
    layer_groups: dict[str, set[str]] = {}  # group -> the width layers whose outputs it holds
    flat, treedef = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)
    layers = set(_width_layers(model))
    for (path, spec), x in zip(flat, treedef.flatten_up_to(params), strict=True):
        p = path_str(path)
        layer = p.rsplit("/", 1)[0]
        if p.endswith("/kernel") and layer in layers:
            for m in memberships(spec):
                if m.axis % np.ndim(x) == np.ndim(x) - 1:  # the kernel's outputs
                    layer_groups.setdefault(m.group, set()).add(layer)
    return {g for g, ls in layer_groups.items() if ls <= removable}


def _unread_groups(params: Any, specs: Specs, groups: set[str], kept: Mapping[str, np.ndarray]) -> list[str]:
    """Groups in ``groups`` that still keep channels but whose every reader (``Channel`` member) is empty."""
    leaves = jax.tree.leaves(params)
    out = []
    for g in channel_groups(specs):
        if g.name not in groups or g.name not in kept or not kept[g.name].any():
            continue
        readers = [m.leaf for m in g.consumers]
        if readers and all(np.size(leaves[i]) == 0 for i in readers):
            out.append(g.name)
    return out


def _drop_empty(state: Any, target: nnx.Module) -> Any:
    """``state`` without the empty variables that ``target`` does not have."""
    have = set(_shapes(nnx.state(target)))
    flat = nnx.to_flat_state(state)
    return nnx.from_flat_state([(p, v) for p, v in flat if np.size(v[...]) or "/".join(map(str, p)) in have])


def _rebuild(model: nnx.Module, name: str, params: Any) -> nnx.Module:
    """The registered model's abstract smaller copy, from its config and the new kernel widths."""
    shapes = _shapes(params)
    widths = []
    for layer in _width_layers(model):
        key = f"{layer}/kernel"
        if key not in shapes:
            raise ValueError(f"{type(model).__name__}: width layer {layer!r} has no kernel {key!r}")
        widths.append(shapes[key][-1])
    kwargs = {**model.config, model.widths_arg: tuple(widths)}
    return nnx.eval_shape(lambda: models.get(name, **kwargs))


def _set_sizes(old: nnx.Module, new: nnx.Module, where: str) -> None:
    """Sets the size attributes of one Flax layer from its (already resized) variables."""

    def shape(attr: str) -> tuple[int, ...] | None:
        v = getattr(new, attr, None)
        return None if v is None else tuple(v.shape)

    if isinstance(new, nnx.Linear):
        new.in_features, new.out_features = shape("kernel")
    elif isinstance(new, nnx.Conv):
        k = shape("kernel")
        groups = old.feature_group_count
        if groups > 1 and k != tuple(old.kernel_shape):
            if groups != old.in_features or k[-2] != 1:
                raise ValueError(f"{where}: a grouped conv that is not depthwise cannot change its channels")
            multiplier = old.out_features // old.in_features
            new.feature_group_count = groups = k[-1] // multiplier
        new.in_features, new.out_features = k[-2] * groups, k[-1]
        new.kernel_shape = k
    elif isinstance(new, nnx.ConvTranspose):
        k = shape("kernel")
        new.in_features, new.out_features = (k[-1], k[-2]) if new.transpose_kernel else (k[-2], k[-1])
        new.kernel_shape = k
    elif isinstance(new, (nnx.BatchNorm, nnx.LayerNorm, nnx.RMSNorm, nnx.GroupNorm)):
        sizes = {s[-1] for s in map(shape, ("scale", "bias", "mean", "var")) if s}
        if len(sizes) > 1:
            raise ValueError(f"{where}: variables disagree on the number of features {sorted(sizes)}")
        group_norm = isinstance(new, nnx.GroupNorm)  # it has no num_features
        if not sizes or sizes == {old.num_groups * old.group_size if group_norm else old.num_features}:
            return
        if isinstance(new, (nnx.LayerNorm, nnx.RMSNorm)) and new.feature_axes not in (-1, (-1,)):
            raise ValueError(f"{where}: only a normalization over the last axis can lose channels")
        n = sizes.pop()
        if not group_norm:
            new.num_features = n
        elif old.group_size == 1:
            new.num_groups = n
        elif old.num_groups == 1:
            new.group_size = n
        else:
            raise ValueError(f"{where}: GroupNorm with groups of several channels cannot lose channels")
    elif isinstance(new, nnx.Embed):
        new.num_embeddings, new.features = shape("embedding")
    elif isinstance(new, nnx.LinearGeneral):
        k = shape("kernel")  # (*batch sizes, *in_features, *out_features)
        n_batch, n_in = len(old.batch_axis), len(old.in_features)
        if k[:n_batch] != tuple(old.batch_axis.values()):
            raise ValueError(f"{where}: a LinearGeneral cannot lose entries of its batch axes")
        new.in_features, new.out_features = k[n_batch : n_batch + n_in], k[n_batch + n_in :]
    elif isinstance(new, nnx.MultiHeadAttention):
        # Its projections (LinearGeneral, set above: query (in, heads, head_dim),
        # key/value (in_kv, kv_heads, head_dim), out (heads, head_dim, out)).
        q, kv, out = (getattr(new, n).kernel.shape for n in ("query", "key", "out"))
        if q[-1] != old.head_dim or tuple(new.value.kernel.shape) != tuple(kv):
            raise ValueError(f"{where}: attention can lose whole heads only, the same in key and value")
        if q[-2] % kv[-2] or old.num_heads // old.num_kv_heads != q[-2] // kv[-2]:
            raise ValueError(f"{where}: pruned heads must keep every key/value head's number of query heads")
        new.in_features, new.num_heads, new.num_kv_heads = q[0], q[-2], kv[-2]
        new.qkv_features, new.in_kv_features, new.out_features = q[-2] * q[-1], kv[0], out[-1]
    elif isinstance(new, nnx.Einsum):  # its call reads only the variables; the shapes are for initialization
        new.kernel_shape = shape("kernel")
        if getattr(new, "bias", None) is not None:
            new.bias_shape = shape("bias")


def _restructure(model: nnx.Module, params: Any, rest: Any) -> nnx.Module:
    """An abstract copy of ``model``'s structure with the new variable shapes and layer sizes."""
    return reshaped(model, nnx.to_pure_dict(params), nnx.to_pure_dict(rest))


def reshaped(model: nnx.Module, *shapes: Any) -> nnx.Module:
    """An abstract copy of ``model`` whose variables have the shapes in ``shapes``, its layers' sizes set to match.

    How a collapsed model is rebuilt without a constructor that knows its
    widths: ``model`` is the original (abstract is fine, e.g. from
    ``nnx.eval_shape``), each of ``shapes`` a pure dict like ``nnx.to_pure_dict(nnx.state(model))``
    holding arrays or ``jax.ShapeDtypeStruct`` of the collapsed shapes (e.g.
    the arrays of a saved collapsed model). Each Flax layer's size attributes
    (``in_features``, ``num_heads``, ...) are set from its variables as
    :func:`collapse` sets them. Paths ``shapes`` lacks keep ``model``'s shapes.

    Raises:
      ValueError: a layer cannot take the shapes (see :func:`collapse`).
    """
    graphdef, state = nnx.split(model)
    struct = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype)  # noqa: E731
    nnx.replace_by_pure_dict(state, jax.tree.map(struct, nnx.to_pure_dict(state)))
    for tree in shapes:
        nnx.replace_by_pure_dict(state, jax.tree.map(struct, tree))
    target = nnx.merge(graphdef, state)
    olds = _modules(model)
    for path, new in _modules(target).items():
        _set_sizes(olds[path], new, "/".join(map(str, path)) or type(new).__name__)
    return target


def collapse(
    model: nnx.Module,
    masks: Masks,
    specs: Specs | Discovery,
    *,
    state_specs: Specs | None = None,
    rebuild: bool | None = None,
    check: Sequence[Any] | None = None,
    rtol: float = 1e-5,
) -> nnx.Module:
    """A new, smaller model without the pruned channels, equal to :func:`masked`'s.

    Runs on the host, outside ``jit`` (it changes shapes); the input model is
    not modified. See the module docstring for how channels are chosen, why
    a group that keeps nothing keeps one zeroed channel, and how the smaller
    module is built.

    Args:
      model: an ``nnx.Module``, e.g. from :func:`admmprune.models.get`.
      masks: boolean masks shaped like ``nnx.state(model, nnx.Param)``
        (``None`` = unmasked), e.g. the second output of
        :func:`admmprune.hard_prune`. Masks of non-channel specs are applied
        (zeroed) but remove nothing.
      specs: the parameters' spec tree, or the :class:`Discovery` of
        :func:`admmprune.structure.discovery.discover_nnx` (which also supplies
        ``state_specs``). Parameters without a channel group keep their shape.
      state_specs: specs of the non-``Param`` state (BatchNorm running
        statistics), as :attr:`Discovery.state_specs`; needed when groups
        reach BatchNorm statistics and ``specs`` is not a ``Discovery``.
      rebuild: ``None``: rebuild registered models from their ``config`` and
        copy other modules structurally; ``False``: always copy structurally;
        ``True``: require a registered model.
      check: example inputs (a tuple of arguments): the collapsed model and
        :func:`masked`'s are called on them, in evaluation mode, and must
        agree, or no model is returned. This catches what the structure
        cannot show, such as a scale the model computes from a pruned
        dimension (attention's ``1 / sqrt(head_dim)``).
      rtol: the tolerance of ``check``: the largest absolute difference of the
        outputs, relative to the largest absolute output of the masked model.

    Returns:
      A new module of the same class. For a registered model its ``config``
      and ``widths`` have the collapsed widths.

    Raises:
      ValueError: if the collapsed variables do not fit the rebuilt model (a
        group that breaks a width constraint of the architecture, or missing
        ``state_specs``), or a layer cannot change its channels, or (with
        ``check``) the collapsed model computes another function.

    Examples:
      >>> found = discover_nnx(model, x)
      >>> _, masks = admmprune.hard_prune(nnx.state(model, nnx.Param), found.specs, 0.5)
      >>> small = collapse(model, masks, found)
      >>> np.allclose(small(x), masked(model, masks, found)(x), rtol=1e-5, atol=1e-5)
      True
    """
    specs, state_specs = _split_specs(specs, state_specs)
    name = None if rebuild is False else _registered_name(model)
    if rebuild and name is None:
        raise ValueError(f"{type(model).__name__} is not a registered model with config, widths and width layers")

    _, params, rest = nnx.split(model, nnx.Param, ...)
    alive = alive_channels(specs, masks)
    removable = removable_groups(model, specs, params) if name is not None else set()
    kept = _with_stand_ins(alive, removable)
    zeroed = _zeroed(params, specs, masks)
    params = slice_channels(zeroed, specs, kept)
    while removable:  # a removable group that only feeds removed channels is dead too
        dead = _unread_groups(params, specs, removable, kept)
        if not dead:
            break
        kept.update({g: np.zeros_like(kept[g]) for g in dead})
        params = slice_channels(zeroed, specs, kept)
    rest = slice_channels(rest, state_specs, kept)

    if name is not None:
        target = _rebuild(model, name, params)
        how = f"rebuilt from {type(model).__name__}'s config"
        # A removed branch's variables are empty, and the rebuilt model has none there.
        params, rest = (_drop_empty(s, target) for s in (params, rest))
    else:
        target = _restructure(model, params, rest)
        how = f"copied from {type(model).__name__}"
    _check_shapes(target, (params, rest), how)
    nnx.update(target, params, rest)
    _copy_mode(model, target)
    if check is not None:
        _check_equal(masked(model, masks, specs), target, tuple(check), rtol)
    return target


def _check_equal(reference: nnx.Module, collapsed: nnx.Module, args: tuple, rtol: float) -> None:
    """Raises unless ``collapsed(*args)`` equals ``reference(*args)`` (eval mode) within ``rtol``."""
    outputs = []
    for m in (reference, collapsed):
        m = nnx.merge(*nnx.split(m), copy=True)
        m.eval()
        outputs.append(m(*args))
    _check_close(*outputs, rtol)


def _check_close(reference: Any, collapsed: Any, rtol: float) -> None:
    """Raises unless the output trees agree within ``rtol`` of the reference's largest magnitude."""
    worst, scale = 0.0, 0.0
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(collapsed), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise ValueError(f"the collapsed model's output has shape {b.shape}, the masked model's {a.shape}")
        worst, scale = (
            max(worst, float(np.max(np.abs(a - b), initial=0.0))),
            max(scale, float(np.max(np.abs(a), initial=0.0))),
        )
    if not worst <= rtol * max(scale, np.finfo(np.float32).tiny):
        raise ValueError(
            f"the collapsed model computes another function than the masked one: outputs differ by up to "
            f"{worst:.3g} where they reach {scale:.3g} (check, rtol={rtol:g}); something the model computes "
            "from a pruned dimension (e.g. attention's 1/sqrt(head_dim) scale, a mean over channels) changed "
            "with it: exclude that group from pruning (overrides) or fold the factor into a kernel"
        )


def collapse_linen(
    model: Any,
    variables: Any,
    masks: Masks,
    specs: Specs | Discovery,
    rebuild: Callable[[dict[str, int]], Any],
    *example: Any,
    rtol: float = 1e-5,
) -> tuple[Any, Any]:
    """A smaller Linen model and its variables, checked equal to the masked model.

    Linen modules are descriptions whose widths are constructor attributes,
    so admmprune cannot resize them itself: ``rebuild`` does, from the kept
    widths. The pruned channels are cut out of ``variables`` (every
    collection: BatchNorm statistics too) with :func:`slice_channels`, the
    variables of ``rebuild``'s module are compared with them (shapes, from
    ``init`` under ``jax.eval_shape``), and both models are run on
    ``example``: nothing is returned unless they compute the same function.

    Args:
      model: the Linen module as trained (``model.apply(variables, *example)``
        runs it; bind other arguments with a module attribute or
        ``functools.partial`` in ``rebuild``'s result).
      variables: its variables dict (``{"params": ..., "batch_stats": ...}``),
        pruned or not: ``masks`` are applied here.
      masks: masks shaped like ``variables["params"]`` (``None`` =
        unmasked), e.g. from :func:`admmprune.hard_prune`.
      specs: the spec tree of the whole variables dict, or its
        :class:`Discovery` (``discover(model.apply, variables, x)``).
      rebuild: ``rebuild(widths)`` returns the smaller module; ``widths`` is
        ``{group: kept channels}`` for every group (e.g.
        ``{"params/Conv_0": 4, ...}``). A group that keeps nothing keeps one
        zeroed channel, as in :func:`collapse`.
      *example: inputs of ``model.apply``, on which both models must agree.
      rtol: the tolerance of that check, as in :func:`collapse`.

    Returns:
      ``(small_model, small_variables)``.

    Raises:
      ValueError: ``rebuild``'s module has variables of other shapes (the
        message names them) or computes another function.

    Examples:
      >>> found = discover(model.apply, variables, x)
      >>> params, masks = admmprune.hard_prune(variables["params"], found.specs["params"], 0.5)
      >>> small, small_vars = collapse_linen(
      ...     model, {**variables, "params": params}, masks, found,
      ...     lambda w: Net(widths=(w["params/Conv_0"], w["params/Conv_1"])), x)
    """
    specs, _ = _split_specs(specs, None)
    kept = _with_stand_ins(alive_channels(specs["params"], masks))
    masked_vars = {**variables, "params": _zeroed(variables["params"], specs["params"], masks)}
    small_vars = slice_channels(masked_vars, specs, kept)
    groups = channel_groups(specs["params"])
    widths = {g.name: int(kept[g.name].sum()) if g.name in kept else g.channels for g in groups}
    small = rebuild(widths)
    built = jax.eval_shape(small.init, jax.random.key(0), *example)
    problems = _shape_problems(_shapes(built), _shapes(small_vars))
    if problems:
        raise ValueError(
            f"rebuild(widths) built a {type(small).__name__} whose variables do not fit the collapsed ones "
            f"(widths {widths}):\n  " + "\n  ".join(problems[:10])
        )
    _check_close(model.apply(masked_vars, *example), small.apply(small_vars, *example), rtol)
    return small, small_vars


__all__ = [
    "alive_channels",
    "collapse",
    "collapse_linen",
    "consistent_masks",
    "masked",
    "removable_groups",
    "reshaped",
    "slice_channels",
]
