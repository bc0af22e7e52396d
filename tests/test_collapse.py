"""Collapse: the smaller model computes what the masked model computes.

Every case discovers the channel groups, prunes them (hard pruning or random
channels per group), collapses, and checks that the collapsed model

* is a new, smaller module of the same class (for registered models: rebuilt
  from ``config`` with the kept widths, which ``config`` then records),
* leaves its input untouched (state and graph, train/eval flags included),
* gives the masked model's outputs within 1e-5 relative error in evaluation
  mode, in training mode (batch statistics), and again in evaluation mode
  after the training-mode call has updated the running statistics of both,
* runs under ``jax.jit``.

Models are built abstractly and filled with random numbers (random running
statistics too), because initializing them for real is slow on CPU.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import admmprune as ap
from admmprune import UserError, models, path_str
from admmprune.collapse import alive_channels, collapse, collapse_linen, consistent_masks, masked, slice_channels
from admmprune.discovery import discover, discover_nnx
from admmprune.projections import coupled_groups, expand_groups, num_kept
from admmprune.sparsity import Coupled, Filter, is_spec

TOL = 1e-5

# --- helpers ---------------------------------------------------------------------------


def randomize(model, seed=0):
    """Fills every variable with random numbers in place, like a trained model's.

    Normalization scales are near 1 and offsets small, as after training; with
    arbitrary ones, many channels are dead after the ReLU on most of a small
    batch, and the next BatchNorm's batch variance then cancels catastrophically
    in float32 (it is ``E[x^2] - E[x]^2``), in the masked and the collapsed
    model differently.
    """
    rng = np.random.default_rng(seed)

    def rand(path, x):
        p = path_str(path)
        if p.endswith("/var"):
            y = rng.uniform(0.5, 2.0, x.shape)
        elif p.endswith("/scale"):
            y = rng.uniform(0.5, 1.5, x.shape)
        elif p.endswith(("/bias", "/mean")):
            y = rng.normal(0.0, 0.2, x.shape)
        else:
            y = rng.normal(0.0, 1.0, x.shape) / np.sqrt(max(1, math.prod(x.shape[:-1])))
        return jnp.asarray(y.astype(x.dtype))

    nnx.update(model, jax.tree_util.tree_map_with_path(rand, nnx.state(model)))
    return model


def abstract_random(build, seed=0):
    return randomize(nnx.eval_shape(build), seed)


def expand(keep, spec, shape):
    """The elementwise mask of one channel member (True outside its slice)."""
    return np.asarray(expand_groups(jnp.asarray(keep), spec, shape))


def group_masks(specs, params, keep):
    """Masks that drop, in every member, the channels ``keep[group]`` marks False."""
    flat_specs, treedef = jax.tree.flatten(specs, is_leaf=is_spec)
    leaves = treedef.flatten_up_to(params)
    out = []
    for spec, x in zip(flat_specs, leaves, strict=True):
        if spec is None:
            out.append(None)
            continue
        members = spec.specs if isinstance(spec, Coupled) else (spec,)
        m = np.ones(x.shape, bool)
        for s in members:
            m = m & expand(keep[s.group], s, x.shape)
        out.append(m)
    return treedef.unflatten(out)


def random_keep(found, rng, ratio=None):
    """Random channels per group: exactly ``num_kept(C, ratio)`` of them, or a random number (maybe none)."""
    keep = {}
    for name, group in found.groups.items():
        n = group.channels
        k = int(num_kept(n, ratio)) if ratio is not None else int(rng.integers(0, n + 1))
        a = np.zeros(n, bool)
        a[rng.choice(n, k, replace=False)] = True
        keep[name] = a
    return keep


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def n_params(model):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def snapshot(model):
    return nnx.graphdef(model), [np.array(x) for x in jax.tree.leaves(nnx.state(model))]


def assert_unchanged(model, snap):
    graphdef, leaves = snap
    assert nnx.graphdef(model) == graphdef
    now = jax.tree.leaves(nnx.state(model))
    assert len(now) == len(leaves)
    for a, b in zip(now, leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def check_equivalent(ref, small, x):
    """Max relative error of ``small`` against ``ref``: eval, train, eval again (both got train's updates)."""
    errors = {}
    for mode in ("eval", "train", "eval_after_train"):
        flag = mode.split("_")[0]
        getattr(ref, flag)()
        getattr(small, flag)()
        errors[mode] = rel_err(ref(x), small(x))
    return errors


def to64(model):
    """Casts every floating variable to float64 in place (call under ``jax.enable_x64``)."""
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model)))
    return model


def forward(model, x, *, jit):
    """``model(x)``, eagerly or under ``jax.jit``; updated state (running statistics) is written back."""
    if not jit:
        return model(x)
    graphdef, state = nnx.split(model)

    def f(state, x):
        m = nnx.merge(graphdef, state)
        return m(x), nnx.state(m)

    y, state = jax.jit(f)(state, x)
    nnx.update(model, state)
    return y


