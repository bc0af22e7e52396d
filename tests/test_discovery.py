"""Channel groups discovered from jaxprs: exact specs, and pruned channels are really dead.

The soundness check (:func:`check_dead`) zeroes a random subset of every
discovered group's channels in every member, then perturbs what the masks
removed:

* *producer side* (``Filter`` members: kernel output slices, biases,
  normalization scales): the removed channels then carry arbitrary values. The
  output must not change: nothing outside the group reads them, so removing
  them physically (collapse) gives the same function. A consumer that
  discovery missed, or a removed channel reaching the output, fails this.
* *consumer side* (``Channel`` members: the rows of the next layers that read
  the channels): the output must not change either, because the removed
  channels are exactly zero when they are read. A residual branch or a
  normalization offset left out of the group fails this.

Both perturb only masked-out entries, so each checks a necessary condition of
exact collapse, and together they are sufficient for these models. A third
perturbation, of *kept* entries, must change the output: the check is not
vacuous.
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import admmprune as ap
from admmprune import graph, models, path_str
from admmprune.collapse import collapse, masked
from admmprune.discovery import DiscoveryError, discover, discover_nnx, discover_specs
from admmprune.projections import coupled_groups, expand_groups, groups_alive, num_groups
from admmprune.sparsity import Channel, Coupled, Filter, is_spec

# --- helpers -------------------------------------------------------------------


def flat(specs):
    """``{path: spec}`` of a spec tree."""
    return {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]}


def random_keep(specs, params, seed):
    """A random boolean per channel of every group: some kept, some removed."""
    rng = np.random.default_rng(seed)
    leaves = jax.tree.leaves(params)
    keep = {}
    for name, members in coupled_groups(specs).items():
        n = num_groups(leaves[members[0][0]].shape, members[0][1])
        k = rng.random(n) < 0.5
        k[rng.integers(n)] = True
        if n > 1 and k.all():
            k[rng.integers(n)] = False
        keep[name] = k
    return keep


def expand(keep, spec, shape):
    """The elementwise mask of one channel member (True outside its slice)."""
    return np.asarray(expand_groups(jnp.asarray(keep), spec, shape))


def removed_by_role(specs, params, keep):
    """Per leaf: (entries removed by a Filter member, by a Channel member)."""
    flat_specs, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    leaves = treedef.flatten_up_to(params)
    out = []
    for spec, x in zip(flat_specs, leaves, strict=True):
        members = spec.specs if isinstance(spec, Coupled) else () if spec is None else (spec,)
        by_filter = np.zeros(x.shape, bool)
        by_channel = np.zeros(x.shape, bool)
        for m in members:
            gone = ~expand(keep[m.group], m, x.shape)
            if isinstance(m, Filter):
                by_filter |= gone
            else:
                by_channel |= gone
        out.append((by_filter, by_channel))
    return out


def replace(params, which, values):
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten(
        [np.where(w, v, x) for x, v, w in zip(leaves, jax.tree.leaves(values), which, strict=True)]
    )


def check_dead(fn, params, specs, *args, consumers=True, producers=True, seed=0):
    """Pruned channels are dead (see the module docstring); returns the group keep vectors."""
    keep = random_keep(specs, params, seed)
    assert keep, "no group was discovered"
    roles = removed_by_role(specs, params, keep)
    masked = replace(params, [f | c for f, c in roles], jax.tree.map(np.zeros_like, params))
    f = jax.jit(fn)
    y = np.asarray(f(masked, *args))
    assert np.all(np.isfinite(y))
    scale = np.abs(y).max() + 1e-3
    noise = randomize(params, seed + 1)
    if producers:
        y2 = np.asarray(f(replace(masked, [fl for fl, _ in roles], noise), *args))
        np.testing.assert_allclose(y2, y, atol=1e-4 * scale, err_msg="a removed channel reaches a kept one")
    if consumers:
        y3 = np.asarray(f(replace(masked, [ch for _, ch in roles], noise), *args))
        np.testing.assert_allclose(y3, y, atol=1e-4 * scale, err_msg="a removed channel is not zero where read")
    # Not vacuous: perturbing the kept entries of the pruned parameters does change the output.
    kept = [(fl | ch).any() & ~(fl | ch) for fl, ch in roles]
    y4 = np.asarray(f(replace(masked, kept, noise), *args))
    assert np.abs(y4 - y).max() > 1e-3 * scale
    return keep


def eval_fn(model):
    """``fn(params, x)`` in eval mode, with random BatchNorm statistics captured.

    ``model`` may be abstract (``nnx.eval_shape``): it has BatchNorm statistics
    as its only non-``Param`` state then.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rest = randomize(rest, seed=7)

    def fn(p, x):
        m = nnx.merge(graphdef, p, rest, copy=True)
        m.eval()
        return m(x)

    return fn, params


