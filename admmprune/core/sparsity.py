"""Structured-sparsity sets and the rules that assign them to parameters (L1).

A *spec* names a constraint set S for one parameter. Each spec splits a tensor
into *groups* (channels, columns, blocks, single weights); the set is "at most
k groups non-zero", with ``k = keep_ratio * num_groups`` (see
:func:`admmprune.core.projections.num_kept`). ``NofM`` is the exception: its set is
fixed, at most ``n`` non-zeros in every ``m`` consecutive weights. The
``Unstructured``, ``Column`` and ``Block`` specs of several parameters may
share a ``group`` name: they are then one set, their groups ranked together
(global rather than layer-wise magnitude pruning).

Axes follow Flax's kernel layout: a dense kernel is ``(in, out)`` and a conv
kernel is ``(*window, in, out)``, so output channels (filters) are the last
axis and input channels the one before.

Specs are frozen dataclasses rather than NamedTuples on purpose: a NamedTuple
is a pytree node, so an empty ``Filter()`` would vanish from a spec tree
under ``jax.tree.map``. A frozen dataclass is a leaf, hashable, and static
under ``jax.jit``.

Parameters get specs from regex *rules* over their ``/``-joined paths, first
match wins (as in big_vision's ``make_mask_trees``); ``None`` means "not
pruned".
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from admmprune._types import Params, Specs, is_none, path_str


@dataclasses.dataclass(frozen=True)
class Unstructured:
    """Every weight is its own group: keep the ``k`` largest magnitudes.

    Args:
      group: parameters whose specs share a ``group`` name are one set: the
        ``k`` largest magnitudes of all their weights together are kept
        (global magnitude pruning), ``k`` from the first one's keep ratio.
        ``None``: the parameter is a set of its own.
    """

    group: str | None = None

    def num_groups(self, shape: Sequence[int]) -> int:
        """The number of groups this spec splits a tensor of ``shape`` into."""
        return math.prod(shape)


class _ChannelGeometry:
    """The geometry that :class:`Filter` and :class:`Channel` share: which
    entries of a tensor each channel owns. Every module that needs it asks the
    spec, so that it is written once."""

    axis: int
    repeat: int
    offset: int
    size: int | None

    def channel_layout(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """``(axis, repeat, C)`` for a tensor of ``shape``: the channel axis
        (non-negative), the repeat, and ``C``, all channels of the axis (also
        those outside the ``offset``/``size`` slice)."""
        axis = self.axis % len(shape)
        return axis, self.repeat, shape[axis] // self.repeat

    def channel_slice(self, channels: int) -> slice:
        """The channels this spec covers, of the axis's ``channels``."""
        return slice(self.offset, channels if self.size is None else self.offset + self.size)

    @property
    def sliced(self) -> bool:
        """Whether the spec covers only part of the axis's channels."""
        return self.offset != 0 or self.size is not None

    def num_groups(self, shape: Sequence[int]) -> int:
        """The number of channels the spec covers on a tensor of ``shape``."""
        channels = self.channel_layout(shape)[2]
        return len(range(channels)[self.channel_slice(channels)])


@dataclasses.dataclass(frozen=True)
class Filter(_ChannelGeometry):
    """Output channels: a group is one slice along ``axis`` (default: last).

    Args:
      axis: the channel axis; ``-1`` is a Flax kernel's output axis, and also
        the only axis of a bias or normalization vector.
      group: parameters whose specs share a ``group`` name are pruned
        *jointly*: one importance score per channel summed over all of them,
        and the same channels removed from each. A layer's kernel (``Filter``),
        its bias (``Filter``) and the next layer's kernel (``Channel``) form
        such a group, so that the pruned channels can be physically removed.
      repeat: the axis has ``repeat * C`` entries and channel ``c`` owns the
        entries ``c, c + C, c + 2C, ...`` (``axis`` viewed as ``(repeat, C)``).
        A dense layer fed by a flattened ``(H, W, C)`` feature map has
        ``repeat = H * W`` on its input axis.
      offset: the spec covers only channels ``offset .. offset + size - 1``
        of the ``C`` channels (after the ``repeat`` view). A layer that reads
        the concatenation of two branches has one such slice per branch, each
        in its branch's group. Entries outside the slice are not constrained:
        its masks are ``True`` there, so that the slices of a :class:`Coupled`
        spec combine by ``&``.
      size: the number of channels of that slice; ``None``: up to the end.
    """

    axis: int = -1
    group: str | None = None
    repeat: int = 1
    offset: int = 0
    size: int | None = None


