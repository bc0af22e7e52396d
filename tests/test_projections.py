"""Property tests: every projection is feasible, idempotent and optimal."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from admmprune import projections as P
from admmprune.sparsity import Block, Channel, Column, Coupled, Filter, NofM, Unstructured

GROUP_SPECS = [Unstructured(), Filter(), Channel(), Column(), Block((2, 3)), Filter(axis=-2, repeat=2)]

project = jax.jit(P.project, static_argnums=1)


@st.composite
def tensors(draw, max_size=12):
    """Small 3-d tensors, often with ties (integer values) and zeros."""
    shape = (draw(st.integers(1, 2)), draw(st.integers(2, 4)), draw(st.integers(1, 4)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    if draw(st.booleans()):
        x = rng.integers(-2, 3, size=shape).astype(np.float32)
    else:
        x = rng.normal(size=shape).astype(np.float32)
    return x


def nonzero_groups(x, spec):
    return int(np.sum(np.asarray(P.group_scores(jnp.asarray(x), spec)) > 0))


def brute_force_distance(x, spec, keep_ratio):
    """min ||x - p||^2 over all p that keep exactly k groups of x."""
    scores = np.asarray(P.group_scores(jnp.asarray(x), spec), np.float64)
    k = int(P.num_kept(scores.size, keep_ratio))
    best = max(sum(scores[list(c)]) for c in itertools.combinations(range(scores.size), k))
    return scores.sum() - best


def applicable(spec, shape):
    if isinstance(spec, Filter) and spec.repeat > 1:
        return shape[spec.axis] % spec.repeat == 0
    return True


@settings(max_examples=60, deadline=None)
@given(x=tensors(), spec=st.sampled_from(GROUP_SPECS), keep=st.floats(0.05, 1.0))
def test_group_projection_feasible_idempotent_optimal(x, spec, keep):
    if not applicable(spec, x.shape):
        return
    p = project(x, spec, keep)
    assert p.shape == x.shape and p.dtype == x.dtype
    k = int(P.num_kept(P.num_groups(x.shape, spec), keep))
    assert nonzero_groups(p, spec) <= k
    np.testing.assert_array_equal(project(p, spec, keep), p)
    # Only weights of x survive, unchanged.
    assert np.all((np.asarray(p) == 0) | (np.asarray(p) == x))
    if P.num_groups(x.shape, spec) <= 12:
        dist = float(np.sum((np.asarray(x, np.float64) - np.asarray(p, np.float64)) ** 2))
        assert dist == pytest.approx(brute_force_distance(x, spec, keep), rel=1e-5, abs=1e-5)


@settings(max_examples=40, deadline=None)
@given(x=tensors(), n=st.integers(1, 3), m=st.integers(1, 4), axis=st.sampled_from([-1, -2, 0]))
def test_nofm_projection_feasible_idempotent_optimal(x, n, m, axis):
    n = min(n, m)
    spec = NofM(n, m, axis=axis)
    p = np.asarray(project(x, spec, 1.0))
    assert p.shape == x.shape
    moved_p = np.moveaxis(p, axis, -1)
    moved_x = np.moveaxis(x, axis, -1)
    length = moved_x.shape[-1]
    dist_opt = 0.0
    for start in range(0, length, m):
        bp = moved_p[..., start : start + m].reshape(-1, min(m, length - start))
        bx = moved_x[..., start : start + m].reshape(-1, min(m, length - start))
        assert np.all(np.count_nonzero(bp, axis=-1) <= n)
        for row in np.abs(bx.astype(np.float64)) ** 2:
            keep = min(n, row.size)
            best = max(sum(row[list(c)]) for c in itertools.combinations(range(row.size), keep))
            dist_opt += row.sum() - best
    dist = float(np.sum((x.astype(np.float64) - p) ** 2))
    assert dist == pytest.approx(dist_opt, rel=1e-5, abs=1e-5)
    np.testing.assert_array_equal(project(p, spec, 1.0), p)


def test_ties_go_to_the_lower_index():
    x = jnp.ones((3, 6))
    p = project(x, Filter(), 0.5)
    np.testing.assert_array_equal(np.asarray(p)[0], [1, 1, 1, 0, 0, 0])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_keeps_dtype(dtype):
    x = jax.random.normal(jax.random.key(0), (5, 5, 3, 8)).astype(dtype)
    for spec in GROUP_SPECS[:5] + [NofM(2, 4)]:
        assert project(x, spec, 0.3).dtype == dtype


def test_traced_keep_ratio_does_not_recompile():
    traces = []

    @jax.jit
    def f(x, r):
        traces.append(1)
        return P.project(x, Filter(), r)

    x = jax.random.normal(jax.random.key(1), (4, 10))
    counts = [int(np.sum(np.any(np.asarray(f(x, jnp.float32(r))) != 0, axis=0))) for r in (0.9, 0.5, 0.1)]
    assert counts == [9, 5, 1]
    assert len(traces) == 1


def test_precomputed_scores_choose_the_groups():
    x = jnp.ones((2, 4))
    p = P.project(x, Filter(), 0.5, scores=jnp.array([0.0, 3.0, 1.0, 2.0]))
    np.testing.assert_array_equal(np.asarray(p)[0], [0, 1, 0, 1])
    with pytest.raises(ValueError, match="scores must have shape"):
        P.project(x, Filter(), 0.5, scores=jnp.ones(3))


def test_support_is_respected():
    x = jnp.arange(1.0, 7.0)[None, :].repeat(2, 0)  # the largest filters are last
    support = jnp.ones((2, 6), bool).at[:, 5].set(False)
    p = np.asarray(P.project(x, Filter(), 0.5, support=support))
    assert np.count_nonzero(p[0]) == 3 and p[0, 5] == 0
    np.testing.assert_array_equal(p[0], [0, 0, 3, 4, 5, 0])


def test_num_kept_bounds():
    assert int(P.num_kept(10, 0.0)) == 1
    assert int(P.num_kept(10, 1.0)) == 10
    assert int(P.num_kept(500, 0.1)) == 50
    assert int(P.num_kept(20, 0.25)) == 5


def test_channel_repeat_matches_flattened_feature_map():
    """Channel(repeat=H*W) on a dense kernel fed by a flattened (H, W, C) map."""
    h, w, c, out = 2, 3, 4, 5
    kernel = jax.random.normal(jax.random.key(2), (h * w * c, out))
    keep = jnp.array([True, False, True, False])
    mask = np.asarray(P.expand_groups(keep, Channel(repeat=h * w), kernel.shape))
    rows = np.arange(h * w * c).reshape(h, w, c)
    for ch in range(c):
        assert np.all(mask[rows[..., ch].ravel()] == bool(keep[ch]))


def brute_force_joint(leaves, members, keep_ratio):
    channels = P.num_groups(leaves[0].shape, members[0])
    scores = sum(np.asarray(P.group_scores(x, s), np.float64) for x, s in zip(leaves, members, strict=True))
    k = int(P.num_kept(channels, keep_ratio))
    best = max(sum(scores[list(c)]) for c in itertools.combinations(range(channels), k))
    return scores.sum() - best


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), channels=st.integers(2, 7), keep=st.floats(0.1, 1.0))
def test_coupled_group_projection_is_exact(seed, channels, keep):
    rng = np.random.default_rng(seed)
    tree = {
        "a": {
            "kernel": rng.normal(size=(3, channels)).astype(np.float32),
            "bias": rng.normal(size=channels).astype(np.float32),
        },
        "b": {"kernel": rng.normal(size=(channels * 2, 3)).astype(np.float32), "bias": np.zeros(3, np.float32)},
    }
    specs = {
        "a": {"kernel": Filter(group="g"), "bias": Filter(group="g")},
        "b": {"kernel": Channel(group="g", repeat=2), "bias": None},
    }
    out, masks = jax.jit(lambda t, r: P.project_tree(t, specs, r))(tree, jnp.float32(keep))
    assert masks["b"]["bias"] is None
    np.testing.assert_array_equal(out["b"]["bias"], tree["b"]["bias"])
    kept_a = np.asarray(masks["a"]["bias"])
    # The same channels are removed from every member.
    np.testing.assert_array_equal(np.asarray(masks["a"]["kernel"]).all(0), kept_a)
    np.testing.assert_array_equal(np.asarray(masks["b"]["kernel"]).reshape(2, channels, 3).all((0, 2)), kept_a)
    assert kept_a.sum() == int(P.num_kept(channels, keep))
    leaves = [tree["a"]["kernel"], tree["a"]["bias"], tree["b"]["kernel"]]
    members = [Filter(), Filter(), Channel(repeat=2)]
    dist = sum(
        float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
        for x, y in zip(jax.tree.leaves(tree), jax.tree.leaves(out), strict=True)
    )
    assert dist == pytest.approx(brute_force_joint(leaves, members, keep), rel=1e-5, abs=1e-5)


JOINT = [Unstructured(group="g"), Column(group="g"), Block((2, 2), group="g")]
# The first leaf's first two rows are whole groups of every kind, removed earlier: they stay removed.
JOINT_SUPPORT = [np.arange(12).reshape(3, 4) >= 8] + [np.ones((3, 4), bool)] * len(JOINT)
project_joint = jax.jit(lambda t, r: P.project_tree(t, [*JOINT, Unstructured()], r, support=JOINT_SUPPORT))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), keep=st.floats(0.05, 1.0))
def test_specs_sharing_a_group_name_are_projected_as_one_set(seed, keep):
    """Weights (columns, blocks) of several leaves ranked together: the top k of all of them, exactly;
    the last leaf, with a spec of its own, is projected alone."""
    rng = np.random.default_rng(seed)
    joint, support = JOINT, JOINT_SUPPORT
    tree = [(rng.normal(size=(3, 4)) * (i + 1)).astype(np.float32) for i in range(len(joint) + 1)]
    out, _ = project_joint(tree, jnp.float32(keep))
    out = [np.asarray(x, np.float64) for x in out]
    assert not out[0][:2].any()
    np.testing.assert_array_equal(out[-1], np.asarray(P.project(tree[-1], Unstructured(), keep)))
    n = len(joint)
    scores = np.concatenate(
        [np.asarray(P.group_scores(jnp.asarray(x), sp), np.float64) for x, sp in zip(tree[:n], joint, strict=True)]
    )
    alive = np.concatenate(
        [np.asarray(P.groups_alive(jnp.asarray(m), sp)) for m, sp in zip(support[:n], joint, strict=True)]
    )
    k = int(P.num_kept(scores.size, keep))
    assert sum(nonzero_groups(p, sp) for p, sp in zip(out[:n], joint, strict=True)) <= k
    best = np.sort(scores[alive])[::-1][:k].sum()  # the top k of all the live groups together
    dist = sum(float(np.sum((x.astype(np.float64) - p) ** 2)) for x, p in zip(tree[:n], out[:n], strict=True))
    assert dist == pytest.approx(scores.sum() - best, rel=1e-5, abs=1e-5)


def test_coupled_leaf_keeps_what_every_group_keeps():
    tree = [jnp.ones((4, 6)), jnp.ones((6, 4)), jnp.ones((4, 2))]
    specs = [Filter(group="h0"), Coupled((Channel(group="h0"), Filter(group="h1"))), Channel(group="h1")]
    out, masks = P.project_tree(tree, specs, 0.5)
    np.testing.assert_array_equal(np.asarray(masks[1]).any(1), np.asarray(masks[0]).all(0))
    np.testing.assert_array_equal(np.asarray(masks[1]).any(0), np.asarray(masks[2]).all(1))
    assert int(np.count_nonzero(out[1])) == 3 * 2


def test_group_members_must_agree_on_channels():
    with pytest.raises(ValueError, match="disagree"):
        P.project_tree([jnp.ones((3, 4)), jnp.ones((5, 2))], [Filter(group="g"), Channel(group="g")], 0.5)


@pytest.mark.parametrize("shape,spec", [((4, 6), Block((3, 4))), ((2, 5, 7), Block((2, 3)))])
def test_block_groups_round_trip(shape, spec):
    x = jnp.arange(math.prod(shape), dtype=jnp.float32).reshape(shape)
    g = P.to_groups(x, spec)
    assert g.shape[0] == P.num_groups(shape, spec)
    np.testing.assert_array_equal(P.from_groups(g, spec, shape), x)
    # Every weight lies in exactly one group.
    assert float(jnp.sum(g)) == float(jnp.sum(x))


# --- channel slices (offset/size): one group per branch of a concatenation ---


@st.composite
def sliced_specs(draw, x_shape):
    """A channel spec on a random axis whose channels are a random slice."""
    axis = draw(st.sampled_from([-1, -2]))
    n = x_shape[axis]
    repeat = draw(st.sampled_from([r for r in (1, 2) if n % r == 0]))
    channels = n // repeat
    offset = draw(st.integers(0, channels - 1))
    size = draw(st.one_of(st.none(), st.integers(1, channels - offset)))
    cls = draw(st.sampled_from([Filter, Channel]))
    return cls(axis=axis, repeat=repeat, offset=offset, size=size)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), keep=st.floats(0.05, 1.0))
def test_sliced_channel_projection_is_exact_and_leaves_the_rest_alone(data, keep):
    x = data.draw(tensors())
    spec = data.draw(sliced_specs(x.shape))
    axis, repeat = spec.axis % x.ndim, spec.repeat
    channels = x.shape[axis] // repeat
    stop = channels if spec.size is None else spec.offset + spec.size
    assert P.num_groups(x.shape, spec) == stop - spec.offset
    p = np.asarray(project(x, spec, keep))
    # Channel c of the (repeat, C) view of the axis, as an index array over x.
    view = np.moveaxis(np.arange(x.size).reshape(x.shape), axis, 0).reshape(repeat, channels, -1)
    inside = np.zeros(x.size, bool)
    inside[view[:, spec.offset : stop].ravel()] = True
    inside = inside.reshape(x.shape)
    np.testing.assert_array_equal(p[~inside], x[~inside])
    assert np.all((p == 0) | (p == x))
    k = int(P.num_kept(stop - spec.offset, keep))
    assert nonzero_groups(p, spec) <= k
    np.testing.assert_array_equal(project(p, spec, keep), p)
    dist = float(np.sum((np.asarray(x, np.float64) - p) ** 2))
    assert dist == pytest.approx(brute_force_distance(x, spec, keep), rel=1e-5, abs=1e-5)
    # Masks are True outside the slice, and to_groups/from_groups round-trip inside it.
    keep_groups = jnp.arange(P.num_groups(x.shape, spec)) % 2 == 0
    assert np.all(np.asarray(P.expand_groups(keep_groups, spec, x.shape))[~inside])
    back = np.asarray(P.from_groups(P.to_groups(jnp.asarray(x), spec), spec, x.shape))
    np.testing.assert_array_equal(back, np.where(inside, x, 0))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), ca=st.integers(1, 4), cb=st.integers(1, 4), keep=st.floats(0.1, 1.0))
def test_concatenation_consumer_slices_project_exactly(seed, ca, cb, keep):
    """Two producers whose outputs are concatenated (``repeat=2``) into one consumer."""
    rng = np.random.default_rng(seed)
    tree = {
        "a": rng.normal(size=(3, ca)).astype(np.float32),
        "b": rng.normal(size=(3, cb)).astype(np.float32),
        "c": rng.normal(size=(2 * (ca + cb), 2)).astype(np.float32),
    }
    specs = {
        "a": Filter(group="a"),
        "b": Filter(group="b"),
        "c": Coupled((Channel(group="a", repeat=2, size=ca), Channel(group="b", repeat=2, offset=ca, size=cb))),
    }
    out, masks = jax.jit(lambda t, r: P.project_tree(t, specs, r))(tree, jnp.float32(keep))
    rows = np.asarray(masks["c"]).reshape(2, ca + cb, 2).all((0, 2))
    np.testing.assert_array_equal(rows[:ca], np.asarray(masks["a"]).all(0))
    np.testing.assert_array_equal(rows[ca:], np.asarray(masks["b"]).all(0))
    assert rows[:ca].sum() == int(P.num_kept(ca, keep)) and rows[ca:].sum() == int(P.num_kept(cb, keep))
    # The two groups are separate constraints on disjoint weights: the joint
    # projection is the sum of the two exact group projections.
    expected = brute_force_joint([tree["a"], tree["c"]], [Filter(), specs["c"].specs[0]], keep)
    expected += brute_force_joint([tree["b"], tree["c"]], [Filter(), specs["c"].specs[1]], keep)
    dist = sum(float(np.sum((np.asarray(tree[n], np.float64) - np.asarray(out[n], np.float64)) ** 2)) for n in tree)
    assert dist == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_channel_slice_must_fit():
    from admmprune.sparsity import validate

    validate(Channel(offset=2, size=2), (3, 4, 5))
    for spec in (Channel(offset=4), Channel(offset=1, size=4), Channel(size=0), Channel(offset=-1)):
        with pytest.raises(ValueError, match="slice"):
            validate(spec, (3, 4, 5))


@pytest.mark.parametrize(
    "channels,keep,round_to,expected",
    [
        (64, 0.5, 8, 32),
        (64, 0.3, 8, 16),
        (64, 0.05, 8, 8),
        (20, 0.1, 8, 8),
        (6, 0.5, 8, 6),
        (300, 0.5, 128, 128),
    ],
)
def test_round_to_keeps_hardware_friendly_widths(channels, keep, round_to, expected):
    assert int(P.num_kept(channels, keep, round_to)) == expected
    tree = [jax.random.normal(jax.random.key(channels), (3, channels)), jnp.ones((channels, 2))]
    specs = [Filter(group="g"), Channel(group="g")]
    _, masks = jax.jit(lambda t: P.project_tree(t, specs, keep, round_to=round_to))(tree)
    assert int(np.asarray(masks[0]).any(0).sum()) == expected
