"""Every prune.sparsity through the pipeline: the saved masked model is in its set.

The runs share one dense model (dense.init) and train one short stage, so
that each kind costs a few seconds; the channel default is left to
test_pipeline.py, whose report must not change.
"""

import json
import os

import jax
import numpy as np
import pytest
from _cli import SMOKE, eval_slice_accuracy
from flax import nnx

import admmprune
from admmprune import pipeline, train
from admmprune.configs import default as default_config
from admmprune.core.projections import num_kept, to_groups
from admmprune.core.sparsity import Block, Column, NofM, is_spec
from admmprune.structure import graph

KERNELS = ("conv1/kernel", "conv2/kernel", "fc1/kernel")
# Short runs: the eval slice in one batch, checkpoints only at the ends of phases.
FAST = ("--config.dense.epochs=1", "--config.checkpoint_every=1000", "--config.data.eval_batch_size=512")


def _run(workdir, *args, capsys):
    """``python -m admmprune.train`` in this process (a subprocess would import jax again)."""
    with jax.numpy_dtype_promotion("standard"):  # optax's cosine schedule mixes float and int32
        code = train.main(["--config", SMOKE, "--workdir", str(workdir), *FAST, *args])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    with open(os.path.join(workdir, "report.json")) as f:
        return json.load(f), out


@pytest.fixture(scope="module")
def dense(tmp_path_factory, data_dir):
    """The dense model every run starts from."""
    config = train.load_config(SMOKE)
    for flag in FAST:
        train.apply_override(config, *flag.removeprefix("--config.").split("="))
    config.data.data_dir = data_dir
    # Any trained LeNet-5 will do: a rate this 1,024-image slice trains at in one epoch.
    config.dense.learning_rate, config.dense.warmup = 0.01, 0.0
    workdir = str(tmp_path_factory.mktemp("dense") / "run")
    with jax.numpy_dtype_promotion("standard"):
        pipeline.run(config, workdir, log=lambda line: None, stop_after="dense")
    return os.path.join(workdir, "dense")


