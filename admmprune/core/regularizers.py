r"""Sparsity-inducing penalties as optax gradient transformations (layer L2).

Like ``optax.add_decayed_weights``, each transformation adds the (sub)gradient
of a penalty to the updates and needs ``params``; chain it before the
optimizer::

    tx = optax.chain(regularizers.group_lasso(specs, 1e-4), optax.sgd(0.1, 0.9))

A *group* is what a spec tree prunes as one unit: a channel of a coupled
group spans every member (the producer's kernel column and bias, the
normalization entries, the consumers' input rows), and a leaf with a spec but
no group name has its own groups (:func:`admmprune.core.projections.to_groups`).
``NofM`` leaves have no groups and are left alone.

The strength lives in the state (:class:`PenaltyState`), so it can be ramped
between steps without recompiling (:func:`set_strength`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from admmprune._types import Params, Specs
from admmprune.core.groups import channel_groups
from admmprune.core.projections import expand_groups, from_groups, to_groups
from admmprune.core.sparsity import NofM, is_spec


class PenaltyState(NamedTuple):
    """State of :func:`group_lasso` and :func:`bn_l1`: the penalty's strength (float32)."""

    strength: jax.Array


class ProxState(NamedTuple):
    """State of :func:`group_lasso_prox`: steps taken, for a schedule of the threshold."""

    count: jax.Array


def _families(specs: Specs) -> list[list[tuple[int, Any]]]:
    """The groups of the spec tree as lists of ``(flat leaf index, spec)`` members.

    A coupled group is one family whose channel ``c`` spans all its members;
    every other spec'd leaf (but ``NofM``) is a family of one member.
    """
    groups = channel_groups(specs)
    families = [[(m.leaf, m.spec) for m in g.members] for g in groups]
    families += [[(i, groups.specs[i])] for i in groups.outside() if not isinstance(groups.specs[i], NofM)]
    return families


def _norms(leaves: list[Any], members: list[tuple[int, Any]]) -> tuple[jax.Array, int]:
    """``(||w_c||_2 per group, entries per group)`` in float32, over all members."""
    rows = [to_groups(leaves[i], spec).astype(jnp.float32) for i, spec in members]
    sq = sum(jnp.sum(r * r, axis=1) for r in rows)
    return jnp.sqrt(sq), sum(r.shape[1] for r in rows)


def _need_params(name: str, params: Any) -> None:
    if params is None:
        raise ValueError(f"{name} needs the current parameters: call update(grads, state, params)")


def group_lasso_penalty(params: Params, specs: Specs) -> jax.Array:
    r"""The group lasso :math:`\sum_g \sqrt{n_g}\, \|w_g\|_2` over every group of ``specs``.

    :math:`n_g` is the number of entries of group :math:`g` (over all members
    of a coupled group), so that large and small groups are penalized alike
    (Yuan and Lin). Unscaled: :func:`group_lasso` multiplies it by its
    strength.

    References:
      Yuan and Lin, "Model Selection and Estimation in Regression with Grouped
      Variables", JRSS B 2006.
      Wen et al., "Learning Structured Sparsity in Deep Neural Networks",
      NeurIPS 2016.
    """
    _, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    leaves = treedef.flatten_up_to(params)
    total = jnp.zeros((), jnp.float32)
    for members in _families(specs):
        norms, size = _norms(leaves, members)
        total = total + jnp.sqrt(jnp.float32(size)) * jnp.sum(norms)
    return total


def _added_gradient(specs: Specs, strength: Any, name: str, terms: Any) -> optax.GradientTransformationExtraArgs:
    """Adds ``terms(leaves, strength) -> [(flat leaf index, gradient)]`` to the updates."""
    _, treedef = jax.tree.flatten(specs, is_leaf=is_spec)

    def init_fn(params: Params) -> PenaltyState:
        del params
        return PenaltyState(jnp.asarray(strength, jnp.float32))

    def update_fn(updates, state: PenaltyState, params: Params | None = None, **extra_args):
        del extra_args
        _need_params(name, params)
        grads = list(treedef.flatten_up_to(updates))
        for i, g in terms(treedef.flatten_up_to(params), state.strength):
            grads[i] = grads[i] + g.astype(grads[i].dtype)
        return treedef.unflatten(grads), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def group_lasso(specs: Specs, strength: float | jax.Array) -> optax.GradientTransformationExtraArgs:
    r"""Adds the subgradient of ``strength * group_lasso_penalty(params, specs)``.

    For a group with :math:`\|w_g\| > 0` that is
    :math:`\lambda \sqrt{n_g}\, w_g / \|w_g\|`; for a group that is exactly
    zero it is 0 (the subgradient of least norm), so a zeroed group stays put
    rather than getting NaN. Plain (sub)gradient steps only bring groups
    *near* zero; :func:`group_lasso_prox` makes them exactly zero.

    Args:
      specs: the spec tree shaped like the params (``None`` = no penalty).
      strength: :math:`\lambda`, kept in the state (:func:`set_strength`).

    Returns:
      A transformation whose ``update`` needs ``params``; state
      :class:`PenaltyState`.
    """
    families = _families(specs)

    def terms(leaves: list[Any], strength: jax.Array) -> list[tuple[int, jax.Array]]:
        out = []
        for members in families:
            norms, size = _norms(leaves, members)
            nonzero = norms > 0
            coef = jnp.where(nonzero, strength * jnp.sqrt(jnp.float32(size)) / jnp.where(nonzero, norms, 1), 0)
            for i, spec in members:
                rows = to_groups(leaves[i], spec).astype(jnp.float32) * coef[:, None]
                out.append((i, from_groups(rows, spec, leaves[i].shape)))
        return out

    return _added_gradient(specs, strength, "group_lasso", terms)