def stats_error(a, b):
    """Max relative error between the BatchNorm statistics of two models of the same shapes."""
    pairs = zip(jax.tree.leaves(nnx.state(a, nnx.BatchStat)), jax.tree.leaves(nnx.state(b, nnx.BatchStat)), strict=True)
    errors = [0.0]
    for u, v in pairs:
        assert u.shape == v.shape
        errors.append(rel_err(u, v))
    return max(errors)


# --- the model zoo ---------------------------------------------------------------------------


def scaled(name, divisor, **kwargs):
    """The model's default widths divided by ``divisor`` (keeps every width equality)."""
    widths = nnx.eval_shape(lambda: models.get(name, **kwargs)).widths
    return {**kwargs, "widths": tuple(max(1, w // divisor) for w in widths)}


CIFAR = {"in_shape": (8, 8, 3)}
ZOO = [
    # name, constructor kwargs, input shape, pruning ("hard": hard_prune at 0.5, else random half per group)
    ("lenet5", {"features": (6, 8, 12)}, (4, 28, 28, 1), "hard"),
    ("mlp", {"hidden": (30, 10)}, (4, 28, 28, 1), "hard"),
    ("vgg11", scaled("vgg11", 16, in_shape=(16, 16, 3)), (16, 16, 16, 3), "random"),
    ("vgg16", scaled("vgg16", 16, in_shape=(16, 16, 3)), (16, 16, 16, 3), "random"),
    ("vgg19", scaled("vgg19", 16, in_shape=(16, 16, 3)), (16, 16, 16, 3), "random"),
    ("resnet20", CIFAR, (4, 8, 8, 3), "hard"),
    ("resnet32", scaled("resnet32", 2, **CIFAR), (4, 8, 8, 3), "random"),
    ("resnet56", scaled("resnet56", 2, **CIFAR), (4, 8, 8, 3), "random"),
    ("resnet18", scaled("resnet18", 8, in_shape=(32, 32, 3), num_classes=10), (16, 32, 32, 3), "random"),
    ("resnet50", scaled("resnet50", 16, in_shape=(32, 32, 3), num_classes=10), (16, 32, 32, 3), "random"),
    (
        "mobilenetv2",
        {"width_mult": 0.25, "in_shape": (16, 16, 3), "small_input": True, "num_classes": 4},
        (8, 16, 16, 3),
        "random",
    ),
    ("unet", {"base": 4, "depth": 3, "in_shape": (32, 32, 3), "num_classes": 3}, (2, 32, 32, 3), "random"),
]
#: Models run under jit: eagerly, every distinct op shape compiles on its own, slow for their many layers.
JIT = {"mobilenetv2", "unet"}


@pytest.mark.parametrize("name,kwargs,x_shape,how", ZOO, ids=[z[0] for z in ZOO])
def test_zoo_collapses_to_the_masked_model(name, kwargs, x_shape, how):
    model = abstract_random(lambda: models.get(name, **kwargs))
    x = jnp.asarray(np.random.default_rng(1).normal(size=x_shape), jnp.float32)
    found = discover_nnx(model, x)
    params = nnx.state(model, nnx.Param)
    if how == "hard":
        _, masks = jax.jit(lambda p: ap.hard_prune(p, found.specs, 0.5))(params)
    else:
        masks = group_masks(found.specs, params, random_keep(found, np.random.default_rng(2), 0.5))
    snap = snapshot(model)

    small = collapse(model, masks, found)
    ref = masked(model, masks, found)

    assert type(small) is type(model) and small is not model
    assert n_params(small) < n_params(model)
    # Every width is the kept count of the group of its conv's output channels.
    alive = alive_channels(found, masks)
    specs = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(found.specs, is_leaf=is_spec)[0]}
    layers = getattr(model, "width_layers", None) or [n for n, _ in model.chain[:-1]]
    for layer, old, new in zip(layers, model.widths, small.widths, strict=True):
        spec = specs[f"{layer}/kernel"]
        out = [s for s in (spec.specs if isinstance(spec, Coupled) else (spec,)) if isinstance(s, Filter)]
        assert len(out) == 1, layer
        assert new == int(alive[out[0].group].sum()) == int(num_kept(old, 0.5)), layer
    # config describes the collapsed model (it was built from it).
    assert small.config == {**model.config, model.widths_arg: small.widths}

    jit = name in JIT
    # float32, evaluation mode; the collapsed model runs under jit.
    ref.eval()
    small.eval()
    errors = {"eval": rel_err(forward(ref, x, jit=jit), forward(small, x, jit=True))}
    # float64, training mode (batch statistics), exact up to rounding; then the running
    # statistics both models updated must agree on the kept channels. (In float32, training
    # mode of these deep nets with random weights amplifies rounding past 1e-5 for the masked
    # model alone, eager against jit, because BatchNorm subtracts batch means that nearly
    # cancel. Standard promotion: Flax's batch statistics promote their dtype with float32.)
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        ref.train()
        small.train()
        x64 = x.astype(jnp.float64)
        errors["train64"] = rel_err(forward(to64(ref), x64, jit=jit), forward(to64(small), x64, jit=jit))
        # (collapsed structurally, the faster way, which must give the rebuilt model's shapes)
        errors["stats64"] = stats_error(collapse(ref, masks, found, rebuild=False), small)
    print(name, errors)
    assert errors["eval"] < TOL
    assert errors["train64"] < 1e-10 and errors["stats64"] < 1e-10, errors
    assert_unchanged(model, snap)


# --- properties of the API -----------------------------------------------------------------


def resnet_case(seed=0):
    model = abstract_random(lambda: models.get("resnet20", widths=scaled("resnet20", 4)["widths"], **CIFAR), seed)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(4, 8, 8, 3)), jnp.float32)
    return model, x, discover_nnx(model, x)


