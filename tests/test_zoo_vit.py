"""The zoo's Vision Transformer: discovered, hard pruned, collapsed, saved, loaded, exported, and run by the pipeline.

Small models (8x8 inputs, width 16) keep the library-level tests fast; the
pipeline test runs the registered default ViT on a slice of Fashion-MNIST.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_collapse import abstract_random

import admmprune as ap
from admmprune import models
from admmprune._errors import UserError
from admmprune.app import pipeline
from admmprune.configs import smoke
from admmprune.models.vit import ViT
from admmprune.runtime.checkpoint import save_model
from admmprune.runtime.export import export_forward
from admmprune.structure.collapse import collapse, masked
from admmprune.structure.discovery import discover_nnx

SMALL = {"patch": 4, "dim": 16, "depth": 2, "heads": 4, "mlp": 12, "num_classes": 3, "in_shape": (8, 8, 1)}


def small_vit(seed=0):
    """A small ViT in evaluation mode, built abstractly (initializing for real is slow on CPU)
    and filled with random numbers: non-zero biases, offsets and class token, as after training."""
    model = abstract_random(lambda: ViT(**SMALL, rngs=nnx.Rngs(seed)), seed)
    model.eval()
    return model


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(a))


@pytest.fixture(scope="module")
def pruned():
    """A small ViT, its discovery, its masks at keep 0.5 and its collapsed model."""
    model = small_vit()
    x = jax.random.normal(jax.random.key(0), (3, 8, 8, 1))
    found = discover_nnx(model, x)
    params, masks = ap.hard_prune(nnx.state(model, nnx.Param), found.specs, 0.5)
    nnx.update(model, params)
    small = collapse(model, masks, found, check=(x,))
    return model, x, found, masks, small


def test_discovery_finds_each_blocks_heads_and_mlp_neurons_and_keeps_the_residual_stream(pruned):
    _, _, found, _, _ = pruned
    depth, heads, mlp = SMALL["depth"], SMALL["heads"], SMALL["mlp"]
    expected = {f"blocks/{i}/attn/query": heads for i in range(depth)}
    expected |= {f"blocks/{i}/fc1": mlp for i in range(depth)}
    assert {n: g.channels for n, g in found.groups.items()} == expected
    for i in range(depth):
        attn = f"blocks/{i}/attn"
        members = {path for path, _ in found.groups[f"{attn}/query"].members}
        # A head is its query, key and value columns and the output projection's rows, together.
        assert members == {f"{attn}/{p}/{v}" for p in ("query", "key", "value") for v in ("kernel", "bias")} | {
            f"{attn}/out/kernel"
        }
        assert {path for path, _ in found.groups[f"blocks/{i}/fc1"].members} == {
            f"blocks/{i}/fc1/kernel",
            f"blocks/{i}/fc1/bias",
            f"blocks/{i}/fc2/kernel",
        }
    # The residual stream (embedding, class token, positions, every block's outputs)
    # is not pruned: each LayerNorm averages over it.
    assert "embed" not in found.groups and "sums over the channels" in " ".join(found.unprunable["embed"])
    assert "LayerNorm" in " ".join(found.unprunable["embed"])
    assert "head" in found.unprunable and not found.notes


def test_hard_pruned_vit_collapses_to_half_the_heads_and_mlp_exactly(pruned):
    model, x, found, masks, small = pruned
    assert isinstance(small, ViT) and small is not model
    assert relative_error(masked(model, masks, found)(x), small(x)) < 1e-5
    depth = SMALL["depth"]
    assert small.widths == (2,) * depth + (6,) * depth
    assert model.widths == (4,) * depth + (12,) * depth  # the input is untouched
    for block in small.blocks:
        assert (block.attn.num_heads, block.attn.qkv_features, block.attn.head_dim) == (2, 8, 4)
        assert block.attn.query.kernel.shape == (16, 2, 4) and block.attn.out.kernel.shape == (2, 4, 16)
        assert (block.fc1.out_features, block.fc2.in_features) == (6, 6)
    assert small.config == model.config  # the dense arguments: load_model rebuilds from them
    params = lambda m: sum(np.size(p) for p in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert params(small) < params(model)
    np.testing.assert_allclose(jax.jit(lambda m, x: m(x))(small, x), small(x), rtol=1e-5, atol=1e-6)


def test_collapsed_vit_round_trips_through_save_load_and_export(pruned, tmp_path):
    _, x, _, _, small = pruned
    save_model(tmp_path / "small", small)
    loaded = ap.load(tmp_path / "small")  # registered: no like= needed
    assert isinstance(loaded, ViT) and loaded.widths == small.widths and loaded.config == small.config
    np.testing.assert_array_equal(loaded(x), small(x))
    forward = jax.export.deserialize(export_forward(small))  # the input shape comes from config["in_shape"]
    np.testing.assert_allclose(forward.call(np.asarray(x, np.float32)), small(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"dim": 30, "heads": 4}, r"dim must be divisible by heads .* dim=30, heads=4"),
        ({"patch": 5}, r"patch 5 must divide the image's height and width, got in_shape=\(28, 28, 1\)"),
        ({"patch": 0}, r"sizes must be integers >= 1, got patch=0"),
        ({"heads": -2, "mlp": 0}, r"sizes must be integers >= 1, got heads=-2, mlp=0"),
        ({"dim": 2.5}, r"sizes must be integers >= 1, got dim=2.5"),
        ({"depth": True}, r"sizes must be integers >= 1, got depth=True"),
        ({"in_shape": (28, 28)}, r"in_shape must be \(H, W, C\) with positive sizes, got \(28, 28\)"),
    ],
)
def test_bad_arguments_are_user_errors(kwargs, message):
    with pytest.raises(UserError, match=message):
        ViT(**kwargs, rngs=nnx.Rngs(0))


def test_config_is_json_and_rebuilds_the_model():
    model = nnx.eval_shape(lambda: models.get("vit", **{**SMALL, "in_shape": [8, 8, 1]}))
    assert model.config == SMALL and models.name_of(model) == "vit" and model.output_layer == "head"
    config = models.check_config("vit", json.loads(json.dumps(model.config)))
    rebuilt = nnx.eval_shape(lambda: models.get("vit", **config))
    assert rebuilt.config == SMALL and rebuilt.widths == model.widths == (4, 4, 12, 12)


def test_the_pipeline_prunes_and_collapses_a_vit_on_fashion_mnist(tmp_path, data_dir):
    config = smoke.get_config()
    config.model.name, config.data.name, config.data.data_dir = "vit", "fashion_mnist", data_dir
    config.prune.ratio = 0.5  # one ADMM stage
    config.data.limit, config.data.eval_limit, config.data.batch_size = 128, 128, 32
    config.dense.epochs, config.retrain.epochs = 1, 0  # the collapse follows the hard prune
    config.measure.batch_size, config.measure.repeats = 16, 2
    workdir = str(tmp_path / "run")
    lines = []
    with jax.numpy_dtype_promotion("standard"):  # optax's cosine schedule mixes float and int32
        report = pipeline.run(config, workdir, log=lines.append)
    assert report["model"] == "vit" and report["dataset"] == "fashion_mnist"
    assert [s["ratio"] for s in report["stages"]] == [0.5]
    assert set(report["layers"]) == {f"blocks/{i}/{g}" for i in range(4) for g in ("attn/query", "fc1")}
    assert all(layer["kept"] == layer["total"] // 2 for layer in report["layers"].values())
    collapsed = report["collapsed"]
    assert 0.0 <= collapsed["accuracy"] <= 1.0 and collapsed["max_abs_diff"] < 1e-4
    assert collapsed["params"] < report["dense"]["params"] == 139_018
    assert any(line.startswith("done: accuracy") for line in lines)
    small = ap.load(os.path.join(workdir, "model"))
    assert isinstance(small, ViT) and small.widths == (2, 2, 2, 2, 64, 64, 64, 64)
    assert sum(np.size(p) for p in jax.tree.leaves(nnx.state(small, nnx.Param))) == collapsed["params"]
    assert small(jnp.zeros((2, 28, 28, 1))).shape == (2, 10)
