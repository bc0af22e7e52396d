"""The MAC model: per-kernel counts from the jaxpr, and gated MACs equal to the collapsed model's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admmprune import collapse, costs, discovery, graph, masking, measure, models
from admmprune.sparsity import Channel, Coupled, Filter


@functools.cache
def _model(name):
    """``(model, specs, state_specs, x)``: a small zoo model, its groups and an example input.

    Built abstractly and filled with numpy draws: only shapes matter to the
    counts, and jax's eager initializers compile once per shape.
    """
    kwargs = {} if name == "lenet5" else {"in_shape": (8, 8, 3)}
    abstract = nnx.eval_shape(lambda: models.get(name, **kwargs, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    model = nnx.merge(graphdef, jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32)), state))
    x = jax.ShapeDtypeStruct((2, *kwargs.get("in_shape", (28, 28, 1))), jnp.float32)
    if name == "lenet5":
        return model, graph.chain_specs(nnx.state(model, nnx.Param), model.chain), None, x
    found = discovery.discover_nnx(model, x)
    return model, found.specs, found.state_specs, x


def test_lenet5_counts_are_the_hand_formulas():
    model, _, _, x = _model("lenet5")
    macs = costs.layer_macs(model, x)
    assert macs == {
        "conv1/kernel": 24 * 24 * 5 * 5 * 1 * 20,
        "conv2/kernel": 8 * 8 * 5 * 5 * 20 * 50,
        "fc1/kernel": 4 * 4 * 50 * 500,
        "fc2/kernel": 500 * 10,
    }
    # XLA also counts bias adds and pooling: 2 x 2,293,000 of its 4,612,770 FLOPs.
    ratio = 2 * sum(macs.values()) / measure.flops(model, jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))
    assert 0.97 < ratio <= 1.0
    # A pure function of the params counts the same.
    fn, params = models.apply_fn(model)
    assert costs.layer_macs(fn, params, x) == macs


def test_kernels_are_followed_through_casts_masks_and_calls():
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.standard_normal((6, 4), np.float32)), "b": jnp.ones((3, 3, 4, 5))}
    mask = jnp.asarray(rng.random((6, 4)) > 0.5)

    @jax.jit
    def dense(w, x):
        return x @ w

    def fn(p, x):
        w = jnp.where(mask, p["a"], 0).astype(jnp.bfloat16).astype(jnp.float32).reshape(6, 4)
        h = dense(w * 2, x)  # (B, 4) through a nested jit
        h = h.reshape(-1, 1, 1, 4) * jnp.ones((1, 5, 5, 1))
        y = jax.lax.conv_general_dilated(h, p["b"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        gram = jnp.einsum("bhwc,bhwd->bcd", y, y)  # two activations: no kernel's work
        return jnp.sum(gram)

    macs = costs.layer_macs(fn, params, jnp.zeros((3, 6)))
    assert macs == {"a": 6 * 4, "b": 5 * 5 * 3 * 3 * 4 * 5}


def test_scans_count_every_step_and_conds_their_largest_branch():
    params = {"w": jnp.ones((4, 4)), "v": jnp.ones((4, 8))}

    def fn(p, x):
        h, _ = jax.lax.scan(lambda h, _: (jnp.tanh(h @ p["w"]), None), x, length=3)
        return jax.lax.cond(jnp.sum(h) > 0, lambda h: (h @ p["v"])[:, :4], lambda h: h @ p["w"], h)

    assert costs.layer_macs(fn, params, jnp.zeros((2, 4))) == {"w": 3 * 16, "v": 32}


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_gated_macs_of_a_hard_prune_are_the_collapsed_model_macs(name):
    model, specs, state_specs, x = _model(name)
    params = nnx.state(model, nnx.Param)
    macs = costs.layer_macs(model, x)
    gated = jax.jit(lambda keep: costs.gated_macs(macs, keep, specs))
    assert float(gated({g: jnp.ones(n) for g, n in _widths(params, specs).items()})) == sum(macs.values())
    # jit: eager projection compiles every small op of the tree on its own.
    prune = jax.jit(lambda p, ratio: masking.hard_prune(p, specs, ratio)[1])
    for ratio in (0.3, 0.7):
        masks = prune(params, ratio)
        keep = {g: jnp.asarray(a, jnp.float32) for g, a in collapse.alive_channels(specs, masks).items()}
        small = collapse.collapse(model, masks, specs, state_specs=state_specs)
        want = sum(costs.layer_macs(small, x).values())
        assert float(gated(keep)) == want
        assert want < sum(macs.values())


def _widths(params, specs):
    return {g: total for g, (_, total) in graph.group_widths(params, specs).items()}


def test_gated_macs_gradient_is_the_macs_per_channel():
    model, specs, _, x = _model("lenet5")
    macs = costs.layer_macs(model, x)
    keep = {g: jnp.ones(n) for g, n in _widths(nnx.state(model, nnx.Param), specs).items()}
    grad = jax.grad(lambda k: costs.gated_macs(macs, k, specs))(keep)
    # A conv1 channel costs its share of conv1 and its input rows' share of conv2.
    np.testing.assert_array_equal(grad["conv1"], np.full(20, 288000 / 20 + 1600000 / 20))
    np.testing.assert_array_equal(grad["fc1"], np.full(500, 400000 / 500 + 5000 / 500))
    half = {**keep, "conv2": jnp.full(50, 0.5)}
    assert float(costs.gated_macs(macs, half, specs)) == 288000 + 800000 + 200000 + 5000


def test_partial_axes_need_the_params():
    macs = {"k": 60}
    params = {"k": jnp.ones((10, 6))}
    specs = {"k": Coupled((Channel(group="a", size=4), Filter(group="b")))}
    keep = {"a": jnp.array([1.0, 0.0, 1.0, 0.0]), "b": jnp.ones(6)}
    with pytest.raises(ValueError, match="params="):
        costs.gated_macs(macs, keep, specs)
    # Channels 4..9 of the input axis are in no group: they count as kept.
    assert float(costs.gated_macs(macs, keep, specs, params=params)) == 60 * 8 / 10
    with pytest.raises(ValueError, match="'b'"):
        costs.gated_macs(macs, {"a": keep["a"]}, specs, params=params)
