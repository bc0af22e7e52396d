"""The other pruning methods through the real CLI, on the smoke config (issue 5)."""

import json
import os

import pytest
from _cli import SMOKE, cli, kill_after_checkpoint, strip_timing

from admmprune import methods, pipeline, train


def test_every_method_trains_for_the_same_epochs_after_the_dense_phase():
    config = train.load_config(SMOKE)
    stages = pipeline.check_config(config)
    budgets = {}
    for method in methods.METHODS:
        for iterative in (False, True):
            config.prune.method = method
            config.magnitude.iterative = iterative
            phases = pipeline.plan_phases(config, stages)
            assert phases[0].kind == "dense" and phases[-1].kind == "retrain"
            assert phases[-1].ratio == stages[-1]
            budgets[method, iterative] = sum(p.epochs for p in phases[1:])
    assert len(set(budgets.values())) == 1, budgets


# Layer-wise methods remove 0.9 of every group: LeNet-5 (20, 50, 500) -> (2, 5, 50).
LAYERWISE = {"conv1": {"kept": 2, "total": 20}, "conv2": {"kept": 5, "total": 50}, "fc1": {"kept": 50, "total": 500}}
CASES = [
    # Iterative, by LAMP scores ranked globally (one-shot takes the same prune path as the other methods).
    (
        "magnitude",
        ["--config.magnitude.iterative=True", "--config.prune.criterion=lamp", "--config.prune.scope=global"],
        None,
    ),
    ("l1_mask", [], LAYERWISE),
    ("slimming", [], LAYERWISE),  # LeNet-5 has no BatchNorm: gates stand in for its scales
    ("group_lasso", [], LAYERWISE),
    # A fast gate learning rate so that the smoke run's 48 steps close gates.
    ("relaxation", ["--config.relaxation.gate_learning_rate=0.1"], None),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """Runs a case once per module: ``finished(index) -> (workdir, report)``."""
    done = {}

    def get(index):
        if index not in done:
            method, args, _ = CASES[index]
            workdir = str(tmp_path_factory.mktemp(method) / "run")
            result = cli("--workdir", workdir, "--method", method, *args, data_dir=data_dir)
            assert result.returncode == 0, result.stderr[-3000:]
            assert "Traceback" not in result.stderr
            with open(os.path.join(workdir, "report.json")) as f:
                done[index] = workdir, json.load(f)
        return done[index]

    return get


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_method_runs_end_to_end_and_collapses(index, finished):
    method, args, layers = CASES[index]
    workdir, report = finished(index)
    assert report["method"] == method and report["ratio"] == 0.9
    assert report["dense"]["params"] == 431_080
    if layers is not None:
        assert report["layers"] == layers
    kept = [v["kept"] for v in report["layers"].values()]
    assert all(k >= 1 for k in kept) and sum(kept) < 570  # something was removed, no layer vanished
    assert 0 < report["params_removed"] < 1 and 0 < report["flops_removed"] < 1
    assert report["collapsed"]["max_abs_diff"] < 1e-4
    assert abs(report["collapsed"]["accuracy"] - report["retrain"]["accuracy"]) <= 1 / 512
    assert os.path.isdir(os.path.join(workdir, "model")) and os.path.isdir(os.path.join(workdir, "dense"))
    if method in methods.SPARSIFYING:
        sparsify = report["sparsify"]
        # The regularized training keeps a working model (the dense one reaches about 0.87 on this slice).
        assert sparsify["epochs"] == 3 and sparsify["accuracy"] > 0.5
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            phases = {json.loads(line)["phase"] for line in f}
        assert phases == {"dense", "sparsify", "retrain"}
    if method == "relaxation":
        assert 0 < report["sparsify"]["gates_open"] < 1
    if method == "magnitude" and "--config.magnitude.iterative=True" in args:
        assert [s["ratio"] for s in report["stages"]] == [0.5, 0.75, 0.9]


def test_a_gated_method_resumes_after_kill(tmp_path, data_dir, finished):
    """The gates and their optimizer state are checkpointed: a kill -9 mid-sparsify resumes exactly."""
    index = next(i for i, c in enumerate(CASES) if c[0] == "relaxation")
    args = ["--method", "relaxation", *CASES[index][1]]
    _, reference = finished(index)
    workdir = str(tmp_path / "run")
    killed_at = kill_after_checkpoint(workdir, *args, data_dir=data_dir, after_step=40)  # dense: 32 steps
    assert killed_at is not None and killed_at < 80, "the run ended before it could be killed mid-sparsify"
    result = cli("--workdir", workdir, *args, data_dir=data_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from checkpoint" in result.stdout
    with open(os.path.join(workdir, "report.json")) as f:
        assert strip_timing(json.load(f)) == strip_timing(reference)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "magnitude", "--config.prune.criterion=vibes"], "unknown prune.criterion 'vibes'"),
        (["--method", "magnitude", "--config.prune.scope=planet"], "prune.scope must be one of"),
        (["--method", "l1_mask", "--config.l1_mask.strength=-1"], "l1_mask.strength must be a non-negative"),
        (["--method", "relaxation", "--config.relaxation.threshold=1.5"], "relaxation.threshold must be in (0, 1)"),
    ],
)
def test_bad_method_settings_exit_2_without_claiming_the_workdir(args, message, tmp_path, data_dir, capsys):
    workdir = tmp_path / "run"
    # In-process main(): the same entry point as the CLI, without a subprocess's start-up.
    code = train.main(["--config", SMOKE, f"--config.data.data_dir={data_dir}", "--workdir", str(workdir), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not workdir.exists()


def test_a_criterion_that_does_not_apply_is_refused_before_training(tmp_path, data_dir):
    # LeNet-5 has no BatchNorm scales to rank by.
    workdir = tmp_path / "run"
    result = cli(
        "--workdir",
        str(workdir),
        "--method",
        "magnitude",
        "--config.prune.criterion=bn_scale",
        data_dir=data_dir,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "bn_scale needs normalization layers" in result.stderr and "Traceback" not in result.stderr
    assert not workdir.exists()
