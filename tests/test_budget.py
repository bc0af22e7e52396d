"""The projection onto a MACs budget: feasible, exact in what it reports, near the brute-force optimum."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import admmprune as ap
from admmprune import budget as budget_lib
from admmprune import collapse, costs, graph, models
from admmprune.sparsity import Channel, Coupled, Filter

# A three-layer chain: x (4) -> k1 -> group a (3) -> k2 -> group b (3) -> k3 -> 2.
SPECS = {
    "k1": Filter(group="a"),
    "k2": Coupled((Channel(group="a"), Filter(group="b"))),
    "k3": Channel(group="b"),
}
MACS = {"k1": 4 * 3 * 10, "k2": 3 * 3 * 10, "k3": 3 * 2 * 10}  # as if 10 positions per example


def _tree(seed):
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.1, 3.0, size=(2, 3))  # channels of different norms, per group
    return {
        "k1": jnp.asarray(rng.standard_normal((4, 3)) * scale[0], jnp.float32),
        "k2": jnp.asarray(rng.standard_normal((3, 3)) * scale[1], jnp.float32),
        "k3": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32),
    }


def _scores(tree):
    a = np.sum(np.asarray(tree["k1"]) ** 2, 0) + np.sum(np.asarray(tree["k2"]) ** 2, 1)
    b = np.sum(np.asarray(tree["k2"]) ** 2, 0) + np.sum(np.asarray(tree["k3"]) ** 2, 1)
    return a, b


def _macs(ka, kb):
    return 10 * (4 * sum(ka) + sum(ka) * sum(kb) + 2 * sum(kb))


def test_greedy_is_feasible_near_brute_force_and_beats_uniform_widths():
    ratios = []
    for seed in range(12):
        tree = _tree(seed)
        sa, sb = _scores(tree)
        budget = 10 * 14  # e.g. 2 + 2 channels: 10 * (8 + 4 + 4) is over; 2 + 1: 10 * (8 + 2 + 2) fits
        keep = budget_lib.budget_keep(tree, SPECS, MACS, budget)
        ka, kb = np.asarray(keep["a"]), np.asarray(keep["b"])
        assert ka.any() and kb.any()  # every group keeps a channel
        assert _macs(ka, kb) <= budget
        assert float(budget_lib.kept_macs(MACS, keep, SPECS)) == _macs(ka, kb)
        got = sa[ka].sum() + sb[kb].sum()
        best = max(
            sa[np.array(a, bool)].sum() + sb[np.array(b, bool)].sum()
            for a in itertools.product((0, 1), repeat=3)
            for b in itertools.product((0, 1), repeat=3)
            if any(a) and any(b) and _macs(a, b) <= budget
        )
        uniform = max(  # the same number of channels in both groups, the best ones
            np.sort(sa)[::-1][:n].sum() + np.sort(sb)[::-1][:n].sum()
            for n in (1, 2, 3)
            if _macs([1] * n, [1] * n) <= budget
        )
        assert got >= uniform - 1e-5
        ratios.append(got / best)
    assert min(ratios) > 0.8 and np.mean(ratios) > 0.95, ratios


def test_projection_is_idempotent_keeps_removed_channels_removed_and_runs_in_jit():
    tree = _tree(0)
    project = jax.jit(lambda t, b: budget_lib.project_to_budget(t, SPECS, MACS, b))
    projected, masks = project(tree, 150.0)
    again, masks2 = project(projected, 150.0)
    for m1, m2 in zip(jax.tree.leaves(masks), jax.tree.leaves(masks2), strict=True):
        np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(again["k2"], projected["k2"])
    # A looser budget with the first masks as support removes nothing they kept and keeps what they removed out.
    _, loose = budget_lib.project_to_budget(tree, SPECS, MACS, 10_000.0, support=masks)
    np.testing.assert_array_equal(loose["k2"], masks["k2"])
    # A budget no model meets keeps one channel per group.
    keep = budget_lib.budget_keep(tree, SPECS, MACS, 1.0)
    assert int(keep["a"].sum()) == 1 and int(keep["b"].sum()) == 1


@pytest.mark.parametrize("budget", [158_000, 400_000])
def test_lenet5_under_a_budget_collapses_to_a_model_that_costs_what_was_reported(budget):
    model = models.get("lenet5", rngs=nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
    params = nnx.state(model, nnx.Param)
    specs = graph.chain_specs(params, model.chain)
    macs = costs.layer_macs(model, x)
    keep = jax.jit(lambda p: budget_lib.budget_keep(p, specs, macs, budget))(params)
    reported = float(budget_lib.kept_macs(macs, keep, specs))
    assert reported <= budget
    _, masks = budget_lib.project_to_budget(params, specs, macs, budget)
    small = collapse.collapse(model, masks, specs)
    assert sum(costs.layer_macs(small, x).values()) == reported
    # The budget is spent, not wasted: one more channel anywhere would not fit... or the greedy
    # stopped at its first feasible point, within one channel's cost of the budget.
    largest_channel = max(
        float(v.max())
        for v in jax.grad(lambda k: costs.gated_macs(macs, k, specs))(
            {g: jnp.asarray(k, jnp.float32) for g, k in keep.items()}
        ).values()
    )
    assert reported > budget - largest_channel


def test_admm_with_the_budget_projector_ends_on_masks_that_fit():
    tree = _tree(1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)
    target = x @ tree["k1"][:, :1] @ tree["k2"][:1, :2] @ tree["k3"][:2]  # a model with 1 + 2 channels explains it

    def loss(p):
        return jnp.mean((x @ p["k1"] @ p["k2"] @ p["k3"] - target) ** 2)

    budget = 10 * (4 * 1 + 1 * 2 + 2 * 2)
    tx = optax.chain(
        ap.admm(SPECS, rho=0.5, interval=10, projection=budget_lib.projector(MACS, budget)), optax.sgd(0.01)
    )

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    params, state = tree, tx.init(tree)
    for _ in range(600):
        params, state = step(params, state)
    admm_state = ap.find_state(state)
    keep = {"a": np.asarray(admm_state.mask["k1"]).any(0), "b": np.asarray(admm_state.mask["k3"]).any(1)}
    assert _macs(keep["a"], keep["b"]) <= budget
    assert float(budget_lib.kept_macs(MACS, keep, SPECS)) == _macs(keep["a"], keep["b"])
    # ADMM moved W onto the set: the part of W outside the kept channels is small.
    pruned = ap.apply_masks(params, admm_state.mask)
    outside = sum(float(jnp.sum((params[k] - pruned[k]) ** 2)) for k in params)
    assert outside < 1e-2 * sum(float(jnp.sum(params[k] ** 2)) for k in params)
    assert float(loss(pruned)) < 1e-3 * float(loss(jax.tree.map(jnp.zeros_like, tree)))  # it found the sparse model
