"""One-shot, layer-wise pruning: every solver lands in its set, and ADMM reconstructs best.

The problems are least squares with correlated inputs (``X = Z A`` for a
random mixing ``A``) and a few inputs of large scale, as a transformer's
activations have, so that magnitude, Wanda and SparseGPT differ.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from admmprune.core import layerwise as lw
from admmprune.core.projections import num_kept, project
from admmprune.core.sparsity import Channel, NofM, Unstructured


def problem(seed, d_in=64, d_out=32, n=None, outliers=4):
    """``(x, w0, h)``: inputs with correlated columns and a few large ones, a dense kernel, ``X^T X``."""
    rng = np.random.default_rng(seed)
    n = n or 4 * d_in
    x = rng.normal(size=(n, d_in)) @ (rng.normal(size=(d_in, d_in)) / np.sqrt(d_in) + np.eye(d_in))
    x[:, rng.choice(d_in, outliers, replace=False)] *= 10.0
    w0 = rng.normal(size=(d_in, d_out)) / np.sqrt(d_in)
    return x.astype(np.float32), w0.astype(np.float32), (x.T @ x).astype(np.float32)


def error(w, w0, h):
    return float(lw.reconstruction_error(w, w0, h))


def assert_in_set(w, spec, keep, *, exact_count=True):
    """``w`` has at most (with ``exact_count``: exactly) ``k`` non-zero groups; N:M blocks hold at most ``n``."""
    nz = np.asarray(w) != 0
    if isinstance(spec, Unstructured):
        k = int(num_kept(nz.size, keep))
        assert nz.sum() <= k
        assert not exact_count or nz.sum() == k
    elif isinstance(spec, NofM):
        a = np.moveaxis(nz, spec.axis, -1)
        pad = -a.shape[-1] % spec.m
        a = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]).reshape(a.shape[:-1] + (-1, spec.m))
        assert a.sum(-1).max() <= spec.n
    elif isinstance(spec, Channel):
        rows = np.moveaxis(nz, spec.axis, 0).reshape(nz.shape[spec.axis], -1)
        alive = rows.any(axis=1)
        k = int(num_kept(rows.shape[0], keep))
        assert alive.sum() <= k
        assert not exact_count or alive.sum() == k
    else:
        raise AssertionError(spec)


# --- the objective: ADMM below every baseline ---------------------------------------------

SETS = [(Unstructured(), 0.5), (Unstructured(), 0.3), (Unstructured(), 0.1), (NofM(2, 4), 1.0)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("spec", "keep"), SETS, ids=["50%", "70%", "90%", "2:4"])
def test_admm_reconstructs_better_than_the_baselines(seed, spec, keep):
    _, w0, h = problem(seed)
    errors = {
        "admm": error(lw.admm(h, w0, spec, keep), w0, h),
        "sparsegpt": error(lw.sparsegpt(h, w0, spec, keep), w0, h),
        "wanda": error(lw.wanda(w0, h, spec, keep), w0, h),
        "magnitude": error(lw.magnitude(w0, spec, keep), w0, h),
    }
    assert errors["admm"] <= min(errors.values()), errors
    # The baselines' known order on these problems: the weight update and the activations both help.
    assert errors["sparsegpt"] <= errors["wanda"] <= errors["magnitude"], errors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_admm_removes_input_channels_better_than_magnitude_and_wanda(seed):
    _, w0, h = problem(seed)
    spec = Channel()
    admm = error(lw.admm(h, w0, spec, 0.5), w0, h)
    assert admm <= error(lw.wanda(w0, h, spec, 0.5), w0, h) <= error(lw.magnitude(w0, spec, 0.5), w0, h)


# --- feasibility ---------------------------------------------------------------------------

SHAPES = [(24, 12), (3, 3, 4, 8)]
SPECS = [Unstructured(), NofM(2, 4), Channel()]


@settings(max_examples=12, deadline=None)
@given(
    shape=st.sampled_from(SHAPES),
    spec=st.sampled_from(SPECS),
    keep=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_every_method_lies_in_the_set(shape, spec, keep, seed):
    rng = np.random.default_rng(seed)
    d_in = int(np.prod(shape[:-1]))
    x = rng.normal(size=(3 * d_in, d_in)).astype(np.float32)
    h = x.T @ x
    w0 = rng.normal(size=shape).astype(np.float32)
    results = {
        "admm": lw.admm(h, w0, spec, keep),
        "admm_cg": lw.admm(h, w0, spec, keep, refit_iterations=2),
        "magnitude": lw.magnitude(w0, spec, keep),
        "wanda": lw.wanda(w0, h, spec, keep),
        "wanda_layer": lw.wanda(w0, jnp.diagonal(h), spec, keep, per_output=False),
    }
    if not isinstance(spec, Channel):
        results["sparsegpt"] = lw.sparsegpt(h, w0, spec, keep, block_size=8)
    for name, w in results.items():
        assert w.shape == w0.shape and w.dtype == w0.dtype, name
        assert_in_set(w, spec, keep)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.sampled_from([(7, 5), (2, 3, 4, 3), (9, 4)]),
    spec=st.sampled_from([Unstructured(), NofM(2, 4), NofM(1, 3, axis=-1), Channel(), Channel(axis=-1)]),
    keep=st.floats(0.05, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_magnitude_is_the_projection_ties_included(shape, spec, keep, seed):
    """The solvers' fast support selection (no sort) gives the projection's mask, ties to the lower index."""
    rng = np.random.default_rng(seed)
    w0 = rng.integers(-2, 3, size=shape).astype(np.float32) if seed % 2 else rng.normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(lw.magnitude(w0, spec, keep), project(w0, spec, keep))


def test_wanda_compares_within_each_output_and_scales_by_the_input_norm():
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(10, 7)).astype(np.float32)
    scale = rng.uniform(0.1, 3.0, size=10).astype(np.float32)
    keep = 0.43  # k = 30 of 70 weights: 4 per column and 2 columns with 5
    w = np.asarray(lw.wanda(w0, scale**2, Unstructured(), keep))
    per_column = (w != 0).sum(axis=0)
    assert per_column.sum() == 30 and set(per_column) == {4, 5}
    score = np.abs(w0) * scale[:, None]
    for c in range(7):
        kept = np.sort(score[w[:, c] != 0, c])
        assert kept.min() >= np.sort(score[:, c])[-per_column[c]]
    # Per layer: the projection of diag(H)^(1/2) W, i.e. magnitude when the input norms are equal.
    layer = lw.wanda(w0, np.ones(10, np.float32), Unstructured(), keep, per_output=False)
    np.testing.assert_array_equal(layer, lw.magnitude(w0, Unstructured(), keep))


def test_dead_inputs_and_too_few_calibration_rows():
    """A zero input (a dead channel below) and fewer rows than inputs: finite results in the set."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 32)).astype(np.float32)
    x[:, [3, 17]] = 0.0
    h = lw.damp(x.T @ x)  # singular without the damping
    w0 = rng.normal(size=(32, 8)).astype(np.float32)
    for spec, keep in [(Unstructured(), 0.4), (NofM(2, 4), 1.0)]:
        for w in (
            lw.admm(h, w0, spec, keep),
            lw.admm(h, w0, spec, keep, refit_iterations=5),
            lw.sparsegpt(h, w0, spec, keep),
        ):
            assert np.all(np.isfinite(w))
            assert_in_set(w, spec, keep, exact_count=False)
            assert error(w, w0, h) < error(lw.magnitude(w0, spec, keep), w0, h)


