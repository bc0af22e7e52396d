"""Criteria: scores against brute force, masks feasible and consistent with hard_prune."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admmprune import collapse, criteria, discovery, graph, masking, models, path_str
from admmprune import projections as P
from admmprune.core.groups import channel_groups
from admmprune.sparsity import Channel, Coupled, Filter, Unstructured


def fast_model(name, seed=0, **kwargs):
    """A registered model with random weights (BatchNorm scales in [0.5, 1.5]), built
    without compiling its initializers: eager init compiles a truncated-normal program
    per kernel shape, about 10 s for a ResNet-20 on a loaded CPU."""
    model = nnx.eval_shape(lambda: models.get(name, **kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        last = path_str(path).rsplit("/", 1)[-1]
        if last in ("var", "mean"):
            return jnp.full(x.shape, 1.0 if last == "var" else 0.0, x.dtype)
        if last == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        return jnp.asarray(rng.normal(size=x.shape) / np.sqrt(max(np.prod(x.shape[:-1]), 1)), x.dtype)

    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
    nnx.update(model, state)
    return model


def split_params(model):
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return params


def specs_of(model, params):
    """The pipeline's spec source: a declared chain, else traced discovery."""
    if getattr(model, "chain", None) is not None:
        return graph.chain_specs(params, model.chain)
    example = jax.ShapeDtypeStruct((1, *model.config["in_shape"]), jnp.float32)
    return discovery.discover_nnx(model, example).specs


@pytest.fixture(scope="module")
def lenet():
    model = fast_model("lenet5", features=(6, 8, 12))
    params = split_params(model)
    return model, params, specs_of(model, params)


@pytest.fixture(scope="module")
def resnet():
    model = fast_model("resnet20", in_shape=(8, 8, 3))
    params = split_params(model)
    return model, params, specs_of(model, params)


def hand_built():
    """Group "a": a conv's filters, its bias and the next conv's input channels; group
    "b": that conv's filters and the input rows of a dense layer that reads them
    flattened (repeat 4); an unstructured leaf outside every group."""
    rng = np.random.default_rng(0)
    params = {
        "a": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=(4,))},
        "b": {"kernel": rng.normal(size=(3, 3, 4, 5))},
        "fc": {"kernel": rng.normal(size=(20, 6))},
        "head": {"kernel": rng.normal(size=(6, 3)), "other": rng.normal(size=(6, 7))},
    }
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    specs = {
        "a": {"kernel": Filter(group="a"), "bias": Filter(group="a")},
        "b": {"kernel": Coupled((Channel(group="a"), Filter(group="b")))},
        "fc": {"kernel": Coupled((Channel(group="b", repeat=4), Filter(group="fc")))},
        "head": {"kernel": Channel(group="fc"), "other": Unstructured()},
    }
    return params, specs


def needs(criterion, params):
    if criterion == "taylor":
        return {"grads": [jax.tree.map(lambda x: jnp.full(x.shape, 0.1, x.dtype) * x, params)]}
    if criterion == "random":
        return {"key": jax.random.key(0)}
    return {}


@functools.cache
def _member_channels(groups):
    """A jitted ``masks -> (kept channels of each member, masks those channels give)``
    (eager, the many small ops take seconds on a ResNet)."""

    @jax.jit
    def check(flat):
        alive = [[P.groups_alive(flat[m.leaf], m.spec) for m in g.members] for g in groups]
        rebuilt = [None] * len(flat)
        for g, kept in zip(groups, alive, strict=True):
            for m in g.members:
                mask = P.expand_groups(kept[0], m.spec, flat[m.leaf].shape)
                rebuilt[m.leaf] = mask if rebuilt[m.leaf] is None else rebuilt[m.leaf] & mask
        return alive, rebuilt

    return check


def channel_sets(masks, params, specs):
    """{group: kept channels of each member}; checks that the masks are exactly
    what those channels give (a leaf in two groups keeps what both keep)."""
    groups = channel_groups(specs, params, lone=True)  # the groups the criteria score
    flat = groups.flatten(masks)
    alive, rebuilt = _member_channels(groups)(flat)
    for i, m in enumerate(rebuilt):
        if m is not None:
            np.testing.assert_array_equal(flat[i], m, err_msg=groups.paths[i])
    return {
        g.name: [frozenset(np.flatnonzero(a).tolist()) for a in kept] for g, kept in zip(groups, alive, strict=True)
    }


