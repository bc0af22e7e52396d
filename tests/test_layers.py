"""The zoo's convolution and pool: lax's values and gradients in forms that are fast on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admmprune.models import layers

CASES = [
    # (input shape, kernel shape, keyword arguments of nnx.Conv)
    ((7, 9, 9, 3), (3, 3), {"padding": "SAME"}),
    ((7, 9, 9, 3), (5, 5), {"padding": "VALID", "strides": 2}),
    ((5, 8, 8, 4), (3, 3), {"padding": ((1, 1), (1, 1)), "feature_group_count": 4}),  # depthwise
    ((6, 8, 8, 4), (1, 1), {"use_bias": False, "strides": 2}),
    ((5, 6, 6, 2), (3, 3), {"padding": "SAME", "kernel_dilation": 2}),
]


@pytest.mark.parametrize("shape,kernel,kwargs", CASES)
def test_conv_equals_lax_in_value_and_both_gradients(monkeypatch, shape, kernel, kwargs):
    monkeypatch.setattr(layers, "WEIGHT_GRAD_CHUNK", 2)  # 7 examples: chunks of 2, 2, 2 and 1
    out = 8
    ours = layers.Conv(shape[-1], out, kernel, rngs=nnx.Rngs(0), **kwargs)
    theirs = nnx.Conv(shape[-1], out, kernel, rngs=nnx.Rngs(0), **kwargs)
    assert ours.conv_general_dilated is layers.conv_general_dilated
    x = jax.random.normal(jax.random.key(1), shape)
    probe = jax.random.normal(jax.random.key(2), theirs(x).shape)

    def loss(model, x):
        return jnp.sum(model(x) * probe)

    (v1, (g1, gx1)), (v2, (g2, gx2)) = (
        (jax.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(m, x)) for m in (ours, theirs)
    )
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(gx1, gx2, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "shape,kernel,out,padding",
    [
        ((4, 12, 12, 6), (5, 5), 10, "VALID"),  # LeNet-5's conv2, small
        ((4, 9, 9, 3), (5, 5), 7, "SAME"),
        ((3, 8, 10, 2), (5, 5), 3, ((2, 1), (0, 3))),  # asymmetric, and a pad larger than the kernel's reach
        ((5, 7, 7, 4), (3, 3), 4, "SAME"),  # tiny channels
        ((5, 7, 7, 3), (3, 1), 2, "VALID"),
    ],
)
def test_input_gradient_as_matmul_is_laxs(shape, kernel, out, padding):
    conv = layers.Conv(shape[-1], out, kernel, padding=padding, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), shape)
    probe = jax.random.normal(jax.random.key(2), conv(x).shape)
    kernel_value = conv.kernel.get_value()

    def grad_x(fn):
        return jax.grad(lambda x: jnp.sum(fn(x, kernel_value, (1, 1), conv.padding, dimension_numbers=DN) * probe))

    ours, theirs = grad_x(layers.conv_general_dilated), grad_x(jax.lax.conv_general_dilated)
    np.testing.assert_allclose(jax.jit(ours)(x), jax.jit(theirs)(x), rtol=1e-5, atol=1e-5)
    # The matmul form was used (lax's input gradient is a convolution, no matmul).
    assert "dot_general" in str(jax.make_jaxpr(ours)(x))


def test_input_gradient_of_wider_3x3_convs_stays_laxs():
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 8))
    kernel = jax.random.normal(jax.random.key(2), (3, 3, 8, 8))
    grad = jax.grad(lambda x: jnp.sum(layers.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=DN)))
    assert "dot_general" not in str(jax.make_jaxpr(grad)(x))


DN = ("NHWC", "HWIO", "NHWC")


def test_large_batches_use_at_most_the_chunk_limit(monkeypatch):
    """A batch past WEIGHT_GRAD_CHUNK * MAX_WEIGHT_GRAD_CHUNKS gets larger chunks, not more of them."""
    monkeypatch.setattr(layers, "WEIGHT_GRAD_CHUNK", 1)
    monkeypatch.setattr(layers, "MAX_WEIGHT_GRAD_CHUNKS", 3)
    batches = []
    lax_conv = layers._lax_conv

    def spy(lhs, rhs, static):
        batches.append(lhs.shape[0])
        return lax_conv(lhs, rhs, static)

    monkeypatch.setattr(layers, "_lax_conv", spy)
    x = jax.random.normal(jax.random.key(1), (10, 5, 5, 2))

    def grad(model):
        return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)

    ours = grad(layers.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0)))
    assert sorted(b for b in batches if b < 10) == [2, 4, 4]  # ceil(10 / 3) = 4 per chunk
    reference = grad(nnx.Conv(2, 3, (3, 3), rngs=nnx.Rngs(0)))
    np.testing.assert_allclose(ours["kernel"][...], reference["kernel"][...], rtol=1e-5, atol=1e-5)


TAPS_CASES = [
    # one input channel: the value is computed as a sum over kernel taps on CPU
    ((3, 28, 28, 1), (5, 5), {"padding": "VALID"}),
    ((3, 9, 11, 1), (3, 3), {"padding": "SAME", "strides": 2}),
    ((3, 9, 9, 1), (3, 3), {"padding": ((2, 0), (1, 3)), "kernel_dilation": 2}),
    ((3, 8, 8, 1), (1, 1), {"use_bias": False}),
]


def _primitives(fn, *args):
    jaxpr = jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr  # a new function each time: no cached trace
    return {e.primitive.name for e in jaxpr.eqns} | {e.primitive.name for e in _inner_eqns(jaxpr)}


def _inner_eqns(jaxpr):
    for e in jaxpr.eqns:
        for value in e.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from inner.eqns
                yield from _inner_eqns(inner)


@pytest.mark.parametrize("shape,kernel,kwargs", TAPS_CASES)
def test_one_channel_conv_value_is_lax_and_traces_as_lax_for_readers(shape, kernel, kwargs):
    ours = layers.Conv(1, 6, kernel, rngs=nnx.Rngs(0), **kwargs)
    theirs = nnx.Conv(1, 6, kernel, rngs=nnx.Rngs(0), **kwargs)
    x = jax.random.normal(jax.random.key(1), shape)
    expected = theirs(x)
    np.testing.assert_allclose(ours(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(ours, x), expected, rtol=1e-5, atol=1e-5)
    assert "conv_general_dilated" not in _primitives(ours, x)  # the taps form runs
    with layers.reference_forms():
        assert "conv_general_dilated" in _primitives(ours, x)  # what discovery and MAC counts read
    assert "conv_general_dilated" not in _primitives(ours, x)  # and only inside the block


def test_pool_value_is_strided_maxima_and_traces_as_a_reduction_for_readers():
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
    assert "reduce_max" not in _primitives(layers.max_pool_2x2, x)
    with layers.reference_forms():
        assert "reduce_max" in _primitives(layers.max_pool_2x2, x)
        reference = layers.max_pool_2x2(x)
    np.testing.assert_array_equal(layers.max_pool_2x2(x), reference)  # maxima are exact in any order