# --- exact solutions -----------------------------------------------------------------------


def test_dense_admm_is_the_least_squares_solution_for_a_general_target():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 24))
    y = rng.normal(size=(200, 10))  # not X W0: the target comes from elsewhere (a dense model, a pruned input)
    h, g = (x.T @ x).astype(np.float32), (x.T @ y).astype(np.float32)
    w0 = rng.normal(size=(24, 10)).astype(np.float32)
    expected = np.linalg.solve(x.T @ x, x.T @ y)
    for kwargs in ({}, {"refit_iterations": 24, "matmul_dtype": jnp.float32}):
        w = lw.admm(h, w0, Unstructured(), 1.0, g=g, **kwargs)
        np.testing.assert_allclose(w, expected, rtol=1e-3, atol=1e-4)
    assert float(lw.objective(expected, h, g)) < float(lw.objective(w0, h, g))


def test_refit_is_least_squares_on_the_support():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 12)) @ (np.eye(12) + 0.3 * rng.normal(size=(12, 12)))
    y = rng.normal(size=(60, 5))
    mask = rng.random((12, 5)) < 0.5
    mask[0] = True  # no empty column
    expected = np.zeros((12, 5))
    for c in range(5):
        s = mask[:, c]
        expected[s, c] = np.linalg.lstsq(x[:, s], y[:, c], rcond=None)[0]
    h, g = (x.T @ x).astype(np.float32), (x.T @ y).astype(np.float32)
    w = lw.refit(h, g, mask)
    np.testing.assert_allclose(w, expected, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(w)[~mask] == 0)
    # Conjugate gradients on every column at once reach it too (12 unknowns: 12 steps, and a few more for rounding).
    np.testing.assert_allclose(lw.refit(h, g, mask, iterations=30), expected, rtol=1e-3, atol=1e-4)


