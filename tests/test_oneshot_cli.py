"""``python -m admmprune.oneshot`` on a pipeline's dense model: end to end, and its errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from _cli import ROOT, snapshot
from flax import nnx

import admmprune
from admmprune import oneshot
from admmprune.app import cli, pipeline


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, data_dir):
    """The smoke config's dense model (2 epochs on 1,024 MNIST images)."""
    config = cli.load_config("smoke")
    config.data.data_dir = data_dir
    path = str(tmp_path_factory.mktemp("oneshot") / "run")
    with jax.numpy_dtype_promotion("standard"):  # optax's cosine schedule mixes float and int32
        pipeline.run(config, path, stop_after="dense", log=lambda _: None)
    return path


def test_prunes_a_workdirs_dense_model_and_writes_report_model_and_export(workdir, capsys):
    assert oneshot.main([workdir, "--sparsity", "0.6", "--calibration", "96", "--batch-size", "64"]) == 0
    out = os.path.join(workdir, "oneshot-admm-0.6")
    assert "admm at 0.6: accuracy" in capsys.readouterr().out
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert report["calibration"] == {"dataset": "mnist", "split": "train[:1024]", "samples": 96, "seed": 0}
    assert report["eval_split"] == "test[:512]"
    assert set(report["layers"]) == {"conv1/kernel", "conv2/kernel", "fc1/kernel"}  # fc2, the output, stays
    assert all(layer["rows"] > 0 and 0 <= layer["error"] < 1 for layer in report["layers"].values())
    assert report["pruned"]["accuracy"] > 0.5  # the smoke model is weak; pruning must not wreck it
    model = admmprune.load(os.path.join(out, "model"))
    params = nnx.state(model, nnx.Param)
    for layer in ("conv1", "conv2", "fc1"):
        assert float(np.mean(params[layer]["kernel"].get_value() != 0)) == pytest.approx(0.4, abs=2e-3)
    assert np.all(params["fc2"]["kernel"].get_value() != 0)
    # The export runs in plain JAX and computes the saved model.
    with open(os.path.join(out, "model.jax"), "rb") as f:
        forward = jax.export.deserialize(f.read())
    x = jax.random.normal(jax.random.key(0), (3, 28, 28, 1))
    model.eval()
    np.testing.assert_allclose(forward.call(x), model(x), rtol=1e-5, atol=1e-5)

    # Run again: the output exists, and is left as it was.
    before = snapshot(out)
    assert oneshot.main([workdir, "--sparsity", "0.6", "--calibration", "96"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists; pass --overwrite" in err
    assert snapshot(out) == before


def test_n_of_m_leaves_layers_with_too_few_inputs_dense(workdir, tmp_path, capsys):
    out = str(tmp_path / "nm")
    args = [workdir, "--sparsity", "2:4", "--method", "sparsegpt", "--calibration", "64", "--output", out]
    assert oneshot.main(args) == 0
    assert "conv1/kernel stays dense" in capsys.readouterr().out
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert "conv1/kernel" in report["skipped"] and "conv1/kernel" not in report["layers"]
    kernel = nnx.state(admmprune.load(os.path.join(out, "model")), nnx.Param)["conv2"]["kernel"].get_value()
    per_block = (kernel.reshape(5, 5, 5, 4, 50) != 0).sum(axis=3)  # conv2's 20 inputs, in blocks of 4
    assert per_block.max() <= 2


def test_bad_input_is_one_line_and_exit_2(workdir, tmp_path, capsys):
    model_dir = str(tmp_path / "bare" / "model")  # a saved model outside any workdir
    shutil.copytree(os.path.join(workdir, "dense"), model_dir)
    cases = {
        "fraction removed must be between 0 and 1": [workdir, "--sparsity", "1.5"],
        "N:M needs 0 < N < M": [workdir, "--sparsity", "4:2"],
        "takes a fraction removed like 0.7 or N:M": [workdir, "--sparsity", "most"],
        "unknown method 'obs'": [workdir, "--sparsity", "0.5", "--method", "obs"],
        "no such model directory": [str(tmp_path / "nowhere"), "--sparsity", "0.5"],
        "pass --dataset": [model_dir, "--sparsity", "0.5", "--output", str(tmp_path / "o1")],
        "more than the 1024 examples": [workdir, "--sparsity", "0.5", "--calibration", "5000"],
        "does not take fashion_mnist": [workdir, "--sparsity", "0.5", "--dataset", "cifar10"],
    }
    for expected, args in cases.items():
        code = oneshot.main(args)
        err = capsys.readouterr().err
        if expected.startswith("does not take"):
            expected = "cifar10"  # not prepared offline: the data error names it
        assert code == 2, (expected, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, (expected, err)
    assert not os.path.exists(tmp_path / "o1")


def test_module_runs_as_a_command(workdir):
    out = subprocess.run(
        [sys.executable, "-m", "admmprune.oneshot", "--help"], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert out.returncode == 0 and "--sparsity" in out.stdout and "sparsegpt" in out.stdout
