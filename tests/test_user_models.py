"""A user's own NNX models, not in the zoo: discover, ADMM, hard prune, collapse, save, load, export.

The models live in ``user_models.py`` (a module of the user's, importable by
``python -m admmprune.export --like user_models:build_gpt``).
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import user_models
from flax import nnx

import admmprune as ap
from admmprune import export
from admmprune._errors import UserError
from admmprune.runtime.checkpoint import load_model, save_model
from admmprune.structure.collapse import collapse, masked
from admmprune.structure.discovery import discover_nnx

HERE = os.path.dirname(os.path.abspath(__file__))


def admm_prune(model, found, loss, keep, steps=20):
    """A few ADMM steps at ``keep``, then the hard prune: the user's own loop, as in the README."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.chain(ap.admm(found.specs, rho=1e-2, interval=5), optax.sgd(0.05, momentum=0.9))
    state = ap.set_stage(tx.init(params), keep_ratio=keep)

    @jax.jit
    def step(params, state):
        grads = jax.grad(lambda p: loss(nnx.merge(graphdef, p, rest)))(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    params, masks = ap.hard_prune(params, found.specs, keep, support=ap.find_state(state).support)
    nnx.update(model, params)
    return masks


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(a))


def run_exported(tmp_path, artifact, x):
    """Calls the artifact on ``x`` in a fresh interpreter that has neither admmprune nor flax imported."""
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, jax\n"
        f"f = jax.export.deserialize(open({str(artifact)!r}, 'rb').read())\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, np.asarray(f.call(np.load({str(tmp_path / 'x.npy')!r}))))\n"
        "assert not any(m.split('.')[0] in ('admmprune', 'flax') for m in sys.modules), 'imported admmprune/flax'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    return np.load(tmp_path / "y.npy")