def randomize(params, seed=3):
    """Random arrays shaped like ``params`` (NNX initializes biases and BN offsets to 0
    and scales to 1), with positive BatchNorm variances."""
    rng = np.random.default_rng(seed)

    def rand(path, x):
        if path_str(path).endswith("/var"):
            return rng.uniform(0.5, 2.0, x.shape).astype(x.dtype)
        return rng.normal(0, 0.5, x.shape).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(rand, params)


def run_case(model, x, **kw):
    found = discover_nnx(model, x)
    fn, params = eval_fn(model)
    check_dead(fn, randomize(params), found.specs, x, **kw)
    return found


R = nnx.Rngs(0)
X = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)


# --- the declared chains -----------------------------------------------------------


@pytest.mark.parametrize("name,kwargs", [("lenet5", {"features": (6, 8, 12)}), ("mlp", {"hidden": (30, 10)})])
def test_discovery_equals_the_declared_chain(name, kwargs):
    model = models.get(name, **kwargs)
    fn, params = models.apply_fn(model)
    x = jnp.zeros((2, 28, 28, 1))
    found = discover(fn, params, x)
    expected = graph.chain_specs(params, model.chain)
    assert jax.tree.structure(found.specs, is_leaf=is_spec) == jax.tree.structure(expected, is_leaf=is_spec)
    assert flat(found.specs) == flat(expected)
    assert list(found.groups) == [n for n, _ in model.chain[:-1]]
    assert list(found.unprunable) == [model.output_layer]
    assert discover_nnx(model, x).specs == found.specs
    # The spec tree works with the pruning functions unchanged, and every member
    # of a group loses the same channels.
    params = randomize(params)
    _, masks = jax.jit(lambda p: ap.hard_prune(p, found.specs, 0.5))(params)
    widths = graph.group_widths(params, found.specs, masks)
    assert all(kept == int(ap.projections.num_kept(total, 0.5)) for kept, total in widths.values())
    flat_masks = jax.tree.leaves(masks, is_leaf=lambda v: v is None)
    for group, members in coupled_groups(found.specs).items():
        alive = {tuple(np.asarray(groups_alive(flat_masks[i], s))) for i, s in members}
        assert len(alive) == 1, group
    check_dead(fn, params, found.specs, jnp.ones((2, 28, 28, 1)))


# --- hand-written models, one per kind of operation --------------------------------


class ConvBN(nnx.Module):
    def __init__(self):
        self.conv1 = nnx.Conv(3, 6, (3, 3), rngs=R)
        self.bn = nnx.BatchNorm(6, rngs=R)
        self.conv2 = nnx.Conv(6, 4, (3, 3), rngs=R)

    def __call__(self, x):
        return self.conv2(jax.nn.relu(self.bn(self.conv1(x))))


def test_conv_bn_relu_conv():
    found = run_case(ConvBN(), X)
    g = "conv1"
    assert flat(found.specs) == {
        "bn/bias": Filter(group=g),
        "bn/scale": Filter(group=g),
        "conv1/bias": Filter(group=g),
        "conv1/kernel": Filter(group=g),
        "conv2/bias": None,
        "conv2/kernel": Channel(group=g),
    }
    # BatchNorm statistics are not Params: they are in state_specs, same group.
    assert flat(found.state_specs) == {"bn/mean": Filter(group=g), "bn/var": Filter(group=g)}
    assert found.groups[g].channels == 6
    assert "bn/mean" in dict(found.groups[g].members)
    assert list(found.unprunable) == ["conv2"]


