r"""Channel gates: one multiplier per channel of every coupled group (layer L2).

Gate-based pruning methods (network slimming on explicit gates, L1-masked
training, differentiable channel search) learn a scalar :math:`g_c` per
channel and remove the channels whose gate ends at zero. Here the gates are
not layers added to the model: :func:`apply` reparametrizes the parameters,
so the model code is untouched and any function of the parameters (an NNX
``State``, a Linen dict) can be gated::

    logits = model_fn(gates.apply(params, g, specs), x)

Where a gate acts. A group's channel is produced by its ``Filter`` members
(see :mod:`admmprune.core.sparsity`); the gate multiplies the *last affine map*
that produces the channel, so that the channel's value is multiplied by
:math:`g_c`:

* a normalization layer (a ``scale`` leaf, with the ``bias`` leaf next to
  it) in the group is gated on its ``scale`` and ``bias`` entries: it would
  undo (in training mode) a scaling of the conv before it, and
  :math:`g\,(\gamma \hat x + \beta)` is exact in both modes;
* a producing kernel that no normalization of the group follows is gated on
  its output slice (the kernel's last axis) and its bias. "Follows" is read
  off the paths: a norm of the group in the same module as the kernel's layer
  (``stem/conv/kernel`` and ``stem/bn/scale``, ``conv3/kernel`` and
  ``bn3/scale``) normalizes it. A kernel wrongly taken as unnormalized is
  gated twice, which still gives the identity at :math:`g = 1` and an exact
  zero at :math:`g = 0`.

A residual group (several producers added together) gates every branch, so
the sum is scaled. A channel that passes through two gated maps (a depthwise
conv and its norm after the expand conv's norm) is scaled twice
(:math:`g^2` between them); 0 and 1 are still exact.

Why a zero gate removes the channel exactly: the gated map outputs exactly 0
on that channel (:math:`0 \cdot \gamma \hat x + 0 \cdot \beta = 0`, in
training and evaluation mode), a ReLU (or any map with :math:`f(0) = 0`)
after it keeps it 0, and every consumer then reads zeros, exactly what the
model with the group's channel masked out (:func:`keep_masks`,
:func:`admmprune.core.projections.apply_masks`) computes. Gates between 0 and 1
are the continuous relaxation; with a ReLU after, :math:`\mathrm{relu}(g y)
= g\,\mathrm{relu}(y)` for :math:`g \ge 0`, so the gate scales the channel's
activation.

Everything here is pure, jittable and differentiable with respect to the
gates; the site selection reads only paths and runs at trace time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from admmprune._types import Masks, Params, Specs
from admmprune.core.groups import NORM_SCALE, channel_groups, memberships
from admmprune.core.projections import expand_groups
from admmprune.core.sparsity import Filter, is_spec

#: Gates, logits or keep values: ``{group name: (C,) array}``.
Gates = Mapping[str, jax.Array]

_BIAS = "bias"


def norm_scales(specs: Specs) -> dict[str, list[tuple[int, Filter]]]:
    """``{group: [(flat leaf index, Filter)]}`` of the normalization scales in each group.

    A normalization scale is a ``Filter`` member whose path ends in
    ``scale`` (BatchNorm, LayerNorm, GroupNorm, RMSNorm); see
    :attr:`admmprune.core.groups.ChannelGroup.norm_scales`. Groups without
    one are left out.
    """
    return {g.name: [(m.leaf, m.spec) for m in g.norm_scales] for g in channel_groups(specs) if g.norm_scales}


def gate_sites(specs: Specs) -> dict[str, list[tuple[int, Filter]]]:
    """``{group: [(flat leaf index, Filter)]}``: where each group's gate is multiplied in.

    See the module docstring for the rule (normalization ``scale``/``bias``
    of the group, plus the output slice and bias of every producing kernel
    that no norm of the group follows).

    Raises:
      ValueError: if a group has a ``bias`` member that is neither next to a
        norm ``scale`` of the group nor next to a producing kernel (a
        normalization without scale: gating its offset alone would not scale
        the channel).
    """
    out: dict[str, list[tuple[int, Filter]]] = {}
    for group in channel_groups(specs):
        producers = group.producers
        norms = {m.module for m in group.norm_scales}
        # A norm's owner: the module that holds both the norm and the layer it follows.
        norm_owners = {n.rpartition("/")[0] for n in norms}
        sites = []
        for m in producers:
            parent = m.module
            if m.is_norm_scale:
                sites.append((m.leaf, m.spec))
            elif m.leaf_name == _BIAS:
                if parent in norms:
                    sites.append((m.leaf, m.spec))
                    continue
                kernel = next(
                    (p for p in producers if p.module == parent and p.leaf_name not in (_BIAS, NORM_SCALE)), None
                )
                if kernel is None:
                    raise ValueError(
                        f"group {group.name!r}: {m.path} is neither a norm's offset next to a scale nor a layer's "
                        "bias next to its kernel; a normalization without scale cannot be gated"
                    )
                if parent.rpartition("/")[0] not in norm_owners:
                    sites.append((m.leaf, m.spec))
            elif parent.rpartition("/")[0] not in norm_owners:
                sites.append((m.leaf, m.spec))
        out[group.name] = sites
    return out


def _channel_factor(g: jax.Array, spec: Filter, shape: tuple[int, ...]) -> jax.Array:
    """``g`` laid along ``spec``'s axis (1 outside its slice), broadcastable to ``shape``."""
    axis, repeat, channels = spec.channel_layout(shape)
    sl = spec.channel_slice(channels)
    v = jnp.pad(g, (sl.start, channels - sl.stop), constant_values=1)
    v = jnp.tile(v, repeat)
    return v.reshape([-1 if a == axis else 1 for a in range(len(shape))])