def test_the_structural_copy_equals_the_rebuilt_model():
    model, x, found = resnet_case()
    masks = group_masks(found.specs, nnx.state(model, nnx.Param), random_keep(found, np.random.default_rng(0), 0.5))
    model.eval()
    rebuilt = collapse(model, masks, found)
    copied = collapse(model, masks, found, rebuild=False)
    assert rebuilt.config != model.config and copied.config == model.config  # only the rebuild updates config
    assert jax.tree.map(jnp.shape, nnx.state(rebuilt)) == jax.tree.map(jnp.shape, nnx.state(copied))
    # Both keep the input's mode (eval), so they agree without setting it.
    assert rebuilt.stem.bn.use_running_average and copied.stem.bn.use_running_average
    np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(copied(x)))
    # Masks that agree within every group need no specs to build the reference.
    for a, b in zip(
        jax.tree.leaves(nnx.state(masked(model, masks))),
        jax.tree.leaves(nnx.state(masked(model, masks, found))),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "name,kwargs,empty,gone",
    [
        # A basic block whose conv1 keeps nothing: conv1, bn1 and conv2 go, bn2 stays.
        ("resnet20", scaled("resnet20", 4, **CIFAR), ["stage1/block0/conv1"], ["conv1", "bn1", "conv2"]),
        # A bottleneck whose conv1 keeps nothing: conv3 reads the constant relu(bn2(0)).
        ("resnet50", scaled("resnet50", 16, **CIFAR), ["stage2/block1/conv1"], ["conv1", "bn1", "conv2"]),
        # A bottleneck whose conv2 keeps nothing: conv1's channels feed nothing, so they go too.
        (
            "resnet50",
            scaled("resnet50", 16, **CIFAR),
            ["stage2/block1/conv2"],
            ["conv1", "bn1", "conv2", "bn2", "conv3"],
        ),
    ],
    ids=["basic", "bottleneck-conv1", "bottleneck-conv2"],
)
def test_a_fully_pruned_residual_branch_is_removed(name, kwargs, empty, gone):
    model = abstract_random(lambda: models.get(name, **kwargs), 3)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 8, 3)), jnp.float32)
    found = discover_nnx(model, x)
    params = nnx.state(model, nnx.Param)
    keep = random_keep(found, np.random.default_rng(1), 0.5)
    for group in empty:
        keep[group][:] = False
    masks = group_masks(found.specs, params, keep)
    # The residual stream keeps its channels although the next conv's kernel is all zero.
    stream = alive_channels(found, masks)
    assert all(stream[g].sum() == keep[g].sum() for g in keep if g not in empty)

    small = collapse(model, masks, found)
    block = empty[0].rsplit("/", 1)[0]
    stage, b = block.split("/")
    sblock = getattr(small, stage)[b]
    assert all(getattr(sblock, layer) is None for layer in gone)
    assert 0 in small.widths and small.config["widths"] == small.widths
    # The dead-channel alternative (structural copy) keeps weights the removal saves.
    assert n_params(small) < n_params(collapse(model, masks, found, rebuild=False))
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        ref, small = to64(masked(model, masks, found)), to64(small)
        errors = check_equivalent(ref, small, x.astype(jnp.float64))
    assert max(errors.values()) < 1e-10, errors
    # A saved removed-branch model round-trips (width 0 in its config).
    rebuilt = models.get(name, **small.config)
    assert getattr(getattr(rebuilt, stage)[b], gone[0]) is None


def test_zero_widths_are_refused_outside_residual_branches():
    widths = list(nnx.eval_shape(lambda: models.get("resnet20")).widths)
    widths[0] = 0  # the stem
    with pytest.raises(UserError, match="removed branch"):
        models.get("resnet20", widths=widths)