def sparsegpt_reference(h, w, spec, keep, block_size, damping=0.01):
    """SparseGPT written plainly: one input (row) at a time, every later row updated at once, float64."""
    h = h.astype(np.float64).copy()
    w = w.astype(np.float64).copy()
    d_in, d_out = w.shape
    h += damping * np.mean(np.diag(h)) * np.eye(d_in)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H^-1 = U^T U
    k = int(num_kept(d_in * d_out, keep))
    keep_mask = np.zeros(w.shape, bool)
    for i in range(d_in):
        if isinstance(spec, NofM) and i % spec.m == 0:
            rows = slice(i, min(i + spec.m, d_in))
            score = w[rows] ** 2 / np.diag(u)[rows, None] ** 2
            order = np.argsort(-score, axis=0, kind="stable")
            np.put_along_axis(keep_mask[rows], order[: spec.n], True, axis=0)
        elif isinstance(spec, Unstructured) and i % block_size == 0:
            rows = slice(i, min(i + block_size, d_in))
            share = k * rows.stop // d_in - k * rows.start // d_in  # the block's share of k
            score = (w[rows] ** 2 / np.diag(u)[rows, None] ** 2).ravel()
            chosen = np.zeros(score.size, bool)
            chosen[np.argsort(-score, kind="stable")[:share]] = True
            keep_mask[rows] = chosen.reshape(-1, d_out)
        q = np.where(keep_mask[i], w[i], 0.0)
        err = (w[i] - q) / u[i, i]
        w[i:] -= np.outer(u[i, i:], err)
        w[i] = q
    return w


@pytest.mark.parametrize(
    ("d_in", "spec", "block_size"),
    [(23, Unstructured(), 5), (23, Unstructured(), 64), (24, NofM(2, 4), 8), (22, NofM(2, 4), 8)],
    ids=["blocks-of-5", "one-block", "2:4", "2:4-short-last-group"],
)
def test_sparsegpt_matches_a_plain_reference(d_in, spec, block_size):
    x, w0, h = problem(3, d_in=d_in, d_out=9, outliers=2)
    expected = sparsegpt_reference(h, w0, spec, 0.4, block_size)
    w = np.asarray(lw.sparsegpt(h, w0, spec, 0.4, block_size=block_size))
    np.testing.assert_array_equal(w != 0, expected != 0)
    np.testing.assert_allclose(w, expected, rtol=1e-3, atol=1e-4)


# --- jit, convolutions, Gram sums ------------------------------------------------------------


def test_keep_ratio_is_traced():
    _, w0, h = problem(0, d_in=16, d_out=8)
    traces = []

    @jax.jit
    def prune(keep):
        traces.append(1)
        return (
            lw.admm(h, w0, Unstructured(), keep),
            lw.sparsegpt(h, w0, Unstructured(), keep),
            lw.wanda(w0, h, Unstructured(), keep),
        )

    for keep in (0.3, 0.6, 0.9):
        for w in prune(jnp.float32(keep)):
            assert_in_set(w, Unstructured(), keep)
    assert len(traces) == 1


def test_conv_kernels_prune_like_their_patches():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(6, 7, 7, 4)).astype(np.float32) @ rng.normal(size=(4, 4)).astype(np.float32)
    kernel = rng.normal(size=(3, 3, 4, 8)).astype(np.float32) / 6.0
    patches = lw.conv_patches(images, (3, 3), strides=(1, 1), padding="SAME")
    conv = jax.lax.conv_general_dilated(images, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(patches @ kernel.reshape(-1, 8), conv, rtol=1e-4, atol=1e-4)

    h = lw.gram(patches)
    w = lw.admm(h, kernel, Channel(), 0.5)  # two of the four input channels, across the whole window
    alive = np.asarray(w != 0).any(axis=(0, 1, 3))
    assert alive.sum() == 2
    assert np.all(np.asarray(w)[:, :, ~alive] == 0)
    assert error(w, kernel, h) <= error(lw.magnitude(kernel, Channel(), 0.5), kernel, h)
    for spec in (Unstructured(), NofM(2, 4)):
        w = lw.admm(h, kernel, spec, 0.5)
        assert_in_set(w, spec, 0.5)
        assert error(w, kernel, h) <= error(lw.sparsegpt(h, kernel, spec, 0.5), kernel, h)


def test_gram_sums_over_batches():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(2, 5, 6)).astype(np.float32) for _ in range(3)]
    ys = [rng.normal(size=(2, 5, 3)).astype(np.float32) for _ in range(3)]
    state = lw.init_gram(6, 3)
    for x, y in zip(xs, ys, strict=True):
        state = jax.jit(lw.accumulate)(state, x, y)
    x, y = np.concatenate(xs).reshape(-1, 6), np.concatenate(ys).reshape(-1, 3)
    np.testing.assert_allclose(state.h, x.T @ x, rtol=1e-5)
    np.testing.assert_allclose(state.g, x.T @ y, rtol=1e-5, atol=1e-5)
    assert int(state.count) == 30
    np.testing.assert_allclose(lw.gram(x), x.T @ x, rtol=1e-5)
    damped = lw.damp(state.h, 0.1)
    np.testing.assert_allclose(damped - state.h, 0.1 * np.mean(np.diag(state.h)) * np.eye(6), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="y must be given"):
        lw.accumulate(state, xs[0])
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        lw.accumulate(lw.init_gram(6), np.zeros((4, 5), np.float32))