def _check_names(gates: Gates, groups: Mapping[str, Any]) -> None:
    unknown = sorted(set(gates) - set(groups))
    if unknown:
        raise ValueError(f"gates for groups the specs do not have: {unknown}")


def init(params: Params, specs: Specs, value: float = 1.0) -> dict[str, jax.Array]:
    """One float32 gate per channel of every coupled group, all equal to ``value``.

    Use ``value=1.0`` for gates that multiply directly, or a logit such as
    ``3.0`` for :func:`sigmoid_gates`.

    Returns:
      ``{group: (C,) array}`` in the order of
      :func:`admmprune.core.groups.channel_groups`.

    Raises:
      ValueError: if a group's members disagree on the channel count.
    """
    return {g.name: jnp.full((g.channels,), value, jnp.float32) for g in channel_groups(specs, params)}


def apply(params: Params, gates: Gates, specs: Specs) -> Params:
    """Multiplies every gated group's channel output by its gate.

    See the module docstring for where the gate acts and why a zero gate is
    an exact removal. Groups missing from ``gates`` are not gated. The factor
    is cast to each parameter's dtype; gradients flow to ``gates`` (and to
    ``params``).

    Args:
      params: the parameters (any pytree shaped like ``specs``).
      gates: ``{group: (C,) array}``, e.g. from :func:`init`.
      specs: the spec tree with coupled groups (``graph.chain_specs`` or
        ``discovery.discover_nnx(...).specs``).

    Returns:
      A tree shaped like ``params``.

    Raises:
      ValueError: if ``gates`` names a group the specs lack, or see
        :func:`gate_sites`.
    """
    sites = gate_sites(specs)
    _check_names(gates, sites)
    _, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    leaves = treedef.flatten_up_to(params)
    factors: list[Any] = [None] * len(leaves)
    for group, members in sites.items():
        if group not in gates:
            continue
        g = jnp.asarray(gates[group])
        for i, m in members:
            f = _channel_factor(g, m, jnp.shape(leaves[i]))
            factors[i] = f if factors[i] is None else factors[i] * f
    out = [x if f is None else x * f.astype(x.dtype) for x, f in zip(leaves, factors, strict=True)]
    return treedef.unflatten(out)


def fold(params: Params, gates: Gates, specs: Specs) -> Params:
    """Bakes final gates into the weights: the result computes what the gated model does.

    The same map as :func:`apply`; call it once after training, then mask
    the channels to remove (:func:`keep_masks` of ``gate > threshold``) and
    collapse. A channel whose gate is exactly 0 is already zero where it is
    produced; one below a non-zero threshold is removed with a small error.
    """
    return apply(params, jax.tree.map(jax.lax.stop_gradient, dict(gates)), specs)


