"""The model zoo: VGG, ResNet, MobileNetV2 and U-Net.

Shapes and counts come from ``nnx.eval_shape``/``jax.eval_shape`` so that no
big model is allocated; the few real forward passes fill an abstract model with
host-side random values (initialising eagerly compiles every initialiser for
every new shape, which is most of the cost on CPU) and run under ``jax.jit``.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from admmprune import UserError, models
from admmprune.models.resnet import max_pool_3x3_s2

ZOO = (
    "vgg11",
    "vgg16",
    "vgg19",
    "resnet20",
    "resnet32",
    "resnet56",
    "resnet110",
    "resnet18",
    "resnet50",
    "mobilenetv2",
    "unet",
)

# One model per distinct code path; resnet32/56/110 differ from resnet20 only
# in their block counts, and vgg16/19 from vgg11 in their conv counts.
FAMILIES = ("vgg11", "resnet20", "resnet18", "resnet50", "mobilenetv2", "unet")


def _abstract(name, **kwargs):
    return nnx.eval_shape(lambda: models.get(name, **kwargs))


def _params(model) -> dict[str, tuple[int, ...]]:
    return {"/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _count(model) -> int:
    return sum(math.prod(s) for s in _params(model).values())


def _out_shape(model, shape):
    graphdef, state = nnx.split(model)

    def fn(s, x):
        return nnx.merge(graphdef, s)(x)

    return jax.eval_shape(fn, state, jax.ShapeDtypeStruct(shape, jnp.float32)).shape


def _concrete(model, seed=0):
    """``model`` (abstract) with He-normal kernels, random BN affines and stats from numpy."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(model)

    def fill(path, x):
        name = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        if name == "kernel":
            fan_in = math.prod(x.shape[:-1])
            return jnp.asarray(rng.normal(0.0, math.sqrt(2.0 / fan_in), x.shape), x.dtype)
        if name in ("scale", "var"):
            return jnp.asarray(rng.uniform(0.5, 1.5, x.shape), x.dtype)
        return jnp.asarray(rng.normal(0.0, 0.1, x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _halved(widths):
    # Equal widths stay equal, so residual and depthwise constraints still hold.
    return tuple(max(1, w // 2) for w in widths)


# Published counts. VGG: kuangliu/pytorch-cifar (one dense layer, conv bias).
# CIFAR ResNets: He et al.'s option A counts (269,722 = "0.27M", 464,154,
# 853,018, 1,727,962 = "1.7M") plus 2,752 for our two option-B projections
# (16*32 + 2*32 and 32*64 + 2*64). ImageNet models: torchvision. U-Net:
# milesial/Pytorch-UNet with transposed convs (the paper's 31.0M).
PUBLISHED = {
    "vgg11": 9_231_114,
    "vgg16": 14_728_266,
    "vgg19": 20_040_522,
    "resnet20": 269_722 + 2_752,
    "resnet32": 464_154 + 2_752,
    "resnet56": 853_018 + 2_752,
    "resnet110": 1_727_962 + 2_752,
    "resnet18": 11_689_512,
    "resnet50": 25_557_032,
    "mobilenetv2": 3_504_872,
    "unet": 31_037_698,
}


@pytest.mark.parametrize("name", ZOO)
def test_parameter_counts_match_published(name):
    kwargs = {"num_classes": 1000} if name in ("resnet18", "resnet50", "mobilenetv2") else {}
    if name == "unet":
        kwargs = {"base": 64, "depth": 4, "num_classes": 2, "in_shape": (128, 128, 3)}
    assert _count(_abstract(name, **kwargs)) == PUBLISHED[name]


def _unet_params(c_in, base, depth, classes):
    def conv(i, o, k=3, bias=False):
        return k * k * i * o + (o if bias else 0)

    n, c, skips = 0, c_in, []
    for i in range(depth):
        w = base * 2**i
        n += conv(c, w) + conv(w, w) + 4 * w
        c = w
        skips.append(w)
    w = base * 2**depth
    n += conv(c, w) + conv(w, w) + 4 * w
    c = w
    for i in reversed(range(depth)):
        w = base * 2**i
        n += conv(c, w, 2, bias=True) + conv(skips[i] + w, w) + conv(w, w) + 4 * w
        c = w
    return n + conv(c, classes, 1, bias=True)


@pytest.mark.parametrize(("c_in", "base", "depth", "classes"), [(1, 16, 2, 3), (3, 8, 3, 1), (4, 64, 4, 2)])
def test_unet_parameter_count_closed_form(c_in, base, depth, classes):
    model = _abstract("unet", base=base, depth=depth, num_classes=classes, in_shape=(32, 32, c_in))
    assert _count(model) == _unet_params(c_in, base, depth, classes)


def test_mobilenetv2_width_multiplier_counts():
    # torchvision mobilenet_v2(width_mult=...) at 1000 classes.
    assert _count(_abstract("mobilenetv2", width_mult=0.5)) == 1_968_680
    assert _count(_abstract("mobilenetv2", width_mult=1.4)) == 6_108_776


@pytest.mark.parametrize("name", FAMILIES)
def test_width_layers_name_every_conv_and_spare_the_output_layer(name):
    model = _abstract(name)
    cls = type(model)
    params = _params(model)
    assert cls.widths_arg == "widths"
    assert len(model.widths) == len(model.width_layers)
    for path, width in zip(model.width_layers, model.widths, strict=True):
        assert params[f"{path}/kernel"][-1] == width, path
    kernels = {p.removesuffix("/kernel") for p in params if p.endswith("/kernel")}
    assert f"{cls.output_layer}/kernel" in params
    assert cls.output_layer not in model.width_layers
    assert kernels == {*model.width_layers, cls.output_layer}
    assert models.name_of(model) == name


@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "out"),
    [
        ("vgg16", {"in_shape": (28, 28, 1)}, (3, 28, 28, 1), (3, 10)),
        ("vgg19", {"in_shape": (16, 16, 3), "num_classes": 100}, (1, 16, 16, 3), (1, 100)),
        ("resnet32", {"in_shape": (28, 28, 1)}, (2, 28, 28, 1), (2, 10)),
        ("resnet18", {}, (2, 224, 224, 3), (2, 1000)),
        ("resnet50", {"num_classes": 10, "in_shape": (28, 28, 1)}, (2, 28, 28, 1), (2, 10)),
        ("mobilenetv2", {"in_shape": (7, 9, 1)}, (2, 7, 9, 1), (2, 1000)),
        ("unet", {}, (2, 128, 128, 3), (2, 128, 128, 2)),
        ("unet", {"depth": 2, "base": 16, "in_shape": (28, 28, 1), "num_classes": 5}, (2, 28, 28, 1), (2, 28, 28, 5)),
    ],
)
def test_output_shapes(name, kwargs, shape, out):
    assert _out_shape(_abstract(name, **kwargs), shape) == out


@pytest.mark.parametrize(
    ("name", "kwargs", "shape", "out"),
    [
        ("resnet18", {}, (2, 64, 64, 3), (2, 1000)),
        ("resnet20", {"in_shape": (28, 28, 1)}, (2, 28, 28, 1), (2, 10)),
        ("vgg11", {"in_shape": (28, 28, 1)}, (2, 28, 28, 1), (2, 10)),
        ("mobilenetv2", {"width_mult": 0.35, "small_input": True, "num_classes": 10}, (2, 32, 32, 3), (2, 10)),
        ("unet", {"base": 8, "depth": 2, "in_shape": (32, 32, 1), "num_classes": 3}, (2, 32, 32, 1), (2, 32, 32, 3)),
    ],
)
def test_forward_under_jit_and_batchnorm_modes(name, kwargs, shape, out):
    model = _concrete(_abstract(name, **kwargs))
    x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
    before = dict(nnx.to_flat_state(nnx.state(model, nnx.BatchStat)))

    def run(model):
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, x):
            m = nnx.merge(graphdef, state)
            return m(x), nnx.state(m, nnx.BatchStat)

        y, stats = forward(state, x)
        return y, dict(nnx.to_flat_state(stats))

    y_train, trained = run(model)  # models are built in training mode
    model.eval()
    y_eval, evaluated = run(model)

    assert y_train.shape == y_eval.shape == out
    assert bool(jnp.all(jnp.isfinite(y_train))) and bool(jnp.all(jnp.isfinite(y_eval)))
    assert not np.allclose(y_train, y_eval, atol=1e-3)
    # Training mode updates every running statistic; eval mode leaves them alone.
    for path, stat in before.items():
        assert not np.allclose(trained[path][...], stat[...]), path
        np.testing.assert_array_equal(evaluated[path][...], stat[...])


@pytest.mark.parametrize("name", FAMILIES)
def test_rebuilds_slimmer_from_widths_and_json_config(name):
    model = _abstract(name)
    small = _halved(model.widths)
    config = json.loads(json.dumps({**model.config, model.widths_arg: small}))
    slim = _abstract(models.name_of(model), **config)
    assert slim.widths == small
    assert slim.config == {**model.config, "widths": small}
    assert _count(slim) < _count(model)
    params = _params(slim)
    for path, width in zip(slim.width_layers, small, strict=True):
        assert params[f"{path}/kernel"][-1] == width
    classes = model.config["num_classes"]
    out = (1, 32, 32, classes) if name == "unet" else (1, classes)
    assert _out_shape(slim, (1, 32, 32, model.config["in_shape"][2])) == out


@pytest.mark.parametrize(
    ("name", "path"),
    [("resnet20", "stage2/block1/conv1"), ("resnet50", "stage3/block2/conv2"), ("mobilenetv2", "block5/expand/conv")],
)
def test_free_widths_change_alone(name, path):
    # Convs whose outputs are not summed into a residual stream prune independently.
    model = _abstract(name)
    widths = list(model.widths)
    i = model.width_layers.index(path)
    widths[i] = 3
    if name == "mobilenetv2":  # the depthwise conv after it follows its width
        widths[i + 1] = 3
    slim = _abstract(name, widths=widths)
    assert _params(slim)[f"{path}/kernel"][-1] == 3
    assert _count(slim) < _count(model)
    assert _out_shape(slim, (1, 32, 32, 3)) == (1, model.config["num_classes"])


def _with(model, **changes):
    widths = list(model.widths)
    for path, w in changes.items():
        widths[model.width_layers.index(path.replace("__", "/"))] = w
    return widths


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("resnet20", {"stage2__block1__conv2": 20}, "stage2/block1/conv2"),
        ("resnet20", {"stem__conv": 8}, "stage1/block0/conv2"),
        ("resnet50", {"stage1__block0__shortcut__conv": 100}, "stage1/block0/conv3"),
        ("mobilenetv2", {"block3__expand__conv": 100}, "block3/depthwise/conv"),
        ("mobilenetv2", {"block2__project__conv": 20}, "block2/project/conv"),
    ],
)
def test_widths_that_break_a_sum_or_a_depthwise_conv_raise(name, change, message):
    model = _abstract(name)
    with pytest.raises(UserError, match=message):
        models.get(name, widths=_with(model, **change))


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("resnet18", {"widths": (64,) * 5}, "needs 20 widths"),
        ("vgg16", {"widths": (64, 0) + (8,) * 11}, ">= 1"),
        ("vgg11", {"in_shape": (8, 8, 3)}, "H, W >= 16"),
        ("mobilenetv2", {"width_mult": 0.5, "widths": (8,) * 52}, "not both"),
        ("unet", {"base": 8, "widths": (8,) * 22}, "not both"),
        ("unet", {"depth": 3, "in_shape": (28, 28, 1)}, "multiples of 8"),
        ("resnet19", {}, "unknown model 'resnet19'.*resnet20"),
    ],
)
def test_bad_arguments_raise_user_error(name, kwargs, message):
    with pytest.raises(UserError, match=message):
        models.get(name, **kwargs)


def test_unet_rejects_input_sizes_it_cannot_skip_connect():
    model = _abstract("unet", base=4, depth=2, in_shape=(32, 32, 1))
    with pytest.raises(UserError, match="multiples of 4"):
        _out_shape(model, (1, 30, 32, 1))


@pytest.mark.parametrize("hw", [(8, 8), (7, 10), (1, 3)])
def test_max_pool_3x3_s2_matches_reduce_window(hw):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, *hw, 3)), jnp.float32)
    got = jax.jit(max_pool_3x3_s2)(x)
    want = nnx.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    assert got.shape == (2, (hw[0] + 1) // 2, (hw[1] + 1) // 2, 3)
    np.testing.assert_array_equal(got, want)