def _kernels(workdir):
    model = admmprune.load(os.path.join(workdir, "model"))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    flat = {admmprune.path_str(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    return model, flat


def _check_report(report, params, model, data_dir):
    """The report's counts are the saved weights' and its accuracy is the saved model's."""
    assert set(report["layers"]) == set(KERNELS)  # fc2 (the output layer), biases: not pruned
    for name in KERNELS:
        w = params[name]
        assert report["layers"][name] == {"nonzero": int(np.count_nonzero(w)), "total": w.size}, name
    kernels = report["nonzero"]["kernels"]
    assert kernels["nonzero"] == sum(int(np.count_nonzero(params[k])) for k in KERNELS)
    assert kernels["total"] == 425_500 and kernels["compression"] == kernels["total"] / kernels["nonzero"]
    everything = report["nonzero"]["all"]
    assert everything["nonzero"] == sum(int(np.count_nonzero(w)) for w in params.values())
    assert everything["total"] == report["dense"]["params"] == 431_080
    assert report["pruned"]["nonzero"] == everything["nonzero"]
    assert "collapsed" not in report and "speedup" not in report
    assert report["pruned"]["accuracy"] == report["retrain"]["accuracy"]
    assert eval_slice_accuracy(model, data_dir) == pytest.approx(report["pruned"]["accuracy"], abs=1e-6)


def test_unstructured_admm_global_keeps_the_fraction_of_all_kernel_weights(dense, tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    args = ("--sparsity", "unstructured", "--config.prune.scope=global", "--stages", "0.9")
    # No retraining: the column run retrains with the masks fixed.
    args += ("--config.retrain.epochs=0", f"--config.dense.init={dense}")
    report, out = _run(workdir, *args, f"--config.data.data_dir={data_dir}", capsys=capsys)
    model, params = _kernels(workdir)
    _check_report(report, params, model, data_dir)
    assert report["sparsity"] == {"kind": "unstructured", "scope": "global"}
    # One set over the three kernels: 10% of their 425,500 weights survive, not 10% of each.
    assert report["nonzero"]["kernels"]["nonzero"] == 42_550
    assert len({report["layers"][k]["nonzero"] / report["layers"][k]["total"] for k in KERNELS}) > 1
    assert np.count_nonzero(params["fc2/kernel"]) == 5_000 and np.count_nonzero(params["conv1/bias"]) == 20
    assert "sparsity unstructured (global), ratio 0.9, stages 0.9; pruned kernels conv1/kernel (500)" in out
    assert "42,550 of 425,500 weights of the pruned kernels non-zero (10.0x fewer)" in out
    with open(os.path.join(workdir, "plan.txt")) as f:
        assert "Unstructured(group='kernels')" in f.read()


def test_n_of_m_admm_keeps_at_most_n_in_every_m_input_weights(dense, tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    args = ("--sparsity", "nm", "--config.retrain.epochs=0", f"--config.dense.init={dense}")
    report, out = _run(workdir, *args, f"--config.data.data_dir={data_dir}", capsys=capsys)
    model, params = _kernels(workdir)
    _check_report(report, params, model, data_dir)
    # The set is fixed: one stage, reported as ratio 1 - n/m, whatever prune.ratio says.
    assert report["sparsity"] == {"kind": "nm", "n": 2, "m": 4}
    assert report["ratio"] == 0.5 and [s["ratio"] for s in report["stages"]] == [0.5]
    for name in KERNELS:
        w = np.moveaxis(params[name], -2, -1)  # the input axis last, cut into blocks of 4
        w = np.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, -w.shape[-1] % 4)])
        assert np.count_nonzero(w.reshape(*w.shape[:-1], -1, 4), axis=-1).max() <= 2, name
    # conv1 reads one channel (a block of 1 keeps it); conv2 (20) and fc1 (800) keep exactly half.
    assert report["layers"]["conv1/kernel"]["nonzero"] == 500
    assert (
        report["layers"]["conv2/kernel"]["nonzero"] == 12_500 and report["layers"]["fc1/kernel"]["nonzero"] == 200_000
    )
    assert "sparsity 2:4, ratio 0.5, stages 0.5;" in out


def test_column_magnitude_removes_the_fraction_of_every_kernels_columns(dense, tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    args = ("--sparsity", "column", "--method", "magnitude", "--ratio", "0.75", f"--config.dense.init={dense}")
    report, _ = _run(workdir, *args, f"--config.data.data_dir={data_dir}", capsys=capsys)
    model, params = _kernels(workdir)
    _check_report(report, params, model, data_dir)
    assert report["sparsity"] == {"kind": "column", "scope": "layer"}
    for name in KERNELS:
        columns = np.asarray(to_groups(params[name], Column()))
        alive = np.any(columns != 0, axis=1)
        assert alive.sum() == int(num_kept(len(alive), 0.25)), name
        assert np.all(columns[alive] != 0)  # a kept column keeps all its weights


def test_block_iterative_magnitude_keeps_whole_blocks(dense, tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    args = ("--sparsity", "block", "--method", "magnitude", "--config.magnitude.iterative=true", "--ratio", "0.75")
    block = ("--config.prune.block=(2,4)", "--config.retrain.epochs=0")
    report, _ = _run(
        workdir, *args, *block, f"--config.dense.init={dense}", f"--config.data.data_dir={data_dir}", capsys=capsys
    )
    model, params = _kernels(workdir)
    _check_report(report, params, model, data_dir)
    assert report["sparsity"] == {"kind": "block", "block": [2, 4], "scope": "layer"}
    assert [s["ratio"] for s in report["stages"]] == [0.5, 0.75]
    for name in KERNELS:
        blocks = np.asarray(to_groups(params[name], Block((2, 4))))
        alive = np.any(blocks != 0, axis=1)
        assert alive.sum() == int(num_kept(len(alive), 0.25)), name
        first = report["stages"][0]["layers"][name]
        assert first["nonzero"] > report["layers"][name]["nonzero"]  # the second stage removed more


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sparsity", "diagonal"], "prune.sparsity must be one of channel, unstructured, nm, column, block"),
        (["--sparsity", "unstructured", "--method", "l1_mask"], "method l1_mask prunes channels only"),
        (["--sparsity", "nm", "--method", "slimming"], "method slimming prunes channels only"),
        (["--sparsity", "column", "--method", "relaxation"], "method relaxation prunes channels only"),
        (["--sparsity", "block", "--method", "group_lasso"], "use --method admm or magnitude"),
        (
            ["--sparsity", "column", "--method", "magnitude", "--config.prune.criterion=fpgm"],
            "prune.criterion must be l2, not fpgm",
        ),
        (["--sparsity", "unstructured", "--config.prune.budget=macs"], "--sparsity unstructured needs prune.budget"),
        (["--sparsity", "block", "--config.prune.round_to=8"], "--sparsity block needs prune.round_to=1"),
        (["--sparsity", "nm", "--config.prune.n=4"], "prune.n must be below prune.m"),
        (["--sparsity", "nm", "--stages", "0.5,0.9"], "prune.stages does not apply to --sparsity nm"),
        (["--sparsity", "block", "--config.prune.block=(0,4)"], "prune.block must be one or two positive integers"),
    ],
)
def test_what_a_sparsity_cannot_do_is_refused_before_the_workdir(args, message, capsys, tmp_path):
    workdir = tmp_path / "w"
    code = train.main(["--config", SMOKE, *args, "--workdir", str(workdir)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not workdir.exists()


def test_the_default_run_is_channel_pruning_as_before():
    config = default_config.get_config()
    s = pipeline.settings(config)
    assert s.sparsity == "channel" and s.kernel_spec is None and s.stages == (0.5, 0.75, 0.9)
    # A channel run records no sparsity field: workdirs of runs from before these fields still match.
    older = default_config.get_config()
    for key in ("sparsity", "n", "m", "block"):
        del older.prune[key]
    # Later fields, at their neutral defaults, stay out of the record too.
    del older.admm["penalty"], older.retrain["distill"], older.retrain["temperature"]
    expected = json.loads(older.to_json_best_effort(sort_keys=True))
    for key in ("progress", "distributed"):  # runtime fields, not recorded
        del expected[key]
    assert s.comparable == expected
    assert train.cli.default_workdir(config) == os.path.join("runs", "lenet5-mnist-admm-0.9")
    config.prune.sparsity = "nm"
    assert train.cli.default_workdir(config) == os.path.join("runs", "lenet5-mnist-admm-2of4")
    config.prune.sparsity = "unstructured"
    assert pipeline.settings(config).comparable["prune"]["sparsity"] == "unstructured"
    assert train.cli.default_workdir(config) == os.path.join("runs", "lenet5-mnist-admm-unstructured-0.9")


def test_kernel_specs_are_the_kernels_channel_pruning_prunes():
    model = nnx.eval_shape(lambda: admmprune.models.get("lenet5"))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    specs = graph.kernel_specs(graph.chain_specs(params, model.chain), NofM(2, 4))
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]
    assert {admmprune.path_str(p): s for p, s in flat if s is not None} == dict.fromkeys(KERNELS, NofM(2, 4))