def keep_masks(params: Params, specs: Specs, keep: Gates) -> Masks:
    """Boolean masks that remove the channels ``keep`` drops from every member of their group.

    Args:
      params: the parameters (only shapes are read).
      specs: the spec tree.
      keep: ``{group: (C,) bool}``; groups missing from it keep everything.

    Returns:
      Masks shaped like ``params``: an array for every leaf in a coupled
      group (``True`` = kept), ``None`` elsewhere. For
      :func:`admmprune.core.projections.apply_masks`, :func:`admmprune.keep_masked`
      and ``collapse.collapse``.
    """
    groups = channel_groups(specs)
    _check_names(keep, {g.name: g for g in groups})
    out = []
    for x, spec in zip(groups.flatten(params), groups.specs, strict=True):
        members = memberships(spec)
        if not members:
            out.append(None)
            continue
        shape = jnp.shape(x)
        m = jnp.ones(shape, jnp.bool_)
        for member in members:
            if member.group in keep:
                m = m & expand_groups(jnp.asarray(keep[member.group], jnp.bool_), member, shape)
        out.append(m)
    return groups.unflatten(out)


# --- penalties on gates --------------------------------------------------------


def _total(tree: Any, fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    return sum((jnp.sum(fn(jnp.asarray(g, jnp.float32))) for g in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


def l1(gates: Gates) -> jax.Array:
    r""":math:`\sum_c |g_c|` over every gate (network slimming's sparsity term).

    References:
      Liu et al., "Learning Efficient Convolutional Networks through Network
      Slimming", ICCV 2017.
    """
    return _total(gates, jnp.abs)


def sigmoid_gates(logits: Gates, temperature: float | jax.Array = 1.0) -> dict[str, jax.Array]:
    r"""Gates :math:`g = \sigma(s / T)` in :math:`(0, 1)` from free logits :math:`s`.

    A lower temperature :math:`T` makes the gates closer to 0/1 for the same
    logits; annealing it towards 0 hardens the relaxation.
    """
    t = jnp.asarray(temperature, jnp.float32)
    return {k: jax.nn.sigmoid(jnp.asarray(s, jnp.float32) / t) for k, s in logits.items()}


def polarization(gates: Gates) -> jax.Array:
    r""":math:`\sum_c g_c (1 - g_c)`: zero at gates of 0 or 1, largest at 1/2.

    Added to the loss it pushes gates in :math:`[0, 1]` (e.g. from
    :func:`sigmoid_gates`) to either end, so that thresholding at the end of
    training changes little. The product form is the bimodal regularizer of
    Srinivas et al.; Zhuang et al. polarize unbounded scaling factors with
    :math:`t\|g\|_1 - \|g - \bar g\|_1` instead.

    References:
      Srinivas, Subramanya and Babu, "Training Sparse Neural Networks",
      CVPR Workshops 2017.
      Zhuang et al., "Neuron-level Structured Pruning using Polarization
      Regularizer", NeurIPS 2020.
    """
    return _total(gates, lambda g: g * (1 - g))


def flops_penalty(
    gates: Gates,
    macs_model: Callable[[Gates], jax.Array],
    target_macs: float | jax.Array,
    *,
    one_sided: bool = True,
) -> jax.Array:
    r"""A compute-budget term on the gated multiply-accumulates.

    With :math:`r = \mathrm{MACs}(g) / \mathrm{target} - 1`, the penalty is
    :math:`\max(r, 0)^2` (``one_sided``: no pull once under budget, so the
    task loss alone decides which channels to keep there) or :math:`r^2`
    (two-sided: pins the gated model at the budget). Relative to the target,
    so its scale does not depend on the network's size.

    Args:
      gates: ``{group: (C,)}`` soft keep values in :math:`[0, 1]`.
      macs_model: ``keep -> scalar``, e.g.
        ``functools.partial(costs.gated_macs, macs, specs=specs)``.
      target_macs: the budget, in the units of ``macs_model``.
      one_sided: see above.
    """
    r = macs_model(gates) / jnp.asarray(target_macs, jnp.float32) - 1
    return jnp.square(jax.nn.relu(r) if one_sided else r)


__all__ = [
    "Gates",
    "apply",
    "flops_penalty",
    "fold",
    "gate_sites",
    "init",
    "keep_masks",
    "l1",
    "norm_scales",
    "polarization",
    "sigmoid_gates",
]