class Residual(nnx.Module):
    def __init__(self, projection):
        self.stem = nnx.Conv(3, 6, (3, 3), rngs=R)
        self.a = nnx.Conv(6, 5, (3, 3), rngs=R)
        self.bn_a = nnx.BatchNorm(5, rngs=R)
        out = 7 if projection else 6
        self.b = nnx.Conv(5, out, (3, 3), rngs=R)
        self.bn_b = nnx.BatchNorm(out, rngs=R)
        self.proj = nnx.Conv(6, out, (1, 1), use_bias=False, rngs=R) if projection else None
        self.head = nnx.Linear(out, 3, rngs=R)

    def __call__(self, x):
        x = jax.nn.relu(self.stem(x))
        y = self.bn_b(self.b(jax.nn.relu(self.bn_a(self.a(x)))))
        x = jax.nn.relu(y + (x if self.proj is None else self.proj(x)))
        return self.head(x.mean(axis=(1, 2)))


def test_residual_identity_shortcut_merges_the_groups():
    found = run_case(Residual(projection=False), X)
    specs = flat(found.specs)
    assert list(found.groups) == ["stem", "a"]
    assert specs["b/kernel"] == Coupled((Channel(group="a"), Filter(group="stem")))
    assert specs["bn_b/scale"] == Filter(group="stem")
    assert specs["a/kernel"] == Coupled((Channel(group="stem"), Filter(group="a")))
    assert specs["head/kernel"] == Channel(group="stem")
    assert flat(found.state_specs)["bn_b/mean"] == Filter(group="stem")


def test_residual_projection_shortcut():
    found = run_case(Residual(projection=True), X)
    specs = flat(found.specs)
    assert list(found.groups) == ["stem", "a", "b"]
    assert specs["proj/kernel"] == Coupled((Channel(group="stem"), Filter(group="b")))
    assert specs["b/kernel"] == Coupled((Channel(group="a"), Filter(group="b")))
    assert specs["head/kernel"] == Channel(group="b")
    assert [p for p, _ in found.groups["stem"].members] == ["a/kernel", "proj/kernel", "stem/bias", "stem/kernel"]


class Concat(nnx.Module):
    def __init__(self):
        self.left = nnx.Conv(3, 4, (3, 3), rngs=R)
        self.right = nnx.Conv(3, 5, (1, 1), rngs=R)
        self.bn = nnx.BatchNorm(9, rngs=R)
        self.fuse = nnx.Conv(9, 2, (3, 3), rngs=R)

    def __call__(self, x):
        y = jnp.concatenate([jax.nn.relu(self.left(x)), jax.nn.relu(self.right(x))], axis=-1)
        return self.fuse(self.bn(y))


def test_concatenation_gives_offsets():
    found = run_case(Concat(), X)
    specs = flat(found.specs)
    assert specs["fuse/kernel"] == Coupled(
        (Channel(group="left", offset=0, size=4), Channel(group="right", offset=4, size=5))
    )
    # The BatchNorm after the concatenation is in both groups, a slice each.
    both = Coupled((Filter(group="left", offset=0, size=4), Filter(group="right", offset=4, size=5)))
    assert specs["bn/scale"] == both
    assert flat(found.state_specs)["bn/var"] == both
    assert {n: g.channels for n, g in found.groups.items()} == {"left": 4, "right": 5}


class ConcatPlusConv(nnx.Module):
    """A concatenation added to one conv's output: that conv's channels split in two groups."""

    def __init__(self):
        self.a = nnx.Conv(3, 4, (3, 3), rngs=R)
        self.b = nnx.Conv(3, 5, (1, 1), rngs=R)
        self.c = nnx.Conv(3, 9, (3, 3), rngs=R)
        self.d = nnx.Conv(9, 2, (1, 1), rngs=R)

    def __call__(self, x):
        y = jnp.concatenate([jax.nn.relu(self.a(x)), jax.nn.relu(self.b(x))], -1) + self.c(x)
        return self.d(jax.nn.relu(y))


def test_concatenation_added_to_a_producer_slices_the_producer():
    found = run_case(ConcatPlusConv(), X)
    both = (Filter(group="a", offset=0, size=4), Filter(group="b", offset=4, size=5))
    assert flat(found.specs)["c/kernel"] == Coupled(both)
    assert flat(found.specs)["c/bias"] == Coupled(both)


