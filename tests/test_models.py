"""Model shapes, parameter counts, registry and the reshape max-pool."""

import json

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admmprune import UserError, models
from admmprune.models.layers import max_pool_2x2


def _param_paths(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    _, params, _ = nnx.split(model, nnx.Param, ...)
    return {"/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(params)}


def _abstract(name, **kwargs):
    # Shape-only checks skip the (slow, eager) initialisers.
    return nnx.eval_shape(lambda: models.get(name, **kwargs))


def _lenet_params(c_in, f1, f2, f3, classes, hw=4):
    return 25 * c_in * f1 + f1 + 25 * f1 * f2 + f2 + hw * hw * f2 * f3 + f3 + f3 * classes + classes


def test_lenet5_has_caffe_parameter_count_and_paths():
    model = _abstract("lenet5")
    shapes = _param_paths(model)
    assert sum(int(np.prod(s)) for s in shapes.values()) == 431_080
    assert shapes == {
        "conv1/kernel": (5, 5, 1, 20),
        "conv1/bias": (20,),
        "conv2/kernel": (5, 5, 20, 50),
        "conv2/bias": (50,),
        "fc1/kernel": (800, 500),
        "fc1/bias": (500,),
        "fc2/kernel": (500, 10),
        "fc2/bias": (10,),
    }
    assert models.LeNet5.output_layer == "fc2"
    assert model.widths == (20, 50, 500)


@pytest.mark.parametrize("batch", [1, 3])
def test_lenet5_output_shape_under_jit(batch):
    fn, params = models.apply_fn(models.get("lenet5"))
    out = jax.jit(fn)(params, jnp.ones((batch, 28, 28, 1), jnp.float32))
    assert out.shape == (batch, 10)
    assert out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))


def test_lenet5_rebuilds_smaller_from_config():
    model = models.get("lenet5")
    small = models.get(models.name_of(model), **{**model.config, "features": [5, 12, 100]})
    assert small.widths == (5, 12, 100)
    shapes = _param_paths(small)
    assert sum(int(np.prod(s)) for s in shapes.values()) == _lenet_params(1, 5, 12, 100, 10)
    assert small(jnp.zeros((2, 28, 28, 1), jnp.float32)).shape == (2, 10)


def test_lenet5_config_round_trips_through_json():
    model = _abstract("lenet5", features=(4, 6, 8), num_classes=3, conv_relu=True)
    again = _abstract("lenet5", **json.loads(json.dumps(model.config)))
    assert again.config == model.config
    assert _param_paths(again) == _param_paths(model)


def test_lenet5_odd_input_crops_before_pooling():
    # 29 -> conv 25 -> pool 12 -> conv 8 -> pool 4: same fc1 size as 28x28.
    model = models.get("lenet5", in_shape=(29, 31, 3))
    assert _param_paths(model)["fc1/kernel"] == (800, 500)
    assert _param_paths(model)["conv1/kernel"] == (5, 5, 3, 20)
    assert model(jnp.zeros((1, 29, 31, 3), jnp.float32)).shape == (1, 10)


def test_lenet5_conv_relu_changes_the_function():
    x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
    plain = models.get("lenet5", rngs=nnx.Rngs(3))
    relu = models.get("lenet5", conv_relu=True, rngs=nnx.Rngs(3))
    assert not np.allclose(plain(x), relu(x))


def test_lenet5_builds_abstractly():
    abstract = nnx.eval_shape(lambda: models.get("lenet5", features=(5, 12, 100)))
    _, params, _ = nnx.split(abstract, nnx.Param, ...)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    assert params["fc1"]["kernel"].shape == (4 * 4 * 12, 100)


def test_mlp_shapes_and_paths():
    model = models.get("mlp", in_features=784, hidden=(300, 100), num_classes=10)
    shapes = _param_paths(model)
    assert shapes == {
        "layers/0/kernel": (784, 300),
        "layers/0/bias": (300,),
        "layers/1/kernel": (300, 100),
        "layers/1/bias": (100,),
        "head/kernel": (100, 10),
        "head/bias": (10,),
    }
    assert sum(int(np.prod(s)) for s in shapes.values()) == 266_610
    assert models.MLP.output_layer == "head"
    assert model.widths == (300, 100)
    fn, params = models.apply_fn(model)
    assert jax.jit(fn)(params, jnp.ones((4, 28, 28, 1), jnp.float32)).shape == (4, 10)
    assert jax.jit(fn)(params, jnp.ones((4, 784), jnp.float32)).shape == (4, 10)


def test_mlp_without_hidden_layers_is_linear():
    model = models.get("mlp", in_features=6, hidden=(), num_classes=2)
    assert set(_param_paths(model)) == {"head/kernel", "head/bias"}
    assert model(jnp.ones((3, 6), jnp.float32)).shape == (3, 2)


def test_apply_fn_is_pure_and_matches_the_module():
    model = models.get("lenet5", features=(3, 4, 5))
    fn, params = models.apply_fn(model)
    x = jax.random.normal(jax.random.key(0), (2, 28, 28, 1))
    # Eager and jit may sum conv1's taps (one input channel) in another order: float rounding.
    np.testing.assert_allclose(jax.jit(fn)(params, x), model(x), rtol=1e-5, atol=1e-6)
    zeroed = jax.tree.map(jnp.zeros_like, params)
    np.testing.assert_array_equal(fn(zeroed, x), jnp.zeros((2, 10)))
    # The module still holds its own parameters.
    np.testing.assert_allclose(model(x), jax.jit(fn)(params, x), rtol=1e-5, atol=1e-6)


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match="valid names: .*lenet5, mlp") as e:
        models.get("resnet")
    assert {"lenet5", "mlp"} <= set(models.names())
    assert all(name in str(e.value) for name in models.names())
    assert models.names() == tuple(sorted(models.names()))


@pytest.mark.parametrize(
    "kwargs",
    [{"features": (0, 5, 5)}, {"features": (5, 5)}, {"in_shape": (12, 12, 1)}],
)
def test_lenet5_bad_widths_are_user_errors(kwargs):
    with pytest.raises(UserError):
        models.get("lenet5", **kwargs)


def test_name_of_unregistered_model_is_user_error():
    with pytest.raises(UserError, match="not a registered model"):
        models.name_of(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))


def _reference_pool(x):
    return flax.linen.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


def _lax_pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 7, 9, 2), (3, 5, 4, 1), (1, 1, 3, 1)])
def test_max_pool_matches_reduce_window(shape):
    # A permutation of distinct values: no ties, so gradients are unique too.
    n = int(np.prod(shape))
    x = jax.random.permutation(jax.random.key(0), jnp.arange(n, dtype=jnp.float32)).reshape(shape)
    out = jax.jit(max_pool_2x2)(x)
    assert out.shape == (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
    np.testing.assert_array_equal(out, _reference_pool(x))
    np.testing.assert_array_equal(out, _lax_pool(x))

    cot = jax.random.normal(jax.random.key(1), out.shape)

    def loss(pool):
        return lambda x: jnp.sum(pool(x) * cot)

    grad = jax.jit(jax.grad(loss(max_pool_2x2)))(x)
    np.testing.assert_array_equal(grad, jax.grad(loss(_reference_pool))(x))
    np.testing.assert_array_equal(grad, jax.grad(loss(_lax_pool))(x))