def test_masks_that_disagree_within_a_group_are_made_consistent():
    model, x, found = resnet_case(2)
    params = nnx.state(model, nnx.Param)
    keep = random_keep(found, np.random.default_rng(2), 0.5)
    masks = group_masks(found.specs, params, keep)
    # One member of the stem group also drops a channel the others keep: the group drops it everywhere.
    c = int(np.flatnonzero(keep["stem/conv"])[0])
    i, spec = coupled_groups(found.specs)["stem/conv"][0]
    _, treedef = jax.tree.flatten(found.specs, is_leaf=is_spec)
    flat_masks = treedef.flatten_up_to(masks)
    fewer = keep["stem/conv"].copy()
    fewer[c] = False
    flat_masks[i] = flat_masks[i] & expand(fewer, spec, flat_masks[i].shape)
    masks = treedef.unflatten(flat_masks)
    assert not alive_channels(found, masks)["stem/conv"][c]
    keep["stem/conv"] = fewer
    expected = treedef.flatten_up_to(group_masks(found.specs, params, keep))
    for got, want in zip(treedef.flatten_up_to(consistent_masks(found, masks)), expected, strict=True):
        assert (got is None and want is None) or np.array_equal(got, want)
    errors = check_equivalent(masked(model, masks, found), collapse(model, masks, found), x)
    assert max(errors.values()) < TOL, errors


def test_errors():
    model, _, found = resnet_case()
    masks = group_masks(found.specs, nnx.state(model, nnx.Param), random_keep(found, np.random.default_rng(0), 0.5))
    with pytest.raises(ValueError, match="state specs"):
        collapse(model, masks, found.specs)  # the BatchNorm statistics would keep their width
    with pytest.raises(ValueError, match="not a registered model"):
        collapse(RandomNet((("conv", 2, 1, True),), rngs=nnx.Rngs(0)), {}, {}, rebuild=True)


# --- random architectures ----------------------------------------------------------------


class Relu(nnx.Module):
    def __call__(self, x):
        return nnx.relu(x)


class Residual(nnx.Module):
    """``x + bn2(conv2(relu(bn1(conv1(x)))))``: its inner channels may be pruned completely."""

    def __init__(self, c, mid, k, *, rngs):
        self.conv1 = nnx.Conv(c, mid, (k, k), padding="SAME", use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(mid, rngs=rngs)
        self.conv2 = nnx.Conv(mid, c, (k, k), padding="SAME", use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c, rngs=rngs)

    def __call__(self, x):
        return x + self.bn2(self.conv2(nnx.relu(self.bn1(self.conv1(x)))))


class Concat(nnx.Module):
    """``concat([x, relu(conv(x))])``: the consumer reads two groups at offsets."""

    def __init__(self, c, out, *, rngs):
        self.conv = nnx.Conv(c, out, (1, 1), rngs=rngs)

    def __call__(self, x):
        return jnp.concatenate([x, nnx.relu(self.conv(x))], axis=-1)


class FlatHead(nnx.Module):
    """Flatten (H, W, C) -> dense -> relu -> dense: a dense layer with ``repeat = H * W``."""

    def __init__(self, hw, c, hidden, out, *, rngs):
        self.fc1 = nnx.Linear(hw * c, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, out, rngs=rngs)

    def __call__(self, x):
        return self.fc2(nnx.relu(self.fc1(x.reshape(x.shape[0], -1))))


class PoolHead(nnx.Module):
    def __init__(self, c, out, *, rngs):
        self.fc = nnx.Linear(c, out, rngs=rngs)

    def __call__(self, x):
        return self.fc(x.mean(axis=(1, 2)))


class RandomNet(nnx.Module):
    """A network described by a plan of ops; it knows nothing about widths or configs.

    Ops: ``("conv", out, k, bias)``, ``("bn",)``, ``("relu",)``, ``("dw", k)``
    (depthwise), ``("res", mid, k)`` (:class:`Residual`), ``("cat", out)``
    (:class:`Concat`); the head is ``("flat", hidden)`` or ``("pool",)``.
    """

    def __init__(self, plan, head=("pool",), *, in_shape=(5, 5, 3), out=3, rngs):
        h, w, c = in_shape
        layers = []
        for op in plan:
            kind = op[0]
            if kind == "conv":
                layers.append(nnx.Conv(c, op[1], (op[2], op[2]), padding="SAME", use_bias=op[3], rngs=rngs))
                c = op[1]
            elif kind == "bn":
                layers.append(nnx.BatchNorm(c, rngs=rngs))
            elif kind == "relu":
                layers.append(Relu())
            elif kind == "dw":
                layers.append(
                    nnx.Conv(c, c, (op[1], op[1]), padding="SAME", feature_group_count=c, use_bias=False, rngs=rngs)
                )
            elif kind == "res":
                layers.append(Residual(c, op[1], op[2], rngs=rngs))
            elif kind == "cat":
                layers.append(Concat(c, op[1], rngs=rngs))
                c += op[1]
        self.body = nnx.List(layers)
        self.head = FlatHead(h * w, c, head[1], out, rngs=rngs) if head[0] == "flat" else PoolHead(c, out, rngs=rngs)

    def __call__(self, x):
        for layer in self.body:
            x = layer(x)
        return self.head(x)


widths = st.integers(1, 5)
kernels = st.sampled_from([1, 3])
ops = st.one_of(
    st.tuples(st.just("conv"), widths, kernels, st.booleans()),
    st.tuples(st.just("bn")),
    st.tuples(st.just("relu")),
    st.tuples(st.just("dw"), kernels),
    st.tuples(st.just("res"), widths, kernels),
    st.tuples(st.just("cat"), widths),
)
heads = st.one_of(st.tuples(st.just("pool")), st.tuples(st.just("flat"), widths))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=st.tuples(st.just("conv"), widths, kernels, st.booleans()),
    depthwise=st.booleans(),
    plan=st.lists(ops, min_size=0, max_size=5),
    head=heads,
    seed=st.integers(0, 2**16),
)
def test_random_networks_collapse_to_the_masked_model(first, depthwise, plan, head, seed):
    """Random groups pruned, some of them completely; float32 in both modes (these nets are shallow)."""
    rng = np.random.default_rng(seed)
    plan = (first, *((("dw", 3),) if depthwise else ()), *plan)  # a depthwise conv on a prunable group
    model = abstract_random(lambda: RandomNet(plan, head, rngs=nnx.Rngs(0)), seed)
    x = jnp.asarray(rng.normal(size=(3, 5, 5, 3)), jnp.float32)
    found = discover_nnx(model, x)  # (width-1 layers form no group: discovery reads size 1 as broadcast)
    masks = group_masks(found.specs, nnx.state(model, nnx.Param), random_keep(found, rng))
    snap = snapshot(model)
    small = collapse(model, masks, found)
    assert type(small) is RandomNet
    assert n_params(small) <= n_params(model)
    errors = check_equivalent(masked(model, masks, found), small, x)
    assert max(errors.values()) < TOL, (errors, found.report())
    assert_unchanged(model, snap)