class SplitHeads(nnx.Module):
    """A channel split: each half of one conv's output feeds its own branch."""

    def __init__(self):
        self.conv = nnx.Conv(3, 8, (3, 3), rngs=R)
        self.a = nnx.Conv(3, 2, (1, 1), rngs=R)
        self.b = nnx.Conv(5, 2, (1, 1), rngs=R)

    def __call__(self, x):
        y = jax.nn.relu(self.conv(x))
        return self.a(y[..., :3]) + self.b(y[..., 3:])


def test_channel_split_splits_the_group():
    found = run_case(SplitHeads(), X)
    specs = flat(found.specs)
    assert specs["conv/kernel"] == Coupled(
        (Filter(group="conv[0:3]", offset=0, size=3), Filter(group="conv[3:8]", offset=3, size=5))
    )
    assert specs["a/kernel"] == Channel(group="conv[0:3]")
    assert specs["b/kernel"] == Channel(group="conv[3:8]")


class Depthwise(nnx.Module):
    def __init__(self):
        self.pw1 = nnx.Conv(3, 6, (1, 1), rngs=R)
        self.dw = nnx.Conv(6, 6, (3, 3), feature_group_count=6, rngs=R)
        self.bn = nnx.BatchNorm(6, rngs=R)
        self.pw2 = nnx.Conv(6, 4, (1, 1), rngs=R)

    def __call__(self, x):
        return self.pw2(jax.nn.relu6(self.bn(self.dw(jax.nn.relu(self.pw1(x))))))


def test_depthwise_conv_ties_input_and_output_channels():
    found = run_case(Depthwise(), X)
    specs = flat(found.specs)
    assert list(found.groups) == ["pw1"]
    assert specs["dw/kernel"] == Filter(group="pw1")
    assert specs["dw/bias"] == Filter(group="pw1")
    assert specs["pw2/kernel"] == Channel(group="pw1")


class Grouped(nnx.Module):
    def __init__(self):
        self.conv1 = nnx.Conv(3, 6, (1, 1), rngs=R)
        self.grouped = nnx.Conv(6, 6, (3, 3), feature_group_count=2, rngs=R)
        self.conv2 = nnx.Conv(6, 2, (1, 1), rngs=R)

    def __call__(self, x):
        return self.conv2(jax.nn.relu(self.grouped(jax.nn.relu(self.conv1(x)))))


def test_grouped_conv_channels_are_not_pruned():
    found = discover_nnx(Grouped(), X)
    assert not found.groups
    assert "grouped convolution" in " ".join(found.unprunable["conv1"])
    with pytest.raises(DiscoveryError, match="conv1.*feature_group_count=2"):
        discover_nnx(Grouped(), X, strict=True)


class Flatten(nnx.Module):
    def __init__(self):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=(2, 2), rngs=R)
        self.fc1 = nnx.Linear(4 * 4 * 4, 10, rngs=R)
        self.fc2 = nnx.Linear(10, 3, rngs=R)

    def __call__(self, x):
        x = jax.nn.relu(self.conv(x))
        return self.fc2(jax.nn.gelu(self.fc1(x.reshape(x.shape[0], -1))))


def test_flatten_into_dense_repeats_the_channels():
    found = run_case(Flatten(), X)
    specs = flat(found.specs)
    assert specs["fc1/kernel"] == Coupled((Channel(group="conv", repeat=16), Filter(group="fc1")))
    assert specs["fc2/kernel"] == Channel(group="fc1")


class Transposed(nnx.Module):
    def __init__(self):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=(2, 2), rngs=R)
        self.up = nnx.ConvTranspose(4, 5, (2, 2), strides=(2, 2), rngs=R)
        self.out = nnx.Conv(5, 2, (3, 3), rngs=R)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.up(jax.nn.relu(self.conv(x)))))


def test_conv_transpose():
    found = run_case(Transposed(), X)
    specs = flat(found.specs)
    assert specs["up/kernel"] == Coupled((Channel(group="conv"), Filter(group="up")))
    assert specs["up/bias"] == Filter(group="up")
    assert specs["out/kernel"] == Channel(group="up")


