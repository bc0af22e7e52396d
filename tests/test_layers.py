"""The zoo's convolution: lax's values and gradients, with the kernel gradient summed over batch chunks on CPU."""

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
