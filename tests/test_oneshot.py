"""One-shot pruning's calibration pass: the layers it finds, the Gram matrices
it computes for them, and the sequential pruning of whole models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import user_models
from flax import nnx

from admmprune import UserError
from admmprune.models import layers as zoo_layers
from admmprune.models import lenet
from admmprune.structure import calibration, oneshot

DN = ("NHWC", "HWIO", "NHWC")


class Strided(nnx.Module):
    """Convolutions with stride, dilation, padding and a LinearGeneral head, as users write them."""

    def __init__(self, *, rngs):
        self.a = nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.b = nnx.Conv(4, 5, (3, 2), kernel_dilation=(2, 1), padding=((1, 0), (2, 1)), rngs=rngs)
        self.head = nnx.LinearGeneral(5, (2, 3), rngs=rngs)

    def inputs(self, x):
        """The inputs of a, b and head."""
        xa = x
        xb = nnx.relu(self.a(xa))
        xh = jnp.mean(nnx.relu(self.b(xb)), axis=(1, 2))
        return xa, xb, xh

    def __call__(self, x):
        return self.head(self.inputs(x)[2])


def _split(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return params, lambda p, x: nnx.merge(graphdef, p, rest)(x)


def test_layers_are_found_in_use_order_and_their_grams_are_their_inputs():
    model = Strided(rngs=nnx.Rngs(0))
    params, fn = _split(model)
    x = jax.random.normal(jax.random.key(1), (2, 9, 9, 3))
    found = calibration.find_layers(fn, params, x)
    assert [layer.path for layer in found.layers] == ["a/kernel", "b/kernel", "head/kernel"]
    assert found.refused == {}
    assert [(layer.kind, layer.inputs, layer.outputs) for layer in found.layers] == [
        ("conv", 27, 1),
        ("conv", 24, 1),
        ("dense", 5, 2),
    ]
    xa, xb, xh = model.inputs(x)
    ops = [
        lambda x, v: jax.lax.conv_general_dilated(x, v, (2, 2), "SAME", dimension_numbers=DN),
        lambda x, v: jax.lax.conv_general_dilated(
            x, v, (1, 1), ((1, 0), (2, 1)), rhs_dilation=(2, 1), dimension_numbers=DN
        ),
        lambda x, v: jnp.einsum("bi,ihk->bhk", x, v).reshape(x.shape[0], -1),
    ]
    for layer, inp, op in zip(found.layers, (xa, xb, xh), ops, strict=True):
        h, rows = calibration.input_gram(fn, params, [x], layer)
        assert h.shape == (layer.inputs, layer.inputs)
        for seed in range(3):
            v = jax.random.normal(jax.random.key(seed), layer.shape)
            out = op(inp, v)
            vm = v.reshape(layer.inputs, -1)
            np.testing.assert_allclose(jnp.trace(vm.T @ h @ vm), jnp.sum(out**2), rtol=2e-4)
        assert rows == out.size // (out.shape[-1] if layer.kind == "conv" else out[0].size)


def test_zoo_convs_are_read_as_lax_convs():
    # The zoo's conv computes a one-channel layer as a sum over taps: the
    # calibration pass still finds it as a convolution with its patches.
    model = lenet.LeNet5(rngs=nnx.Rngs(0))
    params, fn = _split(model)
    x = jax.random.normal(jax.random.key(1), (3, 28, 28, 1))
    found = calibration.find_layers(fn, params, x)
    assert [layer.path for layer in found.layers] == ["conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"]
    h, rows = calibration.input_gram(fn, params, [x], found.layers[1])
    inp = zoo_layers.max_pool_2x2(model.conv1(x))
    v = jax.random.normal(jax.random.key(2), (5, 5, 20, 50))
    out = jax.lax.conv_general_dilated(inp, v, (1, 1), "VALID", dimension_numbers=DN)
    vm = v.reshape(500, 50)
    np.testing.assert_allclose(jnp.trace(vm.T @ h @ vm), jnp.sum(out**2), rtol=2e-4)
    assert rows == 3 * 8 * 8


class Unreadable(nnx.Module):
    def __init__(self, *, rngs):
        self.depthwise = nnx.Conv(4, 4, (3, 3), feature_group_count=4, rngs=rngs)
        self.middle = nnx.Einsum("bi,oi->bo", (3, 4), rngs=rngs)  # contracts the kernel's last axis
        self.scale = nnx.Param(jnp.ones((4, 4)))  # used elementwise

    def __call__(self, x):
        y = jnp.mean(self.depthwise(x), axis=(1, 2)) * self.scale[0]
        return self.middle(y)


def test_kernels_used_otherwise_are_refused_with_the_reason():
    params, fn = _split(Unreadable(rngs=nnx.Rngs(0)))
    x = jnp.ones((2, 5, 5, 4))
    found = calibration.find_layers(fn, params, x)
    assert found.layers == []
    assert set(found.refused) == {"depthwise/kernel", "middle/kernel"}  # by default, the leaves named kernel
    assert "grouped" in found.refused["depthwise/kernel"]
    assert "contracts its axes (1,)" in found.refused["middle/kernel"]
    assert "test_oneshot.py" in found.refused["middle/kernel"]  # the user's source line
    asked = calibration.find_layers(fn, params, x, paths=["scale"])
    assert "uses it before any matmul or convolution" in asked.refused["scale"]


def test_attention_projections_are_layers():
    model = user_models.GPT(rngs=nnx.Rngs(0))
    model.eval()
    params, fn = _split(model)
    found = calibration.find_layers(fn, params, jnp.zeros((2, 8), jnp.int32))
    paths = [layer.path for layer in found.layers]
    assert paths[:6] == [
        "blocks/0/attn/query/kernel",
        "blocks/0/attn/key/kernel",
        "blocks/0/attn/value/kernel",
        "blocks/0/attn/out/kernel",
        "blocks/0/up/kernel",
        "blocks/0/down/kernel",
    ]
    out = next(layer for layer in found.layers if layer.path == "blocks/0/attn/out/kernel")
    assert (out.inputs, out.outputs) == (16, 1)  # (heads, head_dim) -> d


def _calibration(n=4, size=32):
    """Random images: iid pixels, so that a first layer's input Gram matrix is nearly the identity."""
    return [jax.random.normal(jax.random.key(10 + i), (size, 28, 28, 1)) for i in range(n)]