class Gathers(nnx.Module):
    """Gathers along non-channel axes: an embedding lookup and nearest upsampling."""

    def __init__(self):
        self.embed = nnx.Embed(7, 4, rngs=R)
        self.conv1 = nnx.Conv(4, 5, (3, 3), rngs=R)
        self.conv2 = nnx.Conv(5, 2, (3, 3), rngs=R)

    def __call__(self, ids):
        x = self.embed(ids)  # (B, H, W, 4)
        x = jax.nn.relu(self.conv1(x))
        x = jax.image.resize(x, (x.shape[0], 2 * x.shape[1], 2 * x.shape[2], x.shape[3]), "nearest")
        return self.conv2(x)


def test_gathers_along_other_axes_keep_the_channels():
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 7, (2, 4, 4)), jnp.int32)
    found = run_case(Gathers(), ids)
    specs = flat(found.specs)
    assert specs["embed/embedding"] == Filter(group="embed/embedding")
    assert specs["conv1/kernel"] == Coupled((Channel(group="embed/embedding"), Filter(group="conv1")))
    assert specs["conv2/kernel"] == Channel(group="conv1")


class Norms(nnx.Module):
    def __init__(self, norm):
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=R)
        self.norm = norm
        self.conv2 = nnx.Conv(4, 2, (3, 3), rngs=R)

    def __call__(self, x):
        return self.conv2(jax.nn.relu(self.norm(self.conv1(x))))


@pytest.mark.parametrize(
    "norm,statistics",
    [
        (lambda: nnx.LayerNorm(4, rngs=R), True),
        (lambda: nnx.GroupNorm(4, num_groups=1, rngs=R), True),
        (lambda: nnx.GroupNorm(4, num_groups=4, rngs=R), False),
    ],
    ids=["layernorm", "groupnorm1", "groupnorm-per-channel"],
)
def test_normalization_parameters_join_the_group(norm, statistics):
    model = Norms(norm())
    # Statistics over the channels change when channels are removed: by default
    # those channels are not pruned, and the reason names the sum and its line.
    found = discover_nnx(model, X)
    if statistics:
        assert not found.groups and not found.notes and not found.unfollowed
        reasons = " ".join(found.unprunable["conv1"])
        assert "`reduce_sum` at" in reasons and "approximate=True" in reasons and ".py:" in reasons
    # With approximate=True they are pruned, and a note says so; only the
    # consumer-side check holds exactly.
    found = discover_nnx(model, X, approximate=True)
    specs = flat(found.specs)
    assert specs["norm/scale"] == Filter(group="conv1") and specs["norm/bias"] == Filter(group="conv1")
    assert specs["conv2/kernel"] == Channel(group="conv1")
    assert bool(found.notes) == statistics
    fn, params = eval_fn(model)
    check_dead(fn, randomize(params), found.specs, X, producers=not statistics)


def test_groupnorm_with_several_groups_is_not_pruned():
    found = discover_nnx(Norms(nnx.GroupNorm(4, num_groups=2, rngs=R)), X)
    assert not found.groups
    assert "splits the channels" in " ".join(found.unprunable["conv1"])


class Attention(nnx.Module):
    """Two activations contracted over channels, as in attention scores."""

    def __init__(self, gate):
        self.q = nnx.Linear(3, 4, rngs=R)
        self.k = nnx.Linear(3, 4, rngs=R)
        self.v = nnx.Linear(3, 5, rngs=R)
        self.o = nnx.Linear(5, 2, rngs=R)
        self.gate = gate

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        q, k = self.q(x), self.k(x)
        if self.gate:  # the removed channels of q and k are 0.5, not 0
            q, k = jax.nn.sigmoid(q), jax.nn.sigmoid(k)
        s = jax.nn.softmax(jnp.einsum("btc,bsc->bts", q, k), axis=-1)
        return self.o(jnp.einsum("bts,bsc->btc", s, self.v(x)))


