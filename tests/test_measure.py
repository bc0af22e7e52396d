"""Parameter counts, XLA-reported FLOPs and latency."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admmprune import measure, models

F32 = jnp.float32


def _lenet_macs(f1, f2, f3, classes=10):
    # Per image on 28x28x1: conv1 24x24 outputs, conv2 8x8 outputs, fc1 from 4x4xf2.
    return 24 * 24 * 25 * f1 + 8 * 8 * 25 * f1 * f2 + 16 * f2 * f3 + f3 * classes


def test_count_params_skips_none_and_accepts_abstract_leaves():
    tree = {"w": jnp.zeros((3, 4)), "b": None, "s": jax.ShapeDtypeStruct((2, 5), F32)}
    assert measure.count_params(tree) == 22
    assert measure.count_params({"x": jnp.float32(1.0)}) == 1
    assert measure.count_params({}) == 0
    assert measure.count_params(nnx.eval_shape(lambda: models.get("lenet5"))) == 431_080


def test_count_nonzero_counts_surviving_weights_and_true_mask_entries():
    params = {"w": jnp.array([[0.0, 1.0], [2.0, 0.0]]), "b": None, "c": jnp.zeros(3)}
    assert measure.count_nonzero(params) == 2
    assert measure.count_nonzero({"m": jnp.array([True, False, True])}) == 2


@pytest.mark.parametrize(("m", "k", "n"), [(8, 16, 32), (1, 784, 300), (3, 5, 7)])
def test_flops_of_matmul_is_two_per_multiply_add(m, k, n):
    a = jax.ShapeDtypeStruct((m, k), F32)
    b = jax.ShapeDtypeStruct((k, n), F32)
    assert measure.flops(jnp.matmul, a, b) == 2 * m * n * k
    # Concrete arrays give the same answer (they are made abstract first).
    assert measure.flops(jnp.matmul, jnp.ones((m, k)), jnp.ones((k, n))) == 2 * m * n * k


def test_flops_of_conv_is_two_per_multiply_add():
    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    x = jax.ShapeDtypeStruct((2, 28, 28, 3), F32)
    w = jax.ShapeDtypeStruct((5, 5, 3, 20), F32)
    assert measure.flops(conv, x, w) == 2 * (2 * 24 * 24 * 20) * (5 * 5 * 3)


def test_lenet5_forward_flops_match_caffe_multiply_adds():
    x = jax.ShapeDtypeStruct((1, 28, 28, 1), F32)
    model = nnx.eval_shape(lambda: models.get("lenet5"))
    got = measure.flops(model, x)
    macs = _lenet_macs(20, 50, 500)
    assert macs == 2_293_000
    # jax 0.10.2 reports exactly 2 * macs + 26_770 (bias adds, relu, 3 per pooled
    # output); allow other XLA versions to count elementwise ops differently.
    assert got == pytest.approx(2 * macs, rel=0.01)
    fn, params = models.apply_fn(models.get("lenet5"))
    assert measure.flops(fn, params, x) == got
    batch8 = measure.flops(model, jax.ShapeDtypeStruct((8, 28, 28, 1), F32))
    assert batch8 == pytest.approx(8 * got, rel=1e-9)


@pytest.mark.parametrize("features", [(10, 25, 250), (5, 12, 100), (20, 25, 500)])
def test_flops_shrink_with_lenet_widths_like_the_multiply_adds(features):
    x = jax.ShapeDtypeStruct((1, 28, 28, 1), F32)
    full = measure.flops(nnx.eval_shape(lambda: models.get("lenet5")), x)
    small = measure.flops(nnx.eval_shape(lambda: models.get("lenet5", features=features)), x)
    assert small < full
    expected = _lenet_macs(*features) / _lenet_macs(20, 50, 500)
    assert small / full == pytest.approx(expected, rel=0.05)


def test_latency_returns_positive_ordered_stats():
    x = jnp.ones((4, 28, 28, 1), F32)
    stats = measure.latency_ms(models.get("mlp"), x, repeats=5, warmup=1)
    assert set(stats) == {"median", "p10", "p90", "min", "mean"}
    assert 0 < stats["min"] <= stats["p10"] <= stats["median"] <= stats["p90"]
    fn, params = models.apply_fn(models.get("mlp"))
    assert measure.latency_ms(fn, params, x, repeats=3, warmup=0)["median"] > 0


def test_latency_rejects_no_repeats():
    with pytest.raises(ValueError, match="repeats"):
        measure.latency_ms(jnp.sin, np.float32(1.0), repeats=0)