def test_shape_mismatches_name_the_shapes():
    _, w0, h = problem(0, d_in=16, d_out=8)
    with pytest.raises(ValueError, match=r"h must be \(16, 16\).*\(16, 8\).*got \(15, 15\)"):
        lw.admm(h[:15, :15], w0, Unstructured(), 0.5)
    with pytest.raises(ValueError, match=r"g must be \(16, 8\).*got \(16, 7\)"):
        lw.admm(h, w0, Unstructured(), 0.5, g=np.zeros((16, 7), np.float32))
    with pytest.raises(ValueError, match=r"h must be \(16, 16\)"):
        lw.sparsegpt(h[:8, :8], w0, Unstructured(), 0.5)
    with pytest.raises(ValueError, match=r"\(16, 16\) or \(16,\).*got \(8,\)"):
        lw.wanda(w0, np.ones(8, np.float32), Unstructured(), 0.5)
    with pytest.raises(ValueError, match=r"g must be \(16, 8\)"):
        lw.refit(h, np.zeros((8, 16), np.float32), w0 != 0)
    with pytest.raises(ValueError, match=r"same shape.*\(8, 16\) and \(16, 8\)"):
        lw.reconstruction_error(w0.T, w0, h)
    with pytest.raises(ValueError, match=r"at least 2 axes.*\(16,\)"):
        lw.magnitude(w0[:, 0], Unstructured(), 0.5)
    with pytest.raises(ValueError, match="Unstructured and NofM"):
        lw.sparsegpt(h, w0, Channel(), 0.5)
    with pytest.raises(ValueError, match="multiple of m"):
        lw.sparsegpt(h, w0, NofM(2, 4), block_size=6)


# --- sharded over the outputs ------------------------------------------------------------------

SHARDED = """
import itertools, json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
sys.path.insert(0, {tests!r})
from test_layerwise import problem
from admmprune.core import layerwise as lw
from admmprune.core.sparsity import Channel, NofM, Unstructured

assert jax.device_count() == 8
_, w0, h = problem(0, d_in=32, d_out=64)
mesh = Mesh(np.array(jax.devices()), ("out",))
w_sharded = jax.device_put(w0, NamedSharding(mesh, PartitionSpec(None, "out")))
h_replicated = jax.device_put(h, NamedSharding(mesh, PartitionSpec()))
one = jax.devices()[0]
out = {{}}
cases = [("unstructured", Unstructured(), 0.3), ("2:4", NofM(2, 4), 1.0), ("channel", Channel(), 0.5)]
variants = {{
    "exact": {{"matmul_dtype": jnp.float32}},
    "cg": {{"refit_iterations": 3, "matmul_dtype": jnp.float32}},
    "bf16": {{}},
}}
for (name, spec, keep), (variant, kwargs) in itertools.product(cases, variants.items()):
    single = lw.admm(jax.device_put(h, one), jax.device_put(w0, one), spec, keep, **kwargs)
    sharded = lw.admm(h_replicated, w_sharded, spec, keep, **kwargs)
    a, b = np.asarray(single), np.asarray(sharded)
    out[f"{{name}}/{{variant}}"] = {{
        "sharded": sharded.sharding.spec == PartitionSpec(None, "out"),
        "max_diff": float(np.max(np.abs(b - a))),
        "scale": float(np.max(np.abs(a))),
        "same_mask": bool(np.array_equal(b != 0, a != 0)),
        "errors": [float(lw.reconstruction_error(w, w0, h)) for w in (a, b)],
    }}
print(json.dumps(out))
"""


def test_admm_sharded_over_the_outputs_gives_what_one_device_gives():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    script = SHARDED.format(tests=os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(results) == 9
    for name, r in results.items():
        # Large layers' path (conjugate gradients) stays split over the outputs; the exact refit of small
        # ones (the other variants here) runs column after column and may come back replicated.
        assert r["sharded"] or not name.endswith("/cg"), (name, r)
        if name.endswith("/bf16"):
            # bfloat16 operands round a sum that another split of the outputs adds in another order to the
            # neighbouring value now and then, and ADMM may then keep another weight near the threshold:
            # the same quality, not always the same mask.
            single, sharded = r["errors"]
            assert sharded == pytest.approx(single, rel=0.02), (name, r)
        else:
            assert r["same_mask"], (name, r)
            assert r["max_diff"] <= 1e-5 * r["scale"], (name, r)
