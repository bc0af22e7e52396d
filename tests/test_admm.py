"""Tests of the ADMM transformation, stages, hard prune and masked retraining."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import admmprune as ap


def small_params(key=0):
    k1, k2 = jax.random.split(jax.random.key(key))
    return {
        "hidden": {"kernel": jax.random.normal(k1, (6, 8)), "bias": jnp.zeros(8)},
        "out": {"kernel": jax.random.normal(k2, (8, 2)), "bias": jnp.zeros(2)},
    }


SPECS = {
    "hidden": {"kernel": ap.Filter(group="h"), "bias": ap.Filter(group="h")},
    "out": {"kernel": ap.Channel(group="h"), "bias": None},
}


def run_steps(tx, params, state, n, grads_fn=None):
    @jax.jit
    def step(p, s):
        g = jax.tree.map(jnp.zeros_like, p) if grads_fn is None else grads_fn(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    history = []
    for _ in range(n):
        params, state = step(params, state)
        history.append((params, state))
    return params, state, history


def test_penalty_gradient_matches_autodiff():
    params = small_params()
    tx = ap.admm(SPECS, rho=0.37, keep_ratio=0.5, interval=4)
    state = tx.init(params)
    # Move W, Z and U away from their initial values, then look at one step
    # that has no dual update (count 5 -> 6).
    sgd = optax.chain(tx, optax.sgd(0.1))
    _, _st, hist = run_steps(sgd, params, sgd.init(params), 5, grads_fn=lambda p: jax.tree.map(jnp.sin, p))
    params, state = hist[-1][0], hist[-1][1][0]
    assert int(state.count) == 5 and any(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(state.u))

    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, new_state = jax.jit(tx.update)(zeros, state, params)

    def penalty(w):
        terms = jax.tree.map(
            lambda s, w, z, u: 0.0 if s is None else 0.37 / 2 * jnp.sum((w - z + u) ** 2),
            SPECS,
            w,
            state.z,
            state.u,
            is_leaf=lambda x: x is None or isinstance(x, ap.sparsity.SPEC_TYPES),
        )
        return sum(jax.tree.leaves(terms))

    expected = jax.grad(penalty)(params)
    for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert updates["out"]["bias"].shape == (2,) and float(jnp.abs(updates["out"]["bias"]).max()) == 0.0
    # The step ran (its count moved) and, off the interval, left z as it was.
    assert int(new_state.count) == int(state.count) + 1
    for a, b in zip(jax.tree.leaves(new_state.z), jax.tree.leaves(state.z), strict=True):
        np.testing.assert_array_equal(a, b)


def test_z_and_u_update_only_on_their_interval():
    params = small_params()
    tx = optax.chain(ap.admm(SPECS, rho=0.1, keep_ratio=0.5, interval=3), optax.sgd(0.05))
    state = tx.init(params)
    _, _, hist = run_steps(tx, params, state, 10, grads_fn=lambda p: jax.tree.map(jnp.cos, p))
    prev = state[0]
    changed = []
    for _, s in hist:
        s = s[0]
        z_changed = any(
            not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s.z), jax.tree.leaves(prev.z), strict=True)
        )
        u_changed = any(
            not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s.u), jax.tree.leaves(prev.u), strict=True)
        )
        assert z_changed == u_changed
        changed.append(z_changed)
        prev = s
    # Step i (0-based) starts at count i; the dual update runs at counts 3, 6, 9.
    assert changed == [i in (3, 6, 9) for i in range(10)]


def test_unpruned_leaves_carry_no_state():
    state = ap.admm(SPECS).init(small_params())
    for field in ("rho", "keep_ratio", "z", "u", "mask", "support", "primal_residual", "dual_residual"):
        assert getattr(state, field)["out"]["bias"] is None, field
        assert getattr(state, field)["hidden"]["kernel"] is not None, field


def test_missing_params_is_a_clear_error():
    tx = ap.admm(SPECS)
    params = small_params()
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(params, tx.init(params))
    tx = ap.keep_masked({"a": None})
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update({"a": jnp.ones(2)}, tx.init({"a": jnp.ones(2)}))


def rho_after(schedule, n_updates, grads_fn):
    params = small_params()
    tx = optax.chain(ap.admm(SPECS, rho=0.01, keep_ratio=0.5, interval=2, rho_schedule=schedule), optax.sgd(0.01))
    _, _state, hist = run_steps(tx, params, tx.init(params), 2 * n_updates + 1, grads_fn)
    return [float(s[0].rho["hidden"]["kernel"]) for _, s in hist], hist


def test_constant_and_geometric_rho():
    rhos, _ = rho_after(ap.constant_rho(), 3, None)
    assert rhos == pytest.approx([0.01] * 7)
    rhos, _ = rho_after(ap.geometric_rho(1.3), 3, None)
    # Dual updates happen at counts 2, 4, 6 (steps 2, 4, 6 in 0-based order).
    assert rhos == pytest.approx([0.01, 0.01, 0.013, 0.013, 0.0169, 0.0169, 0.02197], rel=1e-5)
    rhos, _ = rho_after(ap.geometric_rho(2.0, max_rho=0.03), 3, None)
    assert rhos[-1] == pytest.approx(0.03)


def test_residual_balancing_moves_rho_both_ways():
    sched = ap.residual_balancing_rho(mu=10.0, tau_incr=2.0, tau_decr=3.0)
    rho = jnp.float32(1.0)
    assert float(sched(rho, jnp.float32(1.0), jnp.float32(0.01))) == 2.0
    assert float(sched(rho, jnp.float32(0.01), jnp.float32(1.0))) == pytest.approx(1 / 3)
    assert float(sched(rho, jnp.float32(1.0), jnp.float32(0.5))) == 1.0
    # In a run, a large primal residual with a still Z drives rho up.
    rhos, _hist = rho_after(sched, 2, lambda p: jax.tree.map(lambda w: -w, p))
    assert rhos[-1] > rhos[0]


def test_rho_change_rescales_the_scaled_dual():
    params = small_params()
    tx = ap.admm(SPECS, rho=0.5, keep_ratio=0.5, interval=1, rho_schedule=ap.geometric_rho(2.0))
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    _, s1 = tx.update(zeros, state, params)  # count 0: no dual update
    _, s2 = tx.update(zeros, s1, params)  # count 1: dual update, rho 0.5 -> 1.0
    w, u0, z = params["hidden"]["kernel"], s1.u["hidden"]["kernel"], s2.z["hidden"]["kernel"]
    np.testing.assert_allclose(s2.u["hidden"]["kernel"], (u0 + w - z) * 0.5, rtol=1e-6)
    assert float(s2.rho["hidden"]["kernel"]) == 1.0


def test_per_parameter_rho():
    rho = {"hidden": {"kernel": 0.1, "bias": 0.2}, "out": {"kernel": 0.3, "bias": None}}
    state = ap.admm(SPECS, rho=rho).init(small_params())
    assert float(state.rho["out"]["kernel"]) == pytest.approx(0.3)
    assert state.rho["out"]["bias"] is None


def test_stage_change_edits_state_without_recompiling():
    params = small_params()
    tx = optax.chain(ap.admm(SPECS, rho=0.5, interval=2), optax.sgd(0.05))
    traces = []

    @jax.jit
    def step(p, s):
        traces.append(1)
        u, s = tx.update(jax.tree.map(jnp.cos, p), s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    kept = []
    for ratio in ap.stage_ratios(0.75):  # 0.5, 0.75
        state = ap.set_stage(state, 1 - ratio)
        for _ in range(5):
            params, state = step(params, state)
        kept.append(np.asarray(ap.find_state(state).mask["hidden"]["bias"]))
    assert len(traces) == 1
    assert [k.sum() for k in kept] == [4, 2]
    # Groups removed in the first stage stay removed in the second.
    assert np.all(kept[1] <= kept[0])
    s = ap.find_state(state)
    np.testing.assert_array_equal(s.support["hidden"]["bias"], kept[0])


def test_stage_support_blocks_regrowth():
    """A removed group stays removed even when it becomes the largest."""
    params = {"w": jnp.array([[1.0, 2.0, 3.0, 4.0]])}
    specs = {"w": ap.Filter()}
    tx = ap.admm(specs, rho=1.0, keep_ratio=0.5, interval=1)
    state = tx.init(params)
    assert np.asarray(state.mask["w"]).tolist() == [[False, False, True, True]]
    state = ap.set_stage(state, 0.5)
    grown = {"w": jnp.array([[10.0, 2.0, 3.0, 4.0]])}
    zeros = jax.tree.map(jnp.zeros_like, grown)
    _, state = tx.update(zeros, state, grown)
    _, state = tx.update(zeros, state, grown)
    assert np.asarray(state.mask["w"]).tolist() == [[False, False, True, True]]


def test_admm_on_a_toy_regression_converges_and_ends_feasible():
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (256, 12))
    true_w = jnp.zeros((12, 3)).at[:4].set(jax.random.normal(kw, (4, 3)))
    y = x @ true_w
    specs = {"w": ap.Channel()}  # input features: a row per feature

    def loss(p):
        return jnp.mean((x @ p["w"] - y) ** 2)

    params = {"w": jnp.zeros((12, 3)) + 0.1}
    # rho is capped: plain SGD diverges once lr * rho exceeds 2.
    schedule = ap.geometric_rho(1.3, max_rho=5.0)
    tx = optax.chain(ap.admm(specs, rho=0.05, interval=10, rho_schedule=schedule), optax.sgd(0.05))
    state = tx.init(params)
    state = ap.set_stage(state, 4 / 12)
    _, state, hist = run_steps(tx, params, state, 300, grads_fn=jax.grad(loss))
    params = hist[-1][0]
    residual = ap.residuals(ap.find_state(state))
    first = float(hist[15][1][0].primal_residual["w"])
    assert residual["primal_residual"] < 0.01 < first
    pruned, _masks = ap.hard_prune(params, specs, 4 / 12, support=ap.find_state(state).support)
    rows = np.asarray(jnp.any(pruned["w"] != 0, axis=1))
    assert rows.sum() <= 4
    np.testing.assert_array_equal(rows[:4], True)  # it found the true support
    assert float(loss(pruned)) < 1e-2 * float(loss({"w": jnp.zeros((12, 3))}))


def test_keep_masked_holds_zeros_exactly():
    params = small_params()
    _pruned, masks = ap.hard_prune(params, SPECS, 0.5)
    assert masks["out"]["bias"] is None
    assert ap.mask_sparsity(masks) == pytest.approx(0.5)
    tx = optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9), ap.keep_masked(masks))
    # Start from the unpruned weights: the first step must zero them.
    out, _, _ = run_steps(tx, params, tx.init(params), 5, grads_fn=lambda p: jax.tree.map(jnp.cos, p))
    for path in (("hidden", "kernel"), ("hidden", "bias"), ("out", "kernel")):
        w, m = out[path[0]][path[1]], masks[path[0]][path[1]]
        assert np.all(np.asarray(w)[~np.asarray(m)] == 0.0)
        assert np.all(np.asarray(w)[np.asarray(m)] != np.asarray(params[path[0]][path[1]])[np.asarray(m)])
    assert not np.array_equal(out["out"]["bias"], params["out"]["bias"])


def test_works_on_an_nnx_state():
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.fc1 = nnx.Linear(4, 16, rngs=rngs)
            self.head = nnx.Linear(16, 3, rngs=rngs)

        def __call__(self, x):
            return self.head(jax.nn.relu(self.fc1(x)))

    model = Net(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    specs = ap.resolve(params)  # fc1/kernel filters; head and biases untouched
    assert "fc1/kernel" in ap.format_plan(params, specs)
    tx = optax.chain(ap.admm(specs, rho=0.1, interval=2), optax.sgd(0.01))
    state = ap.set_stage(tx.init(params), 0.25)
    x = jnp.ones((8, 4))

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(x) ** 2))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(5):
        params, state = step(params, state)
    pruned, _masks = ap.hard_prune(params, specs, 0.25)
    kernel = np.asarray(nnx.to_pure_dict(pruned)["fc1"]["kernel"])
    assert np.count_nonzero(kernel.any(0)) == 4


def test_set_stage_can_reset_rho_and_rescales_u():
    params = small_params()
    tx = ap.admm(SPECS, rho=0.5, keep_ratio=0.5, interval=1)
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, jax.tree.map(lambda w: w + 0.1, params))
    new = ap.set_stage(state, 0.25, rho=2.0)
    assert float(new.rho["hidden"]["kernel"]) == 2.0
    np.testing.assert_allclose(new.u["hidden"]["kernel"], state.u["hidden"]["kernel"] * 0.25, rtol=1e-6)
    assert float(new.keep_ratio["out"]["kernel"]) == 0.25
    assert new.rho["out"]["bias"] is None


def test_pruned_penalty_frees_kept_weights_and_pulls_removed_ones():
    # After a dual update a kept weight has U = 0 and Z = its value then: textbook
    # ADMM pulls it back there once it moves; penalty="pruned" leaves it alone.
    params = small_params()
    grads_fn = lambda p: jax.tree.map(jnp.cos, p)  # noqa: E731
    for penalty in ("all", "pruned"):
        tx = ap.admm(SPECS, rho=0.5, keep_ratio=0.5, interval=3, penalty=penalty)
        sgd = optax.chain(tx, optax.sgd(0.1))
        _, _, hist = run_steps(sgd, params, sgd.init(params), 4, grads_fn=grads_fn)
        p, state = hist[-1][0], hist[-1][1][0]  # one step past the dual update at count 3
        zeros = jax.tree.map(jnp.zeros_like, p)
        updates, _ = jax.jit(tx.update)(zeros, state, p)
        for s, g, w, z, u, m in zip(
            *(
                jax.tree.leaves(t, is_leaf=lambda x: x is None or isinstance(x, ap.sparsity.SPEC_TYPES))
                for t in (SPECS, updates, p, state.z, state.u, state.mask)
            ),
            strict=True,
        ):
            if s is None:
                continue
            full = 0.5 * (w - z + u)
            assert bool(m.any()) and bool((~m).any())
            np.testing.assert_allclose(g[~m], full[~m], rtol=1e-6)  # removed: pulled either way
            assert float(jnp.abs(full[m]).max()) > 1e-4  # the anchor textbook ADMM puts on kept weights
            np.testing.assert_allclose(g[m], full[m] if penalty == "all" else 0.0, rtol=1e-6, atol=0)


def test_unknown_penalty_is_refused():
    with pytest.raises(ValueError, match="penalty"):
        ap.admm(SPECS, penalty="kept")
