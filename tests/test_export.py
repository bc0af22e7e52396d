"""Saving, loading and exporting models."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import admmprune
from admmprune import export, models
from admmprune._errors import UserError
from admmprune.runtime.checkpoint import save_model


@pytest.mark.parametrize("name,kwargs", [("lenet5", {"features": (3, 7, 30)}), ("resnet20", {"in_shape": (16, 16, 1)})])
def test_save_and_load_rebuild_the_same_model(tmp_path, name, kwargs):
    model = models.get(name, **kwargs)
    x = jax.random.normal(jax.random.key(0), (2, *export.input_shape(model)))
    if hasattr(model, "eval"):
        model.eval()
    save_model(tmp_path / "m", model)
    loaded = admmprune.load(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    loaded.eval()
    np.testing.assert_array_equal(loaded(x), model(x))


def test_save_refuses_a_nonempty_dir_and_load_a_missing_one(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "f").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        save_model(tmp_path / "x", models.get("mlp", hidden=(4,)))
    with pytest.raises(UserError, match="does not exist"):
        admmprune.load(tmp_path / "nope")


def test_export_runs_with_plain_jax(tmp_path):
    model = models.get("lenet5", features=(3, 7, 30))
    save_model(tmp_path / "m", model)
    out = tmp_path / "lenet.jax"
    assert export.main([str(tmp_path / "m"), "--output", str(out)]) == 0
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, 28, 28, 1)), np.float32)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, jax\n"
        f"f = jax.export.deserialize(open({str(out)!r}, 'rb').read())\n"
        f"y = f.call(np.load({str(tmp_path / 'x.npy')!r}))\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, np.asarray(y))\n"
        "assert not any(m.split('.')[0] in ('admmprune', 'flax') for m in sys.modules), 'imported admmprune/flax'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), model(jnp.asarray(x)), rtol=1e-5, atol=1e-5)
    assert export.main([str(tmp_path / "m"), "--output", str(out)]) == 2  # never overwrites


def test_export_cli_errors_are_one_line_and_help_lists_every_option(tmp_path, capsys):
    out = str(tmp_path / "m.jax")
    cases = {
        "the following arguments are required: --output": [str(tmp_path)],
        "the following arguments are required: model_dir, --output": [],
        "--input-shape must be integers like 28,28,1, got '28x28'": [
            str(tmp_path),
            "--output",
            out,
            "--input-shape",
            "28x28",
        ],
        "unrecognized arguments: --bogus": [str(tmp_path), "--output", out, "--bogus"],
        "unrecognized arguments: extra": [str(tmp_path), "extra", "--output", out],
    }
    for expected, args in cases.items():
        assert export.main(args) == 2, expected
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not os.path.exists(out)
    with pytest.raises(SystemExit) as e:
        export.main(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("model_dir", "--output FILE", "--input-shape SHAPE", "symbolic batch size"):
        assert flag in help_text, flag


def test_a_saved_gpt_exports_for_token_ids_without_being_told(tmp_path):
    model = models.get("gpt", dim=16, depth=1, heads=2, mlp=16, num_classes=11, in_shape=(8,))
    save_model(tmp_path / "m", model)
    out = tmp_path / "gpt.jax"
    assert export.main([str(tmp_path / "m"), "--output", str(out)]) == 0  # shape and dtype from the model
    forward = jax.export.deserialize(out.read_bytes())
    tokens = jax.random.randint(jax.random.key(0), (3, 8), 0, 11)
    assert forward.in_avals[0].dtype == jnp.int32
    np.testing.assert_allclose(forward.call(tokens), model(tokens), rtol=1e-5, atol=1e-5)