@pytest.mark.parametrize(
    ("net", "criterion"),
    [("resnet", c) for c in criteria.CRITERIA] + [("lenet", "l1"), ("lenet", "taylor")],
)
def test_layer_masks_keep_the_same_k_channels_in_every_member(request, net, criterion):
    _, params, specs = request.getfixturevalue(net)
    s = criteria.scores(params, specs, criterion, **needs(criterion, params))
    assert not criteria.unavailable(s)
    masks = criteria.select(s, specs, params, 0.4, round_to=2 if net == "resnet" else 1)
    for name, sets in channel_sets(masks, params, specs).items():
        c = s[name].shape[0]
        k = int(P.num_kept(c, 0.4, 2 if net == "resnet" else 1))
        assert all(x == sets[0] for x in sets), name
        assert len(sets[0]) == k
        top = np.argsort(-np.asarray(s[name]), kind="stable")[:k]
        assert sets[0] == frozenset(top.tolist())


def test_l2_selection_is_hard_prune(resnet):
    _, params, specs = resnet
    masks = criteria.select(criteria.scores(params, specs, "l2"), specs, params, 0.3)
    _, expected = jax.jit(lambda p: masking.hard_prune(p, specs, 0.3))(params)
    assert jax.tree.structure(masks) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(masks), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(a, b)


def test_l1_l2_lamp_equal_brute_force_on_a_hand_built_group():
    params, specs = hand_built()
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    a = [
        np.abs(p["a"]["kernel"][..., c]).sum() + abs(p["a"]["bias"][c]) + np.abs(p["b"]["kernel"][:, :, c, :]).sum()
        for c in range(4)
    ]
    sq = [
        (p["a"]["kernel"][..., c] ** 2).sum() + p["a"]["bias"][c] ** 2 + (p["b"]["kernel"][:, :, c, :] ** 2).sum()
        for c in range(4)
    ]
    np.testing.assert_allclose(criteria.scores(params, specs, "l1")["a"], a, rtol=1e-5)
    np.testing.assert_allclose(criteria.scores(params, specs, "l2")["a"], np.sqrt(sq), rtol=1e-5)
    order = np.argsort(sq)
    lamp = {u: sq[u] / sum(sq[v] for v in order[list(order).index(u) :]) for u in range(4)}
    np.testing.assert_allclose(criteria.scores(params, specs, "lamp")["a"], [lamp[u] for u in range(4)], rtol=1e-5)
    # "b" is read by "fc" as a flattened (2, 2, 5) map: channel c owns rows c, c + 5, c + 10, c + 15
    b = [np.abs(p["b"]["kernel"][..., c]).sum() + np.abs(p["fc"]["kernel"][c::5, :]).sum() for c in range(5)]
    np.testing.assert_allclose(criteria.scores(params, specs, "l1")["b"], b, rtol=1e-5)


def test_repeat_rows_belong_to_their_channel():
    x = jnp.arange(12.0, dtype=jnp.float32).reshape(6, 2)  # 3 channels x repeat 2 on the input axis
    params, specs = {"k": x}, {"k": Channel(group="g", repeat=2)}
    expected = [sum(abs(x[c + 3 * j, o]) for j in range(2) for o in range(2)) for c in range(3)]
    np.testing.assert_allclose(criteria.scores(params, specs, "l1")["g"], expected)


def test_lamp_scores_are_in_0_1_with_the_largest_1(resnet):
    _, params, specs = resnet
    for name, s in criteria.scores(params, specs, "lamp").items():
        s = np.asarray(s)
        assert np.all((s > 0) & (s <= 1)), name
        assert s.max() == 1.0
        assert np.argmax(s) == np.argmax(np.asarray(criteria.scores(params, specs, "l2")[name]))
    np.testing.assert_array_equal(criteria.lamp_scores(jnp.zeros(3)), np.zeros(3))