def _mnist(data_dir, n=4, size=32):
    """Real MNIST images, whose neighbouring pixels correlate (as a trained model's inputs do)."""
    from admmprune import data

    info = data.dataset_info("mnist", data_dir)
    images = data.load_source("mnist", f"train[:{n * size}]", data_dir, in_memory=True).images
    x = (images.astype(np.float32) / 255 - info.mean[0]) / info.std[0]
    return [jnp.asarray(x[i * size : (i + 1) * size]) for i in range(n)]


def test_every_method_prunes_every_layer_to_the_ratio_and_admm_reconstructs_best(data_dir):
    model = lenet.LeNet5(rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    specs = oneshot.kernel_specs(params, skip=("fc2",))
    errors = {}
    batches = _mnist(data_dir)
    for method in oneshot.METHODS:
        pruned, report = oneshot.prune_model(model, batches, specs, 0.3, method=method, progress=False)
        assert set(report["layers"]) == {"conv1/kernel", "conv2/kernel", "fc1/kernel"}
        for path, layer in report["layers"].items():
            kernel = nnx.state(pruned, nnx.Param)[path.split("/")[0]]["kernel"].get_value()
            assert jnp.mean(kernel != 0) == pytest.approx(0.3, abs=1e-3)
            assert layer["kept"] == pytest.approx(0.3, abs=1e-3)
        np.testing.assert_array_equal(pruned.fc2.kernel.get_value(), model.fc2.kernel.get_value())
        errors[method] = report["layers"]
    assert model.conv1.kernel.get_value().all()  # the model itself is left dense
    for path in errors["admm"]:
        admm = errors["admm"][path]["error"]
        assert admm < errors["sparsegpt"][path]["error"] < errors["magnitude"][path]["error"]
        assert admm < errors["wanda"][path]["error"]


def test_later_layers_see_the_pruned_earlier_ones():
    model = lenet.LeNet5(rngs=nnx.Rngs(0))
    params, fn = _split(model)
    specs = oneshot.kernel_specs(params, skip=("fc2",))
    batches = _calibration(2)
    pruned, report = oneshot.prune(fn, params, batches, specs, 0.1, method="magnitude", progress=False)
    found = calibration.find_layers(fn, params, batches[0])
    fc1 = found.layers[2]
    h_pruned = sum(calibration.input_gram(fn, pruned, [b], fc1)[0] for b in batches)
    h_dense = sum(calibration.input_gram(fn, params, [b], fc1)[0] for b in batches)
    rows = report["layers"]["fc1/kernel"]["rows"]
    w0, w = params["fc1"]["kernel"].get_value(), pruned["fc1"]["kernel"].get_value()

    def error(h):
        d = w - w0
        return float(jnp.trace(d.T @ h @ d) / jnp.trace(w0.T @ h @ w0))

    assert rows == 2 * 32
    assert report["layers"]["fc1/kernel"]["error"] == pytest.approx(error(h_pruned), rel=1e-3)
    assert error(h_pruned) != pytest.approx(error(h_dense), rel=1e-3)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "obs"}, "unknown one-shot method 'obs'"),
        ({"keep_ratio": 0.0}, "keep_ratio must be in"),
        ({"batches": []}, "at least one calibration batch"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, match):
    model = lenet.LeNet5(rngs=nnx.Rngs(0))
    params, fn = _split(model)
    args = {"batches": _calibration(1, 4), "keep_ratio": 0.5, **kwargs}
    specs = oneshot.kernel_specs(params)
    with pytest.raises(UserError, match=match):
        oneshot.prune(fn, params, args.pop("batches"), specs, progress=False, **args)