def test_contracting_two_activations():
    # Both sides of q @ k are pruned, so perturbing both producers would revive the
    # removed channels' products: only the consumer-side check applies.
    found = run_case(Attention(gate=False), X, producers=False)
    specs = flat(found.specs)
    assert specs["k/kernel"] == Filter(group="q") and specs["q/kernel"] == Filter(group="q")
    assert specs["o/kernel"] == Channel(group="v")
    gated = discover_nnx(Attention(gate=True), X)
    assert "q" not in gated.groups and "not zero" in " ".join(gated.unprunable["q"])


class MHABlock(nnx.Module):
    """A pre-norm-free attention block on ``nnx.MultiHeadAttention`` (per-head kernels)."""

    def __init__(self):
        self.embed = nnx.Linear(3, 8, rngs=R)
        self.mha = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=R)
        self.head = nnx.Linear(8, 2, rngs=R)

    def __call__(self, x):
        x = self.embed(x.reshape(x.shape[0], -1, x.shape[-1]))
        return self.head(x + self.mha(x))


def test_attention_heads_are_pruned_whole_never_their_dimension_too():
    found = discover_nnx(MHABlock(), X)
    heads = found.groups["mha/query"]
    assert heads.channels == 2 and len(found.groups) == 2  # the heads, and embed's channels
    assert {p for p, _ in heads.members} == {
        f"mha/{n}/{v}" for n in ("query", "key", "value") for v in ("kernel", "bias")
    } | {"mha/out/kernel"}
    assert flat(found.specs)["mha/query/kernel"] == Coupled(
        (Channel(axis=-3, group="embed"), Filter(axis=-2, group="mha/query"))
    )
    reasons = " ".join(found.unprunable["mha/value"])
    assert "mha/value/kernel[axis 2] is an inner output axis" in reasons and "linear.py" in reasons


class Tiled(nnx.Module):
    """A conv's channels tiled twice along the channel axis, then read by a dense layer."""

    def __init__(self):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=R)
        self.fc = nnx.Linear(2 * 4, 2, rngs=R)

    def __call__(self, x):
        h = jnp.mean(jax.nn.relu(self.conv(x)), axis=(1, 2))
        return self.fc(jnp.tile(h, (1, 2)))


def test_tile_along_the_channels_repeats_them():
    found = run_case(Tiled(), X)
    assert flat(found.specs)["fc/kernel"] == Channel(group="conv", repeat=2)


class Nested(nnx.Module):
    """ConvBN through jit, remat, a custom_vjp and a cond."""

    def __init__(self):
        self.inner = ConvBN()

    def __call__(self, x):
        @jax.custom_vjp
        def double(y):
            return 2 * y

        double.defvjp(lambda y: (double(y), None), lambda _, g: (2 * g,))
        m = self.inner
        y = jax.checkpoint(lambda z: m.bn(m.conv1(z)))(x)
        y = jax.jit(jax.nn.relu)(double(y))
        # (The predicate sums the input: a sum over the channels is refused, see test_normalization_*.)
        y = jax.lax.cond(x.sum() > 0, lambda z: z * 2, lambda z: z, y)
        return m.conv2(y)


def test_nested_jaxprs_are_followed():
    found = run_case(Nested(), X)
    g = "inner/conv1"
    assert flat(found.specs) == {
        "inner/bn/bias": Filter(group=g),
        "inner/bn/scale": Filter(group=g),
        "inner/conv1/bias": Filter(group=g),
        "inner/conv1/kernel": Filter(group=g),
        "inner/conv2/bias": None,
        "inner/conv2/kernel": Channel(group=g),
    }


class Linen(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(6, (3, 3))(x)))
        x = nn.relu(nn.Conv(5, (3, 3))(x))
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_linen_apply_function():
    model = Linen()
    variables = model.init(jax.random.key(0), X)
    found = discover(model.apply, variables, X)
    specs = flat(found.specs)
    assert specs["params/Conv_0/kernel"] == Filter(group="params/Conv_0")
    assert specs["batch_stats/BatchNorm_0/mean"] == Filter(group="params/Conv_0")
    assert specs["params/Dense_0/kernel"] == Channel(group="params/Conv_1", repeat=64)
    check_dead(model.apply, randomize(variables), found.specs, X)
    # ADMM takes the params part.
    ap.hard_prune(variables["params"], found.specs["params"], 0.5)