# --- plain pytrees (Linen) -------------------------------------------------------------


class _LinenNet(nn.Module):
    """Conv-BN, a residual conv pair, a concatenation of two convs, a flatten into Dense."""

    widths: tuple[int, int, int, int] = (8, 6, 5, 7)

    @nn.compact
    def __call__(self, x):
        stem, inner, a, b = self.widths
        x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(stem, (3, 3))(x)))
        x = x + nn.Conv(stem, (3, 3))(nn.relu(nn.Conv(inner, (3, 3))(x)))
        x = jnp.concatenate([nn.relu(nn.Conv(a, (1, 1))(x)), nn.relu(nn.Conv(b, (3, 3))(x))], axis=-1)
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_slice_channels_collapses_linen_variables_to_the_masked_model():
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 2))
    model = _LinenNet()
    variables = model.init(jax.random.key(0), x)
    # Running statistics away from 0/1, so that slicing the wrong entries shows.
    keys = iter(jax.random.split(jax.random.key(2), 8))
    stats = jax.tree.map(
        lambda v: jax.random.uniform(next(keys), v.shape, minval=0.5, maxval=1.5), variables["batch_stats"]
    )
    found = discover(model.apply, {**variables, "batch_stats": stats}, x)
    pruned, masks = ap.hard_prune(variables["params"], found.specs["params"], 0.5)
    masked_vars = {"params": pruned, "batch_stats": stats}
    kept = alive_channels(found.specs["params"], masks)
    small_vars = slice_channels(masked_vars, found.specs, kept)

    # Linen names the residual's outer conv (Conv_1, in the stem's group) before its inner one (Conv_2).
    groups = ("params/Conv_0", "params/Conv_2", "params/Conv_3", "params/Conv_4")
    assert all(g in kept for g in groups), sorted(kept)
    widths = tuple(int(kept[g].sum()) for g in groups)
    assert widths == tuple(math.ceil(w / 2) for w in model.widths)  # half of each group, rounded up
    small = _LinenNet(widths=widths)
    assert jax.tree.map(jnp.shape, small_vars) == jax.tree.map(jnp.shape, small.init(jax.random.key(0), x))
    np.testing.assert_allclose(small.apply(small_vars, x), model.apply(masked_vars, x), rtol=1e-5, atol=1e-5)
    # A group left out of `kept` keeps every channel; None specs leave leaves whole.
    assert slice_channels(masked_vars, None, kept) is masked_vars
    whole = slice_channels(masked_vars, found.specs, {})
    assert jax.tree.map(jnp.shape, whole) == jax.tree.map(jnp.shape, masked_vars)