def test_a_users_gpt_loses_heads_and_neurons_and_round_trips_through_save_load_and_export(
    tmp_path, monkeypatch, capsys
):
    model = user_models.build_gpt()
    model.eval()  # dropout off for tracing, training and the checks
    tokens = jax.random.randint(jax.random.key(0), (4, 8), 0, 32)
    found = discover_nnx(model, tokens)
    assert {"blocks/0/attn/query", "blocks/0/up"} <= set(found.groups)
    assert "embed/embedding" in found.unprunable  # the residual stream: RMSNorm averages over it

    def loss(m):  # next-token prediction of a fixed sequence
        logits = m(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

    masks = admm_prune(model, found, loss, keep=0.5)
    small = collapse(model, masks, found, check=(tokens,))
    reference = masked(model, masks, found)(tokens)
    attn, up = small.blocks[0].attn, small.blocks[0].up
    assert (attn.num_heads, attn.query.kernel.shape, up.out_features) == (2, (16, 2, 4), 16)

    save_model(tmp_path / "small", small)
    with pytest.raises(UserError, match=r"not admmprune's \(user_models.GPT\).*like="):
        load_model(tmp_path / "small")
    with pytest.raises(UserError, match="does not fit|has no array"):
        load_model(tmp_path / "small", like=user_models.build_cnn)
    loaded = load_model(tmp_path / "small", like=user_models.build_gpt)  # the dense constructor
    assert loaded.blocks[1].attn.num_heads == small.blocks[1].attn.num_heads
    np.testing.assert_array_equal(loaded(tokens, deterministic=True), small(tokens, deterministic=True))
    # Its dropout's random keys came back as keys: it still trains.
    loaded.train()
    assert loaded(tokens).shape == (4, 8, 32)

    monkeypatch.syspath_prepend(HERE)
    out = tmp_path / "gpt.jax"
    common = [str(tmp_path / "small"), "--output", str(out), "--like", "user_models:build_gpt"]
    # Without --call the export calls model(x), which this model takes; without the shape it cannot guess.
    assert export.main(common) == 2
    assert "cannot tell the input shape of GPT; pass --input-shape" in capsys.readouterr().err
    assert export.main([*common, "--input-shape", "8"]) == 2  # float inputs to an embedding
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--input-dtype" in err[0] and "--call" in err[0], err
    args = [*common, "--input-shape", "8", "--input-dtype", "int32", "--call", "user_models:call_gpt"]
    assert export.main(args) == 0 and not os.path.exists(f"{out}.tmp-{os.getpid()}")
    y = run_exported(tmp_path, out, np.asarray(tokens, np.int32))
    assert relative_error(reference, y) < 1e-5


def test_a_users_cnn_with_batchnorm_exports_from_the_command_line(tmp_path, monkeypatch, capsys):
    model = user_models.build_cnn()
    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 1))
    model(x)  # train mode: BatchNorm statistics move off their initial values
    model.eval()
    found = discover_nnx(model, x)
    assert "conv1" in found.groups  # conv1 and conv2 merge through the residual

    def loss(m):
        return jnp.mean((m(x) - 1.0) ** 2)

    masks = admm_prune(model, found, loss, keep=0.5)
    small = collapse(model, masks, found, check=(x,))
    assert small.conv1.out_features == small.bn2.num_features == small.fc.in_features == 4
    save_model(tmp_path / "small", small)
    monkeypatch.syspath_prepend(HERE)
    out = tmp_path / "cnn.jax"
    for bad, message in {
        "user_models": "--like takes MODULE:FUNCTION",
        "no_such_module:f": "--like: cannot import no_such_module (ModuleNotFoundError",
        "user_models:nothing": "--like: user_models has no nothing",
        "user_models:jnp": "user_models:jnp is a module, not a function",
    }.items():
        assert export.main([str(tmp_path / "small"), "--output", str(out), "--like", bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (bad, err)
    args = [str(tmp_path / "small"), "--output", str(out), "--like", "user_models:build_cnn", "--input-shape", "8,8,1"]
    assert export.main(args) == 0 and not os.path.exists(f"{out}.tmp-{os.getpid()}")
    y = run_exported(tmp_path, out, np.asarray(x, np.float32))
    assert relative_error(masked(model, masks, found)(x), y) < 1e-5


def test_save_model_takes_nnx_modules_only(tmp_path):
    with pytest.raises(UserError, match="saves NNX modules, not dict"):
        save_model(tmp_path / "m", {"params": {"w": np.zeros(3)}})
    assert not os.path.exists(tmp_path / "m")


def test_every_other_layer_kind_round_trips_through_prune_collapse_save_load_and_export(tmp_path):
    model = user_models.build_layers()
    x = jax.random.normal(jax.random.key(2), (4, 8, 8, 1))
    found = discover_nnx(model, x)
    # conv and the transposed conv (through the per-channel GroupNorm), LinearGeneral's outer axis only,
    # and each Einsum and dense layer's outputs.
    assert {n: g.channels for n, g in found.groups.items()} == {
        "conv": 6,
        "up": 6,
        "split": 3,
        "merge": 5,
        "e1": 8,
        "e2": 7,
    }

    def loss(m):
        return jnp.mean((m(x) - 1.0) ** 2)

    masks = admm_prune(model, found, loss, keep=0.5)
    small = collapse(model, masks, found, check=(x,))
    assert (small.up.out_features, small.norm.num_groups, small.split.out_features) == (3, 3, (2, 4))
    assert small.e1.kernel_shape == (3, 4) and small.e2.kernel_shape == (4, 4)
    save_model(tmp_path / "small", small)
    loaded = load_model(tmp_path / "small", like=user_models.build_layers)
    np.testing.assert_array_equal(loaded(x), small(x))
    out = tmp_path / "layers.jax"
    out.write_bytes(export.export_forward(loaded, (8, 8, 1)))
    assert relative_error(masked(model, masks, found)(x), run_exported(tmp_path, out, np.asarray(x))) < 1e-5