@dataclasses.dataclass(frozen=True)
class Channel(_ChannelGeometry):
    """Input channels: a group is one slice along ``axis`` (default: ``-2``).

    Takes the same arguments as :class:`Filter`; only the default axis
    differs. ``Channel(axis=-2, repeat=H * W)`` on a dense kernel that reads a
    flattened ``(H, W, C)`` map removes whole channels of that map.
    """

    axis: int = -2
    group: str | None = None
    repeat: int = 1
    offset: int = 0
    size: int | None = None


@dataclasses.dataclass(frozen=True)
class Column:
    """Shape-wise sparsity (StructADMM's columns): one group per position of a
    conv kernel's window and input channel, spanning all output channels.

    For a kernel of shape ``(*window, in, out)`` there are ``prod(window) * in``
    groups; for a dense kernel this equals :class:`Channel`.

    Args:
      group: parameters whose specs share a ``group`` name are one set: the
        ``k`` columns of largest norm among all of theirs are kept (as
        :class:`Unstructured`'s ``group``).
    """

    group: str | None = None

    def num_groups(self, shape: Sequence[int]) -> int:
        """The number of groups this spec splits a tensor of ``shape`` into."""
        return math.prod(shape[:-1])


@dataclasses.dataclass(frozen=True)
class NofM:
    """At most ``n`` non-zeros in every ``m`` consecutive weights along ``axis``
    (the reduction axis: ``-2``, input channels, for Flax kernels).

    The set does not depend on ``keep_ratio``. When the axis length is not a
    multiple of ``m`` the last block is shorter and keeps at most ``n``.
    """

    n: int
    m: int
    axis: int = -2