def group_lasso_prox(specs: Specs, strength_times_lr: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
    r"""The proximal step of the group lasso: block soft thresholding after the update.

    Place it *last* in the chain (after the optimizer, before
    :func:`admmprune.keep_masked`). With :math:`v = w + u` the weights the
    step would give, it returns the update that lands on

    .. math:: \operatorname{prox}(v)_g = v_g \max\Bigl(0,\
              1 - \frac{\tau \sqrt{n_g}}{\|v_g\|_2}\Bigr),
              \qquad \tau = \lambda \eta,

    the exact proximal operator of :math:`\tau \sum_g \sqrt{n_g}\|w_g\|`
    when no entry is in two groups: every group's norm shrinks by
    :math:`\tau\sqrt{n_g}`, and groups below that become exactly zero. An
    entry in two groups (a middle layer's kernel is a consumer of one group
    and a producer of another) gets the product of both groups' factors,
    computed from :math:`v`: the usual approximation, since the proximal
    operator of overlapping groups has no closed form. With momentum or
    Adam, proximal steps on the optimizer's update are a heuristic as well.

    Args:
      specs: the spec tree shaped like the params.
      strength_times_lr: :math:`\tau = \lambda \eta` (the penalty's strength
        times the learning rate), or a schedule of the step count (use the
        learning-rate schedule times :math:`\lambda`).

    Returns:
      A transformation whose ``update`` needs ``params``; state
      :class:`ProxState`.

    References:
      Parikh and Boyd, "Proximal Algorithms", 2014, section 6.5.4.
    """
    _, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    families = _families(specs)

    def init_fn(params: Params) -> ProxState:
        del params
        return ProxState(jnp.zeros((), jnp.int32))

    def update_fn(updates, state: ProxState, params: Params | None = None, **extra_args):
        del extra_args
        _need_params("group_lasso_prox", params)
        tau = strength_times_lr(state.count) if callable(strength_times_lr) else strength_times_lr
        tau = jnp.asarray(tau, jnp.float32)
        leaves = treedef.flatten_up_to(params)
        ups = list(treedef.flatten_up_to(updates))
        touched = {i for members in families for i, _ in members}
        v = [leaves[i] + ups[i] if i in touched else None for i in range(len(leaves))]
        factors: list[Any] = [None] * len(leaves)
        for members in families:
            norms, size = _norms(v, members)
            shrink = jnp.maximum(
                0, 1 - tau * jnp.sqrt(jnp.float32(size)) / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)
            )
            for i, spec in members:
                f = expand_groups(shrink, spec, v[i].shape)
                factors[i] = f if factors[i] is None else factors[i] * f
        for i, f in enumerate(factors):
            if f is not None:
                # The update that lands exactly on prox(v): w + (prox(v) - w).
                ups[i] = (v[i] * f.astype(v[i].dtype) - leaves[i]).astype(ups[i].dtype)
        return treedef.unflatten(ups), ProxState(state.count + 1)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def bn_l1(specs: Specs, strength: float | jax.Array) -> optax.GradientTransformationExtraArgs:
    r"""Network slimming: adds :math:`\lambda\, \mathrm{sign}(\gamma)` to the normalization scales.

    The subgradient of :math:`\lambda \sum |\gamma_c|` over the entries of
    every normalization ``scale`` that is a member of a coupled channel group
    (see :func:`admmprune.structure.gates.norm_scales`); :math:`\mathrm{sign}(0) = 0`.
    Channels whose :math:`|\gamma|` ends small are then pruned, which is
    exact after folding: a zero scale and offset make the channel zero.

    Args:
      specs: the spec tree shaped like the params.
      strength: :math:`\lambda`, kept in the state (:func:`set_strength`).

    Returns:
      A transformation whose ``update`` needs ``params``; state
      :class:`PenaltyState`.

    Raises:
      ValueError: if no group has a normalization scale (e.g. LeNet-5): use
        explicit gates (:mod:`admmprune.structure.gates`) instead.

    References:
      Liu et al., "Learning Efficient Convolutional Networks through Network
      Slimming", ICCV 2017.
    """
    scales = [(m.leaf, m.spec) for g in channel_groups(specs) for m in g.norm_scales]
    if not scales:
        raise ValueError(
            "bn_l1: no channel group has a normalization scale (a `scale` leaf in a group); "
            "use channel gates (admmprune.structure.gates) for this model"
        )

    def terms(leaves: list[Any], strength: jax.Array) -> list[tuple[int, jax.Array]]:
        # sign(w) on the member's slice, 0 elsewhere; sign(0) = 0.
        signs = [
            (i, from_groups(to_groups(jnp.sign(leaves[i]).astype(jnp.float32), m), m, leaves[i].shape))
            for i, m in scales
        ]
        return [(i, strength * s) for i, s in signs]

    return _added_gradient(specs, strength, "bn_l1", terms)


def set_strength(opt_state: Any, strength: float | jax.Array) -> Any:
    """Sets the strength of every :class:`PenaltyState` in an optimizer state (host, between steps).

    Only values change, so the jitted step does not recompile.
    """

    def edit(s: Any) -> Any:
        if isinstance(s, PenaltyState):
            return PenaltyState(jnp.asarray(strength, s.strength.dtype))
        return s

    return jax.tree.map(edit, opt_state, is_leaf=lambda x: isinstance(x, PenaltyState))


__all__ = [
    "PenaltyState",
    "ProxState",
    "bn_l1",
    "group_lasso",
    "group_lasso_penalty",
    "group_lasso_prox",
    "set_strength",
]