# --- what the structure cannot show --------------------------------------------------------


class HeadAttention(nnx.Module):
    """Self-attention written the way users write it: per-head kernels (as
    ``nnx.MultiHeadAttention``'s, or one head with plain matrices), and a
    scale computed from the head dimension unless one is given."""

    def __init__(self, dim, heads, head_dim, scale=None, *, rngs):
        self.scale, self.multi = scale, heads > 1
        shape = (heads, head_dim) if self.multi else (head_dim,)
        init = nnx.initializers.lecun_normal()
        for name in ("q", "k", "v"):
            setattr(self, name, nnx.Param(init(rngs.params(), (dim, *shape))))
        self.o = nnx.Param(init(rngs.params(), (*shape, dim)))

    def __call__(self, x):
        h = "h" if self.multi else ""
        q, k, v = (jnp.einsum(f"btc,c{h}d->bt{h}d", x, w[...]) for w in (self.q, self.k, self.v))
        scale = self.scale if self.scale is not None else 1 / math.sqrt(q.shape[-1])
        weights = jax.nn.softmax(jnp.einsum(f"bt{h}d,bs{h}d->b{h}ts", q * scale, k), axis=-1)
        return x + jnp.einsum(f"b{h}ts,bs{h}d,{h}dc->btc", weights, v, self.o[...])