def test_fpgm_equals_brute_force_on_a_small_layer():
    params, specs = hand_built()
    f = np.asarray(params["a"]["kernel"], np.float64).reshape(-1, 4).T
    brute = [sum(np.linalg.norm(f[c] - f[j]) for j in range(4)) for c in range(4)]
    np.testing.assert_allclose(criteria.scores(params, specs, "fpgm")["a"], brute, rtol=1e-4)
    # "b" has one producing kernel (b/kernel's Filter member); fc's input rows do not count
    g = np.asarray(params["b"]["kernel"], np.float64).reshape(-1, 5).T
    brute = [sum(np.linalg.norm(g[c] - g[j]) for j in range(5)) for c in range(5)]
    np.testing.assert_allclose(criteria.scores(params, specs, "fpgm")["b"], brute, rtol=1e-4)


def test_fpgm_is_nan_without_a_producing_kernel():
    params = {"bias": jnp.ones(3, jnp.float32), "next": jnp.ones((3, 2), jnp.float32)}
    specs = {"bias": Filter(group="g"), "next": Channel(group="g")}
    s = criteria.scores(params, specs, "fpgm")
    assert criteria.unavailable(s) == ("g",)


def test_taylor_matches_a_manual_computation():
    params, specs = hand_built()
    rng = np.random.default_rng(3)
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(3)]
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    manual = np.zeros(4)
    for g in grads:
        g = jax.tree.map(lambda x: np.asarray(x, np.float64), g)
        t = [
            (p["a"]["kernel"][..., c] * g["a"]["kernel"][..., c]).sum()
            + p["a"]["bias"][c] * g["a"]["bias"][c]
            + (p["b"]["kernel"][:, :, c, :] * g["b"]["kernel"][:, :, c, :]).sum()
            for c in range(4)
        ]
        manual += np.square(t) / len(grads)
    np.testing.assert_allclose(criteria.scores(params, specs, "taylor", grads=grads)["a"], manual, rtol=1e-4)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *grads)
    np.testing.assert_allclose(criteria.scores(params, specs, "taylor", grads=stacked)["a"], manual, rtol=1e-4)


def test_random_is_reproducible_by_key(lenet):
    _, params, specs = lenet
    a = criteria.scores(params, specs, "random", key=jax.random.key(7))
    b = criteria.scores(params, specs, "random", key=jax.random.key(7))
    c = criteria.scores(params, specs, "random", key=jax.random.key(8))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        assert not np.array_equal(a[name], c[name])
        assert np.all((np.asarray(a[name]) >= 0) & (np.asarray(a[name]) < 1))
    assert not np.array_equal(a["conv1"], a["conv2"][:6])  # each group its own draw


def test_bn_scale_is_mean_abs_gamma(resnet):
    _, params, specs = resnet
    s = criteria.scores(params, specs, "bn_scale")
    stem = [params["stem"]["bn"]["scale"][...]] + [params["stage1"][f"block{i}"]["bn2"]["scale"][...] for i in range(3)]
    np.testing.assert_allclose(s["stem/conv"], np.mean(np.abs(stem), axis=0), rtol=1e-6)


def test_bn_scale_without_norms_is_nan_and_select_names_the_group(lenet):
    _, params, specs = lenet
    s = criteria.scores(params, specs, "bn_scale")
    assert criteria.unavailable(s) == ("conv1", "conv2", "fc1")
    assert all(np.isnan(np.asarray(v)).all() for v in s.values())
    with pytest.raises(ValueError, match="group 'conv1' has NaN scores.*bn_scale"):
        criteria.select(s, specs, params, 0.5)


def test_global_keeps_the_global_count_and_one_per_group(lenet):
    _, params, specs = lenet
    s = criteria.scores(params, specs, "l1")
    # conv1's scores far below everything else: a plain threshold would remove the whole layer
    s = {**s, "conv1": s["conv1"] * 1e-6}
    total = sum(v.shape[0] for v in s.values())
    for keep in (0.05, 0.3, 0.9):
        masks = criteria.select(s, specs, params, keep, scope="global")
        sets = channel_sets(masks, params, specs)
        kept = {n: len(v[0]) for n, v in sets.items()}
        assert all(k >= 1 for k in kept.values())
        assert sum(kept.values()) == max(int(P.num_kept(total, keep)), len(s))
        assert all(all(x == v[0] for x in v) for v in sets.values())
        # one threshold: every kept channel (but a group's forced best) outranks every removed one
        flat_kept = [float(s[n][c]) for n in s for c in sets[n][0] if c != int(np.argmax(s[n]))]
        flat_removed = [float(s[n][c]) for n in s for c in range(s[n].shape[0]) if c not in sets[n][0]]
        if flat_kept and flat_removed:
            assert min(flat_kept) >= max(flat_removed)
    assert kept["conv1"] >= 1