class LinenSyncBN(nn.Module):
    """BatchNorm that averages its batch statistics across devices (``axis_name``), as data-parallel Linen code does."""

    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(6, (3, 3))(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, axis_name="batch")(x))
        return nn.Dense(3)(x.mean((1, 2)))


def test_linen_batchnorm_with_an_axis_name_is_followed_in_training_mode():
    model = LinenSyncBN()
    variables = model.init(jax.random.key(0), X, train=False)

    def train_apply(v, x):  # the predictions only: the updated statistics would count as outputs
        return model.apply(v, x, train=True, mutable=["batch_stats"])[0]

    found = discover(train_apply, variables, X)  # its pmean over "batch" has no device axis here
    assert found.specs == discover(functools.partial(model.apply, train=False), variables, X).specs
    assert flat(found.specs)["params/BatchNorm_0/scale"] == Filter(group="params/Conv_0")
    # Under a real named axis (vmap over devices' batches) the same function runs and masks alike.
    small, masks = ap.hard_prune(variables["params"], found.specs["params"], 0.5)
    out = jax.vmap(train_apply, in_axes=(None, 0), axis_name="batch")({**variables, "params": small}, X[None])
    assert out.shape == (1, X.shape[0], 3) and np.isfinite(out).all()


class Resharded(nnx.Module):
    """A model written for an explicit-axes mesh: activations resharded between layers."""

    def __init__(self):
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=R)
        self.conv2 = nnx.Conv(4, 2, (3, 3), rngs=R)

    def __call__(self, x):
        x = jax.sharding.reshard(jax.nn.relu(self.conv1(x)), jax.P("data"))
        return self.conv2(jax.lax.with_sharding_constraint(x, jax.P("data")))


def test_reshard_and_sharding_constraints_pass_channels_through():
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    with jax.set_mesh(mesh):
        model = Resharded()
        x = jax.device_put(X, jax.P("data"))
        found = discover_nnx(model, x, strict=True)
    assert list(found.groups) == ["conv1"] and found.groups["conv1"].channels == 4


# --- what cannot be followed ---------------------------------------------------------


class Unfollowable(nnx.Module):
    """An operation between conv1 and conv2 that discovery cannot follow."""

    def __init__(self, op):
        self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=R)
        self.conv2 = nnx.Conv(4, 6, (3, 3), rngs=R)
        self.conv3 = nnx.Conv(6, 2, (3, 3), rngs=R)
        self.op = op

    def __call__(self, x):
        x = self.op(jax.nn.relu(self.conv1(x)))
        return self.conv3(jax.nn.relu(self.conv2(x)))


UNFOLLOWABLE = {
    # A channel permutation.
    "gather": (lambda x: x[..., jnp.array([1, 0, 3, 2])], "`gather` at .* selects entries along the channels"),
    # A primitive without a rule: every channel it touches is left alone, even
    # though this one only sorts along a spatial axis.
    "sort": (lambda x: jnp.sort(x, axis=1), "unsupported primitive `sort` at "),
}


@pytest.mark.parametrize("op", UNFOLLOWABLE)
def test_an_unfollowable_op_is_reported_or_raises(op, caplog):
    fn_op, message = UNFOLLOWABLE[op]
    model = Unfollowable(fn_op)
    found = discover_nnx(model, X)
    assert found.unfollowed == ("conv1",)
    assert list(found.groups) == ["conv2"]
    assert flat(found.specs)["conv1/kernel"] is None
    assert re.search(message, found.unprunable["conv1"][0])
    assert "test_discovery.py" in found.unprunable["conv1"][0]
    with pytest.raises(DiscoveryError, match="conv1: " + message):
        discover_nnx(model, X, strict=True)
    fn, params = eval_fn(model)
    specs = discover_specs(fn, params, X)
    assert flat(specs)["conv2/kernel"] == Filter(group="conv2")
    assert "channels of conv1 are not pruned" in caplog.text


def test_captured_statistics_make_channels_unprunable():
    # models.apply_fn captures BatchNorm statistics as constants: they could not
    # be sliced, so their channels are left alone and the reason says what to do.
    fn, params = models.apply_fn(ConvBN())
    found = discover(fn, params, X)
    assert not found.groups
    assert "discover_nnx" in found.unprunable["conv1"][0]


