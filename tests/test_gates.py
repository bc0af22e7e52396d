"""Channel gates: identity at 1, exact channel removal at 0, gradients, penalties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admmprune import discovery, gates, graph, models, path_str
from admmprune.core.groups import channel_groups
from admmprune.projections import apply_masks
from admmprune.sparsity import Channel, Coupled, Filter


def _random_variables(tree, seed):
    """Values for abstract variables, drawn with numpy (jax's eager init compiles once per shape).

    Kernels get fan-in scaled normals; biases, norm scales and offsets and
    BatchNorm statistics are moved away from 0 and 1, so that no channel is
    trivially zero or dead.
    """
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = path_str(path)
        if x.ndim > 1:
            return jnp.asarray(rng.standard_normal(x.shape, np.float32) / np.sqrt(np.prod(x.shape[:-1])))
        noise = rng.standard_normal(x.shape, np.float32)
        if name.endswith(("scale", "var")):
            return jnp.asarray(1 + 0.3 * np.abs(noise))
        return jnp.asarray(0.3 * noise)

    return jax.tree_util.tree_map_with_path(draw, tree)


@functools.cache
def _zoo(name):
    """``(forward(params, x), params, specs, x)`` of a small zoo model in evaluation mode."""
    rng = np.random.default_rng(1)
    if name == "lenet5":
        model = nnx.eval_shape(lambda: models.get("lenet5", features=(4, 6, 8), rngs=nnx.Rngs(0)))
        x = jnp.asarray(rng.standard_normal((2, 28, 28, 1), np.float32))
        specs = graph.chain_specs(nnx.state(model, nnx.Param), model.chain)
    else:
        model = nnx.eval_shape(lambda: models.get("resnet20", in_shape=(8, 8, 3), rngs=nnx.Rngs(0)))
        x = jnp.asarray(rng.standard_normal((2, 8, 8, 3), np.float32))
        specs = discovery.discover_nnx(model, x).specs
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = _random_variables(params, 2), _random_variables(rest, 3)

    @jax.jit
    def forward(params, x):
        return nnx.merge(graphdef, params, rest, copy=True)(x)

    return forward, params, specs, x


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_all_ones_is_the_identity(name):
    forward, params, specs, x = _zoo(name)
    ones = gates.init(params, specs)
    gated = jax.jit(lambda p, g: gates.apply(p, g, specs))(params, ones)
    for a, b in zip(jax.tree.leaves(gated), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(forward(gated, x), forward(params, x))


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_zero_gate_equals_masking_the_channel(name):
    forward, params, specs, x = _zoo(name)
    ones = gates.init(params, specs)
    gated = jax.jit(lambda p, g: forward(gates.apply(p, g, specs), x))
    masked = jax.jit(lambda p, keep: forward(apply_masks(p, gates.keep_masks(p, specs, keep)), x))
    full = forward(params, x)
    changed = 0
    assert len(ones) == (3 if name == "lenet5" else 12)
    for group, g in ones.items():
        c = g.shape[0] // 2
        got = gated(params, {**ones, group: g.at[c].set(0.0)})
        want = masked(params, {**{k: v > 0 for k, v in ones.items()}, group: np.arange(g.shape[0]) != c})
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=group)
        changed += bool(np.max(np.abs(want - full)) > 1e-4)
    # Not vacuous: removing a channel changes the logits (unless the random net left it dead).
    assert changed >= len(ones) - 1


def test_resnet_gates_act_on_batchnorm_only():
    specs = _zoo("resnet20")[2]
    paths = channel_groups(specs).paths
    sites = gates.gate_sites(specs)
    gated = {paths[i] for members in sites.values() for i, _ in members}
    assert gated and all(p.rsplit("/", 1)[1] in ("scale", "bias") for p in gated)
    # The residual stream of stage 1: the stem's norm and every block's second norm.
    stream = {paths[i] for i, _ in sites["stem/conv"]}
    assert stream == {
        f"{b}/{leaf}" for b in ["stem/bn"] + [f"stage1/block{j}/bn2" for j in range(3)] for leaf in ("scale", "bias")
    }


def _toy():
    """A residual group with a normalized branch (conv_a + bn_a) and a plain one (conv_b with bias)."""
    params = {
        "a": {"conv": {"kernel": jnp.ones((3, 4))}, "bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)}},
        "b": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)},
        "head": {"kernel": jnp.ones((4, 2))},
    }
    f = Filter(group="s")
    specs = {
        "a": {"conv": {"kernel": f}, "bn": {"scale": f, "bias": f}},
        "b": {"kernel": f, "bias": f},
        "head": {"kernel": Channel(group="s")},
    }
    return params, specs


def test_an_unnormalized_branch_is_gated_on_its_kernel():
    params, specs = _toy()
    out = gates.apply(params, {"s": jnp.array([0.0, 0.5, 1.0, 2.0])}, specs)
    g = np.array([0.0, 0.5, 1.0, 2.0])
    np.testing.assert_array_equal(out["a"]["conv"]["kernel"], np.ones((3, 4)))  # its norm carries the gate
    for leaf in (out["a"]["bn"]["scale"], out["a"]["bn"]["bias"], out["b"]["bias"]):
        np.testing.assert_array_equal(leaf, g)
    np.testing.assert_array_equal(out["b"]["kernel"], np.tile(g, (3, 1)))
    np.testing.assert_array_equal(out["head"]["kernel"], np.ones((4, 2)))  # consumers are not gated


def test_sliced_and_repeated_members_get_their_channels():
    params = {"k": jnp.ones((2, 6)), "d": jnp.ones((8, 1)), "r": jnp.ones(6)}
    specs = {
        "k": Coupled((Filter(group="x", size=2), Filter(group="y", offset=2))),
        "d": Channel(group="y", repeat=2),
        "r": Filter(group="z", repeat=2),
    }
    g = {"x": jnp.array([0.0, 2.0]), "y": jnp.array([3.0, 4.0, 5.0, 6.0]), "z": jnp.array([7.0, 8.0, 9.0])}
    out = gates.apply(params, g, specs)
    np.testing.assert_array_equal(out["k"], np.tile([0.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 1)))
    np.testing.assert_array_equal(out["d"], np.ones((8, 1)))  # a consumer
    np.testing.assert_array_equal(out["r"], [7.0, 8.0, 9.0, 7.0, 8.0, 9.0])  # channel c owns c and c + 3


def test_a_norm_offset_without_scale_cannot_be_gated():
    params = {"conv": {"kernel": jnp.ones((3, 4))}, "ln": {"bias": jnp.ones(4)}}
    specs = {"conv": {"kernel": Filter(group="c")}, "ln": {"bias": Filter(group="c")}}
    with pytest.raises(ValueError, match="normalization without scale"):
        gates.apply(params, gates.init(params, specs), specs)


def test_unknown_groups_are_rejected():
    params, specs = _toy()
    with pytest.raises(ValueError, match="nope"):
        gates.apply(params, {"nope": jnp.ones(4)}, specs)


def test_fold_equals_apply():
    _, params, specs, _ = _zoo("resnet20")
    g = jax.tree.map(lambda a: jnp.linspace(0.0, 1.5, a.shape[0]), gates.init(params, specs))
    for a, b in zip(
        jax.tree.leaves(gates.fold(params, g, specs)), jax.tree.leaves(gates.apply(params, g, specs)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_gradients_match_finite_differences(name):
    forward, params, specs, x = _zoo(name)
    rng = np.random.default_rng(5)
    ones = gates.init(params, specs)
    g0 = {k: rng.uniform(0.5, 1.5, a.shape) for k, a in ones.items()}
    direction = {k: rng.standard_normal(a.shape) for k, a in ones.items()}
    weights = rng.standard_normal(forward(params, x).shape)
    # In float64, so that central differences resolve the derivative to ~1e-8.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        p64 = jax.tree.map(lambda a: a.astype(jnp.float64), params)

        @jax.jit
        def loss(g):
            return jnp.sum(forward(gates.apply(p64, g, specs), x.astype(jnp.float64)) * weights)

        grad = jax.grad(loss)({k: jnp.asarray(v) for k, v in g0.items()})
        predicted = sum(float(jnp.vdot(grad[k], direction[k])) for k in grad)
        eps = 1e-6
        fd = (loss({k: g0[k] + eps * direction[k] for k in g0}) - loss({k: g0[k] - eps * direction[k] for k in g0})) / (
            2 * eps
        )
    np.testing.assert_allclose(predicted, float(fd), rtol=1e-6)


def test_penalties():
    g = {"a": jnp.array([0.0, 0.5, -1.0]), "b": jnp.array([1.0])}
    assert float(gates.l1(g)) == 2.5
    assert float(gates.polarization({"a": jnp.array([0.0, 0.5, 1.0])})) == 0.25
    s = gates.sigmoid_gates({"a": jnp.array([0.0, 2.0])}, temperature=0.5)
    np.testing.assert_allclose(s["a"], jax.nn.sigmoid(jnp.array([0.0, 4.0])))
    grad = jax.grad(gates.polarization)({"a": jnp.array([0.1, 0.5, 0.9])})["a"]
    np.testing.assert_allclose(grad, [0.8, 0.0, -0.8], atol=1e-6)  # pushes gates away from 1/2


def test_flops_penalty():
    def macs_model(k):
        return 100.0 * jnp.sum(k["a"])

    over, under = {"a": jnp.ones(4)}, {"a": jnp.full(4, 0.25)}
    assert float(gates.flops_penalty(over, macs_model, 200.0)) == 1.0  # (400 / 200 - 1)^2
    assert float(gates.flops_penalty(under, macs_model, 200.0)) == 0.0
    assert float(gates.flops_penalty(under, macs_model, 200.0, one_sided=False)) == 0.25
    grad = jax.jit(jax.grad(lambda k: gates.flops_penalty(k, macs_model, 200.0)))(over)["a"]
    np.testing.assert_allclose(grad, np.full(4, 2 * 1.0 * 100.0 / 200.0))