@pytest.mark.parametrize(
    "heads,scale,exact",
    [(1, None, False), (1, 0.25, True), (2, None, True)],
    ids=["one-head-scale-from-shape", "one-head-fixed-scale", "heads-scale-from-shape"],
)
def test_check_refuses_a_collapse_that_changes_the_function(heads, scale, exact):
    model = abstract_random(lambda: HeadAttention(8, heads, 4, scale, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (2, 5, 8))
    found = discover_nnx(model, x)
    # One head: its dimension is a group. Several: whole heads are, never their dimension too.
    assert {n: g.channels for n, g in found.groups.items()} == ({"q": 2} if heads > 1 else {"q": 4, "v": 4})
    masks = group_masks(found.specs, nnx.state(model, nnx.Param), random_keep(found, np.random.default_rng(1), 0.5))
    small = collapse(model, masks, found)  # without check: the structure is consistent
    error = rel_err(masked(model, masks, found)(x), small(x))
    if exact:
        assert error < TOL
        assert rel_err(small(x), collapse(model, masks, found, check=(x,))(x)) == 0
    else:
        # 1/sqrt(head_dim) follows the collapsed shape: another function, refused with check.
        assert error > 1e-3
        with pytest.raises(ValueError, match="another function"):
            collapse(model, masks, found, check=(x,))


class MHABlock(nnx.Module):
    """An embedding, ``nnx.MultiHeadAttention`` (grouped-query with kv_heads < 4) and a head."""

    def __init__(self, kv_heads, *, rngs):
        self.embed = nnx.Linear(3, 8, rngs=rngs)
        self.mha = nnx.MultiHeadAttention(
            num_heads=4, num_kv_heads=kv_heads, in_features=8, qkv_features=16, decode=False, rngs=rngs
        )
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x.reshape(x.shape[0], -1, x.shape[-1]))
        return self.head(x + self.mha(x))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_multi_head_attention_loses_whole_heads_and_collapses_exactly(kv_heads):
    model = randomize(MHABlock(kv_heads, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    found = discover_nnx(model, x)
    masks = group_masks(found.specs, nnx.state(model, nnx.Param), random_keep(found, np.random.default_rng(1), 0.5))
    small = collapse(model, masks, found, check=(x,))
    assert rel_err(masked(model, masks, found)(x), small(x)) < TOL
    assert small.mha.in_features == small.embed.out_features == 4  # the residual stream, without a norm
    if kv_heads == 4:
        assert (small.mha.num_heads, small.mha.num_kv_heads, small.mha.qkv_features) == (2, 2, 8)
        assert small.mha.query.kernel.shape == (4, 2, 4) and small.mha.out.kernel.shape == (2, 4, 4)
    else:
        # Grouped-query attention splits the query heads by key/value head: not pruned, and said why.
        assert "mha/query" not in found.groups and "splits the channels" in " ".join(found.unprunable["mha/query"])
        assert (small.mha.num_heads, small.mha.num_kv_heads) == (4, 2)
    assert jax.jit(lambda m, x: m(x))(small, x).shape == (2, 16, 2)


class TinyViT(nnx.Module):
    """Patch embedding, a class token tiled over the batch (``jnp.tile``), attention, an MLP and a head."""

    def __init__(self, *, rngs):
        self.patch = nnx.Conv(3, 8, (2, 2), strides=(2, 2), rngs=rngs)
        self.cls = nnx.Param(jax.random.normal(rngs.params(), (1, 1, 8)))
        self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, 17, 8)))
        self.mha = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False, rngs=rngs)
        self.fc1 = nnx.Linear(8, 12, rngs=rngs)
        self.fc2 = nnx.Linear(12, 8, rngs=rngs)
        self.head = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        x = self.patch(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = jnp.concatenate([jnp.tile(self.cls[...], (x.shape[0], 1, 1)), x], axis=1) + self.pos[...]
        x = x + self.mha(x)
        x = x + self.fc2(jax.nn.gelu(self.fc1(x)))
        return self.head(x[:, 0])


def test_a_class_token_tiled_over_the_batch_prunes_and_collapses():
    model = randomize(TinyViT(rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    found = discover_nnx(model, x)
    # The residual stream (patch, cls, pos, every writer and reader), the heads and the MLP neurons.
    assert {n: g.channels for n, g in found.groups.items()} == {"patch": 8, "mha/query": 2, "fc1": 12}
    assert ("cls", Filter(group="patch")) in found.groups["patch"].members
    masks = group_masks(found.specs, nnx.state(model, nnx.Param), random_keep(found, np.random.default_rng(2), 0.5))
    small = collapse(model, masks, found, check=(x,))
    assert rel_err(masked(model, masks, found)(x), small(x)) < TOL
    assert small.cls.shape == (1, 1, 4) and small.mha.num_heads == 1 and small.fc1.out_features == 6


class EinsumAttention(nnx.Module):
    """Attention written with ``nnx.Einsum`` as Gemma writes it (heads as a kernel axis), and an Einsum MLP."""

    def __init__(self, *, rngs):
        self.embed = nnx.Linear(3, 8, rngs=rngs)
        self.q, self.k, self.v = (nnx.Einsum("BTD,DNH->BTNH", (8, 4, 2), (4, 2), rngs=rngs) for _ in range(3))
        self.attn_vec = nnx.Einsum("BTNH,NHD->BTD", (4, 2, 8), (8,), rngs=rngs)
        self.up = nnx.Einsum("BTD,DF->BTF", (8, 12), (12,), rngs=rngs)
        self.down = nnx.Einsum("BTF,FD->BTD", (12, 8), (8,), rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x.reshape(x.shape[0], -1, x.shape[-1]))
        q, k, v = self.q(x), self.k(x), self.v(x)
        weights = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q, k) / math.sqrt(2.0))
        x = x + self.attn_vec(jnp.einsum("BNTS,BSNH->BTNH", weights, v))
        return self.head(x + self.down(jax.nn.gelu(self.up(x))))


def test_einsum_attention_loses_whole_heads_and_mlp_neurons_exactly():
    model = randomize(EinsumAttention(rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
    found = discover_nnx(model, x)
    assert {"q", "up"} <= set(found.groups) and found.groups["q"].channels == 4
    masks = group_masks(found.specs, nnx.state(model, nnx.Param), random_keep(found, np.random.default_rng(3), 0.5))
    small = collapse(model, masks, found, check=(x,))
    assert rel_err(masked(model, masks, found)(x), small(x)) < TOL
    assert small.q.kernel.shape == small.q.kernel_shape == (4, 2, 2) and small.q.bias_shape == (2, 2)
    assert small.attn_vec.kernel_shape == (2, 2, 4) and small.up.kernel_shape == (4, 6)
    assert jax.jit(lambda m, x: m(x))(small, x).shape == (2, 16, 2)


def test_collapse_linen_rebuilds_from_the_kept_widths_and_checks_the_function():
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 2))
    model = _LinenNet()
    variables = model.init(jax.random.key(0), x)
    stats = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])  # away from 0/1
    variables = {**variables, "batch_stats": stats}
    found = discover(model.apply, variables, x)
    params, masks = ap.hard_prune(variables["params"], found.specs["params"], 0.5)
    order = ("params/Conv_0", "params/Conv_2", "params/Conv_3", "params/Conv_4")
    small, small_vars = collapse_linen(
        model, {**variables, "params": params}, masks, found, lambda w: _LinenNet(widths=tuple(w[g] for g in order)), x
    )
    assert small.widths == (4, 3, 3, 4)
    masked_out = model.apply({**variables, "params": params}, x)  # hard_prune's weights are zero where masked
    assert rel_err(masked_out, small.apply(small_vars, x)) < TOL
    # A rebuild that gets the widths wrong is refused, naming the variables that do not fit.
    with pytest.raises(ValueError, match=r"rebuild\(widths\) built a _LinenNet whose variables do not fit"):
        collapse_linen(model, variables, masks, found, lambda w: _LinenNet(widths=(4, 4, 3, 4)), x)

    class Swapped(_LinenNet):  # the right shapes, another function
        def __call__(self, x):
            return super().__call__(-x)

    with pytest.raises(ValueError, match="computes another function"):
        collapse_linen(model, variables, masks, found, lambda w: Swapped(widths=tuple(w[g] for g in order)), x)