def test_global_with_round_to_keeps_multiples(lenet):
    _, params, specs = lenet
    s = criteria.scores(params, specs, "lamp")
    masks = criteria.select(s, specs, params, 0.5, scope="global", round_to=4)
    for name, sets in channel_sets(masks, params, specs).items():
        assert len(sets[0]) % 4 == 0 or len(sets[0]) == s[name].shape[0], name


def test_jit_equals_eager(lenet):
    _, params, specs = lenet

    @jax.jit
    def masks_of(params, keep):
        s = criteria.scores(params, specs, "lamp")
        return s, criteria.select(s, specs, params, keep, scope="global")

    s, m = masks_of(params, 0.5)
    eager = criteria.scores(params, specs, "lamp")
    for name in s:
        np.testing.assert_allclose(s[name], eager[name], rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(m), jax.tree.leaves(criteria.select(eager, specs, params, 0.5, scope="global")), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # a new ratio is a new value, not a new program
    masks_of(params, 0.25)
    assert masks_of._cache_size() == 1


def test_other_specs_fall_back_to_magnitude():
    params, specs = hand_built()
    masks = criteria.select(criteria.scores(params, specs, "l1"), specs, params, 0.5)
    np.testing.assert_array_equal(
        masks["head"]["other"], P.projection_mask(params["head"]["other"], Unstructured(), 0.5)
    )
    assert int(masks["head"]["other"].sum()) == 21
    # ungrouped channel specs (the default rules) are groups of their own
    params2 = {"k": params["a"]["kernel"]}
    s = criteria.scores(params2, {"k": Filter()}, "l2")
    assert list(s) == ["k"]
    np.testing.assert_array_equal(
        criteria.select(s, {"k": Filter()}, params2, 0.5)["k"],
        P.projection_mask(params2["k"], Filter(), 0.5),
    )


def test_masks_collapse_the_model(lenet):
    model, params, specs = lenet
    masks = criteria.select(criteria.scores(params, specs, "fpgm"), specs, params, 0.5)
    slim = collapse.collapse(model, masks, specs)
    assert slim.widths == (3, 4, 6)


def test_errors(lenet):
    _, params, specs = lenet
    s = criteria.scores(params, specs, "l1")
    with pytest.raises(ValueError, match="unknown criterion 'l3'"):
        criteria.scores(params, specs, "l3")
    with pytest.raises(ValueError, match="needs a jax.random key"):
        criteria.scores(params, specs, "random")
    with pytest.raises(ValueError, match="needs grads"):
        criteria.scores(params, specs, "taylor")
    with pytest.raises(ValueError, match="shapes of params"):
        criteria.scores(params, specs, "taylor", grads=[{"conv1": 1}])
    with pytest.raises(ValueError, match="unknown scope"):
        criteria.select(s, specs, params, 0.5, scope="net")
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        criteria.select(s, specs, params, 0.0)
    with pytest.raises(ValueError, match="missing \\['fc1'\\]"):
        criteria.select({k: v for k, v in s.items() if k != "fc1"}, specs, params, 0.5)
    with pytest.raises(ValueError, match="group 'conv1' has 6 channels"):
        criteria.select({**s, "conv1": s["conv1"][:3]}, specs, params, 0.5)
    with pytest.raises(ValueError, match="round_to"):
        criteria.select(s, specs, params, 0.5, round_to=0)


def test_channel_groups_lists_members(lenet):
    _, params, specs = lenet
    groups = criteria.channel_groups(params, specs)
    assert groups["conv2"] == (8, ("conv2/bias", "conv2/kernel", "fc1/kernel"))
