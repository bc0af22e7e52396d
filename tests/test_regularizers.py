"""Group lasso (subgradient and proximal step) and network slimming as optax transformations."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from admmprune import discovery, graph, models, path_str, regularizers
from admmprune.projections import coupled_groups, to_groups
from admmprune.sparsity import Block, Filter, NofM, Unstructured, is_spec


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32))


def _chain():
    """A dense chain (one layer reads a flattened 2 x 2 map) plus leaves with specs of their own."""
    rng = np.random.default_rng(0)
    params = {
        "l1": {"kernel": _normal(rng, (3, 4)), "bias": _normal(rng, (4,))},
        "l2": {"kernel": _normal(rng, (4, 5)), "bias": _normal(rng, (5,))},
        "l3": {"kernel": _normal(rng, (20, 2)), "bias": _normal(rng, (2,))},
        "own": _normal(rng, (3, 6)),
        "blocks": _normal(rng, (5, 4)),
        "single": _normal(rng, (4,)),
        "nm": _normal(rng, (4, 4)),
    }
    specs = graph.chain_specs(params, [("l1", 1), ("l2", 1), ("l3", 4)])
    specs.update(own=Filter(), blocks=Block((2, 2)), single=Unstructured(), nm=NofM(2, 4))
    return params, specs


@functools.cache
def _resnet():
    """ResNet-20 (8x8 inputs) params drawn with numpy and its discovered specs."""
    model = nnx.eval_shape(lambda: models.get("resnet20", in_shape=(8, 8, 3), rngs=nnx.Rngs(0)))
    specs = discovery.discover_nnx(model, jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)).specs
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda s: _normal(rng, s.shape), nnx.state(model, nnx.Param))
    return params, specs


def _added(tx, params):
    """What ``tx`` adds to zero gradients, under ``jit``."""
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    return updates


@pytest.mark.parametrize("which", ["chain", "resnet20"])
def test_group_lasso_adds_the_penalty_gradient(which):
    params, specs = _chain() if which == "chain" else _resnet()
    added = _added(regularizers.group_lasso(specs, 0.01), params)
    want = jax.jit(jax.grad(lambda p: 0.01 * regularizers.group_lasso_penalty(p, specs)))(params)
    for a, b in zip(jax.tree.leaves(added), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    if which == "chain":
        np.testing.assert_array_equal(added["nm"], 0)  # NofM has no groups


def test_group_lasso_penalty_value():
    params, specs = _chain()
    leaves = jax.tree.leaves(params)
    want = 0.0
    for members in coupled_groups(specs).values():
        rows = np.concatenate([np.asarray(to_groups(leaves[i], s)) for i, s in members], axis=1)
        want += np.sqrt(rows.shape[1]) * np.linalg.norm(rows, axis=1).sum()
    for name, spec in [("own", Filter()), ("blocks", Block((2, 2))), ("single", Unstructured())]:
        rows = np.asarray(to_groups(params[name], spec))
        want += np.sqrt(rows.shape[1]) * np.linalg.norm(rows, axis=1).sum()
    got = jax.jit(lambda p: regularizers.group_lasso_penalty(p, specs))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_zero_group_gets_zero():
    params, specs = _chain()
    # Channel 1 of l1's group: its kernel column, its bias and l2's input row.
    params["l1"]["kernel"] = params["l1"]["kernel"].at[:, 1].set(0)
    params["l1"]["bias"] = params["l1"]["bias"].at[1].set(0)
    params["l2"]["kernel"] = params["l2"]["kernel"].at[1].set(0)
    added = _added(regularizers.group_lasso(specs, 0.01), params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(added))
    np.testing.assert_array_equal(added["l1"]["kernel"][:, 1], 0)
    np.testing.assert_array_equal(added["l1"]["bias"][1], 0)
    np.testing.assert_array_equal(added["l2"]["kernel"][1], 0)
    assert np.all(added["l1"]["kernel"][:, 0] != 0)


def test_prox_soft_thresholds_group_norms():
    rng = np.random.default_rng(2)
    # One coupled group over two leaves that are in no other group: the prox is exact.
    params = {"k": _normal(rng, (3, 6)), "b": _normal(rng, (6,))}
    specs = {"k": Filter(group="g"), "b": Filter(group="g")}
    step = {"k": _normal(rng, (3, 6)), "b": _normal(rng, (6,))}
    v = jax.tree.map(jnp.add, params, step)
    norms = np.linalg.norm(np.concatenate([np.asarray(v["k"]), np.asarray(v["b"])[None]]), axis=0)
    threshold = float(np.median(norms))
    tau = threshold / 2.0  # size 4 per group: tau * sqrt(4) is the threshold
    tx = regularizers.group_lasso_prox(specs, tau)
    updates, state = jax.jit(tx.update)(step, tx.init(params), params)
    out = optax.apply_updates(params, updates)
    new = np.linalg.norm(np.concatenate([np.asarray(out["k"]), np.asarray(out["b"])[None]]), axis=0)
    np.testing.assert_allclose(new, np.maximum(norms - threshold, 0), rtol=1e-5, atol=1e-6)
    assert np.sum(new == 0) == np.sum(norms <= threshold) >= 3  # exactly zero, not just small
    kept = norms > threshold
    np.testing.assert_allclose(  # directions are kept
        np.asarray(out["k"])[:, kept] / new[kept], np.asarray(v["k"])[:, kept] / norms[kept], rtol=1e-5
    )
    assert int(state.count) == 1


def test_prox_with_a_schedule_and_overlapping_groups():
    params, specs = _chain()
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = regularizers.group_lasso_prox(specs, lambda count: jnp.where(count > 0, 10.0, 0.0))
    state = tx.init(params)
    update = jax.jit(tx.update)
    first, state = update(zeros, state, params)
    for a in jax.tree.leaves(first):  # the schedule's 0 at step 0: nothing moves
        np.testing.assert_allclose(a, 0, atol=1e-6)
    second, _ = update(zeros, state, params)
    out = optax.apply_updates(params, second)
    # A threshold of 10 * sqrt(n) is above every group's norm: everything grouped is zero,
    # the rest (the output bias, the NofM leaf) is untouched.
    flat_specs = jax.tree.leaves(specs, is_leaf=is_spec)
    for spec, new, old in zip(flat_specs, jax.tree.leaves(out), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(new, old if spec is None or isinstance(spec, NofM) else 0)


def test_group_lasso_then_sgd_drives_irrelevant_channels_to_zero():
    rng = np.random.default_rng(3)
    x = _normal(rng, (256, 8))
    true = np.asarray(rng.standard_normal((8, 6)), np.float32)
    true[:, 3:] = 0  # outputs 3..5 carry nothing
    y = x @ true
    params = {"w": jnp.zeros((8, 6)) + 0.1, "b": jnp.zeros(6)}
    specs = {"w": Filter(group="out"), "b": Filter(group="out")}

    def loss(p):
        return jnp.mean(jnp.sum((x @ p["w"] + p["b"] - y) ** 2, axis=1))

    def train(tx, steps=300):
        p, state = params, tx.init(params)

        @jax.jit
        def step(p, state):
            updates, state = tx.update(jax.grad(loss)(p), state, p)
            return optax.apply_updates(p, updates), state

        for _ in range(steps):
            p, state = step(p, state)
        return np.linalg.norm(np.concatenate([np.asarray(p["w"]), np.asarray(p["b"])[None]]), axis=0)

    norms = train(optax.chain(regularizers.group_lasso(specs, 0.05), optax.sgd(0.05)))
    assert np.all(norms[3:] < 0.02) and np.all(norms[:3] > 0.5)
    exact = train(optax.chain(optax.sgd(0.05), regularizers.group_lasso_prox(specs, 0.05 * 0.05)))
    np.testing.assert_array_equal(exact[3:], 0)
    assert np.all(exact[:3] > 0.5)


def test_bn_l1_adds_the_sign_of_norm_scales():
    params, specs = _resnet()
    tx = regularizers.bn_l1(specs, 0.1)
    added = _added(tx, params)

    def l1_of_scales(p):
        scales = [x for path, x in jax.tree_util.tree_leaves_with_path(p) if path_str(path).endswith("/scale")]
        return 0.1 * sum(jnp.sum(jnp.abs(x)) for x in scales)

    want = jax.jit(jax.grad(l1_of_scales))(params)
    for a, b in zip(jax.tree.leaves(added), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    assert np.sum(np.abs(added["stem"]["bn"]["scale"][...])) > 0
    np.testing.assert_array_equal(added["stem"]["conv"]["kernel"][...], 0)


def test_bn_l1_without_norms_is_an_error():
    specs = _chain()[1]
    with pytest.raises(ValueError, match="no channel group has a normalization scale"):
        regularizers.bn_l1(specs, 0.1)


def test_updates_need_params():
    params, specs = _chain()
    for tx in (regularizers.group_lasso(specs, 0.1), regularizers.group_lasso_prox(specs, 0.1)):
        with pytest.raises(ValueError, match="needs the current parameters"):
            tx.update(params, tx.init(params))


def test_set_strength_edits_values_without_recompiling():
    params, specs = _chain()
    tx = optax.chain(regularizers.group_lasso(specs, 0.0), optax.sgd(0.1))
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update)
    first, state = update(zeros, state, params)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(first))
    state = regularizers.set_strength(state, 0.5)
    second, state = update(zeros, state, params)
    assert float(state[0].strength) == 0.5
    assert np.any(np.asarray(second["l1"]["kernel"]) != 0)
    assert update._cache_size() == 1