# --- random transformers --------------------------------------------------------------


def _norm(kind, dim, rngs):
    return {"layer": nnx.LayerNorm, "rms": nnx.RMSNorm}[kind](dim, rngs=rngs) if kind != "none" else None


class RandomBlock(nnx.Module):
    """A pre-norm block: attention (``nnx.MultiHeadAttention`` or Einsum kernels with a heads axis) and an MLP."""

    def __init__(self, dim, heads, head_dim, hidden, mlp, attention, *, norm, rngs):
        self.norm1, self.norm2 = _norm(norm, dim, rngs), _norm(norm, dim, rngs)
        self.attention, self.mlp = attention, mlp
        if attention == "mha":
            self.attn = nnx.MultiHeadAttention(
                num_heads=heads, in_features=dim, qkv_features=heads * head_dim, decode=False, rngs=rngs
            )
        else:
            self.q, self.k, self.v = (nnx.Einsum("BTD,DNH->BTNH", (dim, heads, head_dim), rngs=rngs) for _ in range(3))
            self.o = nnx.Einsum("BTNH,NHD->BTD", (heads, head_dim, dim), (dim,), rngs=rngs)
            self.scale = 1 / math.sqrt(head_dim)  # a constant, not read off a pruned shape
        self.up = nnx.Linear(dim, hidden, rngs=rngs)
        self.gate = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs) if mlp == "swiglu" else None
        self.down = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        h = x if self.norm1 is None else self.norm1(x)
        if self.attention == "mha":
            h = self.attn(h)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
            w = jax.nn.softmax(jnp.einsum("BTNH,BSNH->BNTS", q * self.scale, k), axis=-1)
            h = self.o(jnp.einsum("BNTS,BSNH->BTNH", w, v))
        x = x + h
        h = x if self.norm2 is None else self.norm2(x)
        h = jax.nn.silu(self.gate(h)) * self.up(h) if self.mlp == "swiglu" else jax.nn.gelu(self.up(h))
        return x + self.down(h)


class RandomTransformer(nnx.Module):
    def __init__(self, dim, blocks, norm, *, rngs):
        self.embed = nnx.Linear(3, dim, rngs=rngs)
        self.blocks = nnx.List([RandomBlock(dim, *b, norm=norm, rngs=rngs) for b in blocks])
        self.norm = _norm(norm, dim, rngs)
        self.head = nnx.Linear(dim, 2, rngs=rngs)

    def __call__(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x if self.norm is None else self.norm(x))


block_plans = st.tuples(
    st.sampled_from([1, 2, 4]),  # heads
    st.integers(1, 3),  # head_dim
    st.integers(2, 6),  # MLP hidden
    st.sampled_from(["gelu", "swiglu"]),
    st.sampled_from(["mha", "einsum"]),
)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dim=st.integers(4, 8),
    blocks=st.lists(block_plans, min_size=1, max_size=2),
    norm=st.sampled_from(["layer", "rms", "none"]),
    seed=st.integers(0, 2**16),
)
def test_random_transformers_collapse_to_the_masked_model(dim, blocks, norm, seed):
    """Whole heads and MLP neurons, and the residual stream only where no norm averages over it."""
    rng = np.random.default_rng(seed)
    model = abstract_random(lambda: RandomTransformer(dim, blocks, norm, rngs=nnx.Rngs(0)), seed)
    x = jnp.asarray(rng.normal(size=(2, 5, 3)), jnp.float32)
    found = discover_nnx(model, x)
    for i, (heads, *_, attention) in enumerate(blocks):
        attn = f"blocks/{i}/attn/query" if attention == "mha" else f"blocks/{i}/q"
        assert heads == 1 or found.groups[attn].channels == heads, found.report()  # heads, not their dims
        up = [
            g
            for n, g in found.groups.items()
            for path, spec in g.members
            if path == f"blocks/{i}/up/kernel"
            and Filter(group=n) in (spec.specs if isinstance(spec, Coupled) else (spec,))
        ]
        assert len(up) == 1 and up[0].channels == blocks[i][2], found.report()  # gate and up together
    assert ("embed" in found.groups) == (norm == "none"), found.report()
    if norm != "none":
        assert "reduce_sum" in " ".join(found.unprunable["embed"])
    masks = group_masks(found.specs, nnx.state(model, nnx.Param), random_keep(found, rng))
    small = collapse(model, masks, found, check=(x,))
    assert n_params(small) <= n_params(model)
    assert rel_err(masked(model, masks, found)(x), small(x)) < TOL