@dataclasses.dataclass(frozen=True)
class Block:
    """Rectangular tiles: a group is one block of ``shape`` on the trailing axes.

    ``shape`` aligns with the last ``len(shape)`` axes; leading axes have block
    size 1. Edge blocks of axes that ``shape`` does not divide are smaller.

    Args:
      shape: the block's sizes on the trailing axes.
      group: parameters whose specs share a ``group`` name are one set: the
        ``k`` blocks of largest norm among all of theirs are kept (as
        :class:`Unstructured`'s ``group``).
    """

    shape: tuple[int, ...]
    group: str | None = None

    def block_sizes(self, shape: Sequence[int]) -> list[int]:
        """The block's size on every axis of ``shape`` (1 on the leading axes)."""
        lead = len(shape) - len(self.shape)
        return [1] * lead + [min(b, n) for b, n in zip(self.shape, shape[lead:], strict=True)]

    def num_groups(self, shape: Sequence[int]) -> int:
        """The number of blocks (edge blocks included) of a tensor of ``shape``."""
        return math.prod(-(-n // b) for n, b in zip(shape, self.block_sizes(shape), strict=True))


@dataclasses.dataclass(frozen=True)
class Coupled:
    """A parameter that belongs to several channel groups at once.

    The middle layer of a chain is both the consumer of the previous layer's
    channels and the producer of its own: its kernel is
    ``Coupled((Channel(group="conv1"), Filter(group="conv2")))``. Each group is
    scored and selected on its own, and the parameter keeps what every one of
    its groups keeps. When no parameter is in two groups, :func:`project_tree
    <admmprune.core.projections.project_tree>` is the exact Euclidean projection;
    with shared parameters, the per-group selection is the usual structured-
    pruning approximation (the exact joint projection is combinatorial).
    """

    specs: tuple[Filter | Channel, ...]

    def __post_init__(self):
        if not self.specs or not all(isinstance(s, (Filter, Channel)) and s.group is not None for s in self.specs):
            raise ValueError("Coupled takes Filter/Channel specs that each name a group")


Spec = Unstructured | Filter | Channel | Column | NofM | Block | Coupled
SPEC_TYPES = (Unstructured, Filter, Channel, Column, NofM, Block, Coupled)
#: Specs whose groups are channels and can therefore be pruned jointly.
CHANNEL_SPECS = (Filter, Channel)
#: Specs of single weights, columns or blocks that a ``group`` name ranks
#: jointly over several parameters.
JOINT_SPECS = (Unstructured, Column, Block)

Rule = tuple[str, Spec | None]

#: Output layers by their usual names; their units are never pruned.
OUTPUT_PATTERN = r"(^|/)(head|output|out|logits|classifier)(/|$)"

#: The default plan: filters of every ``kernel`` are pruned, except those of a
#: layer named like an output layer. Biases, normalization scales/offsets and
#: statistics, embeddings and anything else match no rule and are not pruned
#: on their own. Use :func:`default_rules` to name a model's output layer.
DEFAULT_RULES: tuple[Rule, ...] = (
    (OUTPUT_PATTERN, None),
    (r"(^|/)kernel$", Filter()),
)


def default_rules(output: str | Sequence[str] = ()) -> tuple[Rule, ...]:
    """The default rules, also leaving the named output layer(s) unpruned.

    Args:
      output: layer name(s), i.e. path components such as ``"fc2"``, of the
        network's output layers.

    Returns:
      Rules for :func:`resolve`.
    """
    names = [output] if isinstance(output, str) else list(output)
    extra = tuple((rf"(^|/){re.escape(n)}(/|$)", None) for n in names)
    return extra + DEFAULT_RULES


def is_spec(x: Any) -> bool:
    """``is_leaf`` predicate for spec trees: a spec or ``None``."""
    return x is None or isinstance(x, SPEC_TYPES)


def _check_axis(axis: int, ndim: int, what: str) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"{what}: axis {axis} is out of range for a {ndim}-d tensor")
    return axis % ndim


def validate(spec: Spec | None, shape: tuple[int, ...], path: str = "") -> None:
    """Raises ``ValueError`` if ``spec`` cannot constrain a tensor of ``shape``."""
    where = f"{path or 'parameter'} {tuple(shape)} with {spec}"
    if spec is None or isinstance(spec, (Unstructured,)):
        return
    if not shape:
        raise ValueError(f"{where}: scalars cannot be pruned structurally")
    if isinstance(spec, CHANNEL_SPECS):
        axis = _check_axis(spec.axis, len(shape), where)
        if spec.repeat < 1 or shape[axis] % spec.repeat:
            raise ValueError(f"{where}: repeat={spec.repeat} does not divide axis size {shape[axis]}")
        channels = spec.channel_layout(shape)[2]
        stop = spec.channel_slice(channels).stop
        if spec.offset < 0 or (spec.size is not None and spec.size < 1) or stop > channels or stop <= spec.offset:
            raise ValueError(
                f"{where}: channels [{spec.offset}, {stop}) are not a non-empty slice of the {channels} channels"
            )
    elif isinstance(spec, Column):
        if len(shape) < 2:
            raise ValueError(f"{where}: Column needs a kernel with at least 2 axes")
    elif isinstance(spec, NofM):
        _check_axis(spec.axis, len(shape), where)
        if not 1 <= spec.n <= spec.m:
            raise ValueError(f"{where}: NofM needs 1 <= n <= m")
    elif isinstance(spec, Coupled):
        for member in spec.specs:
            validate(member, shape, path)
    elif isinstance(spec, Block):
        if not spec.shape or len(spec.shape) > len(shape) or min(spec.shape) < 1:
            raise ValueError(f"{where}: block shape must have 1..{len(shape)} positive sizes")
    else:
        raise TypeError(f"{where}: not a sparsity spec")


def resolve(params: Params, rules: Sequence[Rule] = DEFAULT_RULES) -> Specs:
    """Assigns a spec (or ``None``) to every parameter by the first matching rule.

    Args:
      params: a pytree of arrays (or ``jax.ShapeDtypeStruct``).
      rules: ``(regex, spec)`` pairs; ``re.search`` against the ``/``-joined
        path, first match wins; unmatched parameters get ``None``.

    Returns:
      A spec tree shaped like ``params``.

    Raises:
      ValueError: if a matched spec does not fit its parameter's shape.
    """
    compiled = [(re.compile(pattern), spec) for pattern, spec in rules]

    def pick(path, leaf):
        name = path_str(path)
        for pattern, spec in compiled:
            if pattern.search(name):
                validate(spec, tuple(np.shape(leaf)), name)
                return spec
        return None

    return jax.tree_util.tree_map_with_path(pick, params)


def format_plan(params: Params, specs: Specs) -> str:
    """A table of every parameter, its shape and its spec, for logging once."""
    rows = [("parameter", "shape", "spec", "groups")]
    flat_specs, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    flat_params = treedef.flatten_up_to(params)
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]]
    for name, leaf, spec in zip(paths, flat_params, flat_specs, strict=True):
        shape = tuple(np.shape(leaf))
        if spec is None or isinstance(spec, NofM):
            groups = "-"
        elif isinstance(spec, Coupled):
            groups = "x".join(str(m.num_groups(shape)) for m in spec.specs)
        else:
            groups = str(spec.num_groups(shape))
        rows.append((name, "x".join(map(str, shape)) or "()", "not pruned" if spec is None else repr(spec), groups))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


__all__ = [
    "DEFAULT_RULES",
    "Block",
    "Channel",
    "Column",
    "Coupled",
    "Filter",
    "NofM",
    "Spec",
    "Unstructured",
    "default_rules",
    "format_plan",
    "is_none",
    "is_spec",
    "resolve",
    "validate",
]