def test_inputs_and_outputs_are_never_pruned():
    def fn(p, x):
        return x + p["w"] * 2.0, jnp.tanh(p["v"])

    found = discover(fn, {"w": jnp.ones(3), "v": jnp.ones(4)}, jnp.ones((2, 3)))
    assert flat(found.specs) == {"v": None, "w": None}


def test_overrides_take_precedence():
    model = ConvBN()
    found = discover_nnx(model, X, overrides={"conv2/bias": Filter()})
    assert flat(found.specs)["conv2/bias"] == Filter()
    with pytest.raises(ValueError, match="do not exist"):
        discover_nnx(model, X, overrides={"conv9/kernel": None})
    # Taking one member out of a group would leave a model that does not fit together.
    with pytest.raises(ValueError, match="takes it out of channel group 'conv1', whose other members"):
        discover_nnx(model, X, overrides={"bn/mean": None})
    # A whole spec tree, e.g. a declared chain, replaces every spec.
    lenet = models.get("lenet5", features=(3, 4, 5))
    fn, params = models.apply_fn(lenet)
    chain = graph.chain_specs(params, lenet.chain)
    assert discover(fn, params, jnp.zeros((1, 28, 28, 1)), overrides=chain).specs == chain
    with pytest.raises(ValueError, match="disagree"):
        discover(fn, params, jnp.zeros((1, 28, 28, 1)), overrides={"conv2/bias": Filter(group="conv1")})


def test_exclude_leaves_whole_groups_unpruned_and_says_why():
    model = models.get("lenet5", features=(3, 4, 5))
    found = discover_nnx(model, jnp.zeros((1, 28, 28, 1)), exclude=["^conv2/"])
    # conv2/kernel reads conv1's channels and makes conv2's: both groups go, whole; fc1's stays.
    assert list(found.groups) == ["fc1"]
    assert flat(found.specs)["conv1/kernel"] is None and flat(found.specs)["fc1/kernel"] == Filter(group="fc1")
    assert "excluded: it reaches conv2/kernel (exclude pattern '^conv2/')" in found.unprunable["conv1"]
    assert found.unprunable["conv2"] == ("excluded: it reaches conv2/bias (exclude pattern '^conv2/')",)
    # What is left still prunes and collapses to the masked model.
    _, masks = ap.hard_prune(nnx.state(model, nnx.Param), found.specs, 0.5)
    small = collapse(model, masks, found)
    x = jnp.ones((2, 28, 28, 1))
    np.testing.assert_allclose(small(x), masked(model, masks, found)(x), rtol=1e-5, atol=1e-6)
    assert (small.conv1.out_features, small.conv2.out_features, small.fc1.out_features) == (3, 4, 3)
    with pytest.raises(ValueError, match="matches no parameter path"):
        discover_nnx(model, jnp.zeros((1, 28, 28, 1)), exclude="attention")


# --- the model zoo ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,kwargs",
    [
        ("resnet20", {"in_shape": (8, 8, 3)}),
        ("mobilenetv2", {"width_mult": 0.25, "in_shape": (8, 8, 3), "small_input": True, "num_classes": 4}),
    ],
)
def test_zoo_models(name, kwargs):
    model = nnx.eval_shape(lambda: models.get(name, **kwargs))  # building for real is slow on CPU
    found = run_case(model, X)
    assert found.groups and not found.notes
    assert list(found.unprunable) == [model.output_layer]


class UnscaledBN(nnx.Module):
    """BatchNorm without a scale, then a sum over the channels."""

    def __init__(self):
        self.conv = nnx.Conv(3, 4, (3, 3), rngs=R)
        self.bn = nnx.BatchNorm(4, use_scale=False, rngs=R)

    def __call__(self, x):
        return self.bn(self.conv(x)).sum(axis=-1)


def test_statistics_are_not_assumed_zero_on_pruned_channels():
    # ADMM masks Params only: a pruned channel leaves BatchNorm as -mean / std + 0,
    # which the sum over channels would still see.
    found = discover_nnx(UnscaledBN(), X)
    assert not found.groups and "reduces over the channels" in found.unprunable["conv"][0]
