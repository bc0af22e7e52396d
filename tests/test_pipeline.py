"""The pipeline through its real CLI entry point, on the smoke config."""

import dataclasses
import json
import os
import time

import jax
import numpy as np
import pytest
from _cli import SMOKE, cli, eval_slice, eval_slice_accuracy, kill_after_checkpoint, snapshot, strip_timing

import admmprune
from admmprune import pipeline, train
from admmprune._errors import UserError
from admmprune.app.pipeline._steps import distillation_loss
from admmprune.checkpoint import Checkpointer
from admmprune.configs import default as default_config


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("smoke") / "run")
    t0 = time.perf_counter()
    result = cli("--workdir", workdir, data_dir=data_dir)
    seconds = time.perf_counter() - t0
    assert result.returncode == 0, result.stderr
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    return workdir, report, result, seconds


def test_smoke_pipeline_writes_a_complete_report(smoke_run):
    workdir, report, result, _ = smoke_run
    assert report["model"] == "lenet5" and report["dataset"] == "mnist" and report["method"] == "admm"
    assert report["ratio"] == 0.9
    assert [s["ratio"] for s in report["stages"]] == [0.5, 0.75, 0.9]
    for stage in report["stages"]:
        assert stage["primal_residual"] >= 0 and stage["seconds"] > 0
        # ADMM trains a working model at every stage (about 0.9 on this slice); its hard prune costs accuracy.
        assert stage["admm_accuracy"] > 0.5 and stage["accuracy"] < stage["admm_accuracy"]
    assert report["dense"]["params"] == 431_080
    # 0.9 of every prunable layer's channels removed: 20 -> 2, 50 -> 5, 500 -> 50.
    assert report["layers"] == {
        "conv1": {"kept": 2, "total": 20},
        "conv2": {"kept": 5, "total": 50},
        "fc1": {"kept": 50, "total": 500},
    }
    # The slim LeNet-5 (2, 5, 50): 52 + 255 + 4,050 + 510 parameters.
    assert report["pruned"]["params"] == 4_867
    assert 0 < report["pruned"]["flops"] < 0.05 * report["dense"]["flops"]
    assert report["dense"]["accuracy"] > 0.5  # a real model learned on real MNIST
    # Retraining with the masks fixed recovers from the last stage's hard prune.
    assert report["pruned"]["accuracy"] > report["stages"][-1]["accuracy"]
    # The collapsed model is the slim LeNet-5 and computes what the masked one does.
    collapsed = report["collapsed"]
    assert collapsed["params"] == 4_867 and collapsed["flops"] == report["pruned"]["flops"]
    assert collapsed["max_abs_diff"] < 1e-4
    assert abs(collapsed["accuracy"] - report["pruned"]["accuracy"]) <= 1 / 512
    assert collapsed["latency_ms"] > 0 and report["dense"]["latency_ms"] > 0
    slim = admmprune.load(os.path.join(workdir, "model"))
    assert slim.widths == (2, 5, 50)
    # One summary line per phase and stage.
    lines = result.stdout.splitlines()
    for prefix in ("dense", "admm 0.5 ", "admm 0.75", "admm 0.9 ", "retrain", "done:"):
        assert sum(line.startswith(prefix) for line in lines) == 1, prefix
    assert "Traceback" not in result.stderr


def test_smoke_pipeline_writes_metrics_plan_and_checkpoints(smoke_run):
    workdir, _, _, _ = smoke_run
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r["step"] for r in records]
    assert steps == sorted(steps) and len(steps) == len(set(steps)) > 10
    assert {r["phase"] for r in records} == {"dense", "admm 0.5", "admm 0.75", "admm 0.9", "retrain"}
    assert all("primal_residual" in r for r in records if r["phase"].startswith("admm"))
    with open(os.path.join(workdir, "plan.txt")) as f:
        plan = f.read()
    assert "conv2/kernel" in plan and "fc2/bias" in plan
    assert os.listdir(os.path.join(workdir, "checkpoints"))


def test_smoke_pipeline_says_where_its_time_went(smoke_run):
    """report["time"] splits each phase into activities; metrics.jsonl has each flush's share; the log sums them."""
    workdir, report, result, seconds = smoke_run
    time_ = report["time"]
    assert set(time_) == {"dense", "admm 0.5", "admm 0.75", "admm 0.9", "retrain"}
    for phase, parts in time_.items():
        assert set(parts) == {"compute", "data", "eval", "checkpoint", "log"}, phase
        assert min(parts.values()) >= 0 and parts["compute"] > 0 and parts["eval"] > 0, phase
    assert time_["admm 0.5"]["checkpoint"] > 0  # the smoke config checkpoints within the phase too
    assert sum(sum(p.values()) for p in time_.values()) < seconds
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    timed = [r for r in records if "time" in r]
    # One per flush: every log_every (4) steps and at each phase's end.
    assert len(records) / 4 <= len(timed) < len(records) and all(r["time"]["compute"] >= 0 for r in timed)
    last = result.stdout.splitlines()[-1]
    # Each activity's seconds over all phases, largest first (checkpointing can outweigh compute under load).
    shares = dict(part.rsplit(" ", 1) for part in last.removeprefix("time: ").split(", "))
    assert last.startswith("time: ") and {"compute", "eval"} <= set(shares)
    seconds_ = [float(v.removesuffix("s")) for v in shares.values()]
    assert seconds_ == sorted(seconds_, reverse=True)
    total = {a: sum(p[a] for p in time_.values()) for a in shares}
    assert all(abs(total[a] - float(v.removesuffix("s"))) <= 0.051 for a, v in shares.items())


def test_smoke_pipeline_is_fast(smoke_run):
    # The budget is 60 s on 2 cores; this machine may be shared, so allow slack.
    assert smoke_run[3] < 120


def test_rerun_of_a_finished_run_changes_nothing(smoke_run, data_dir):
    workdir = smoke_run[0]
    before = snapshot(workdir)
    result = cli("--workdir", workdir, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert "complete" in result.stdout
    assert snapshot(workdir) == before


def test_kill_and_resume_gives_the_same_report(smoke_run, tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    # Kill -9 once a checkpoint inside an ADMM stage exists (dense is 32 steps; the first stage ends at 48).
    killed_at = kill_after_checkpoint(workdir, data_dir=data_dir, after_step=40)
    assert killed_at is not None, "the run ended before it could be killed"
    result = cli("--workdir", workdir, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert "resuming from checkpoint" in result.stdout
    with open(os.path.join(workdir, "report.json")) as f:
        resumed = json.load(f)
    assert strip_timing(resumed) == strip_timing(smoke_run[1])


# --- bad input: one line, exit code 2, nothing overwritten ----------------------


def run_main(args, capsys):
    code = train.main(["--config", SMOKE, *args])
    err = capsys.readouterr().err
    return code, err


def test_stop_after_dense_saves_the_dense_model(smoke_run, tmp_path, data_dir):
    from admmprune import pipeline

    config = train.load_config(SMOKE)
    config.data.data_dir = data_dir
    workdir = str(tmp_path / "run")
    lines = []
    # optax's cosine schedule mixes a float and an int32: not strict-promotion clean.
    with jax.numpy_dtype_promotion("standard"):
        partial = pipeline.run(config, workdir, log=lines.append, stop_after="dense")
    assert not os.path.exists(os.path.join(workdir, "report.json"))
    assert partial["dense"]["accuracy"] == smoke_run[1]["dense"]["accuracy"]
    dense = admmprune.load(os.path.join(workdir, "dense"))
    assert dense.widths == (20, 50, 500)
    # The saved dense model is the trained one: its accuracy on the eval slice is the report's.
    accuracy = eval_slice_accuracy(dense, data_dir)
    assert accuracy == pytest.approx(partial["dense"]["accuracy"], abs=1e-6)

    # The last checkpoint is the end of the dense phase (32 steps): a later run without
    # stop_after resumes there, as after any interruption (test_kill_and_resume...).
    with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
        assert ckpt.latest_step() == 32
        meta = ckpt.restore_metadata()
    assert (meta["phase"], meta["phase_step"]) == (0, 32) and meta["report"]["dense"] == partial["dense"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--ratio", "1.5"], "ratio must be a number in (0, 1)"),
        (["--ratio", "0"], "ratio must be a number in (0, 1)"),
        (["--ratio", "abc"], "--ratio must be a number"),
        (["--stages", "0.5,0.4,0.9"], "strictly increasing"),
        (["--stages", "0.5,0.75"], "must equal the ratio"),
        (["--config.model.name=resnet999"], "unknown model 'resnet999'"),
        (["--method", "prayer"], "unknown method 'prayer'"),
        (["--config.model.name=unet"], "segmentation model"),
        (["--config.no.such=1"], "unknown config key 'no.such'"),
        (["--config.admm.rho=fast"], "bad value 'fast' for config key 'admm.rho'"),
        (["--config", "no/such/config.py"], "no config file"),
        (["--bogus"], "unrecognized argument"),
    ],
)
def test_bad_arguments(args, message, capsys, tmp_path):
    workdir = tmp_path / "w"
    code, err = run_main([*args, "--workdir", str(workdir)], capsys)
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not workdir.exists()


def test_unknown_dataset_fails_fast_without_claiming_the_workdir(capsys, tmp_path, data_dir):
    workdir = tmp_path / "w"
    t0 = time.perf_counter()
    code, err = run_main(
        ["--config.data.name=no_such_dataset", f"--config.data.data_dir={data_dir}", "--workdir", str(workdir)], capsys
    )
    assert code == 2 and "no_such_dataset" in err
    assert time.perf_counter() - t0 < 10
    assert not workdir.exists()


def test_workdir_with_another_config_is_refused_untouched(smoke_run, capsys, data_dir):
    workdir = smoke_run[0]
    before = snapshot(workdir)
    code, err = run_main([f"--config.data.data_dir={data_dir}", "--ratio", "0.5", "--workdir", workdir], capsys)
    assert code == 2 and "different config" in err and "prune.ratio" in err
    assert snapshot(workdir) == before


def test_foreign_nonempty_workdir_is_refused(capsys, tmp_path, data_dir):
    (tmp_path / "thesis.tex").write_text("precious")
    code, err = run_main([f"--config.data.data_dir={data_dir}", "--workdir", str(tmp_path)], capsys)
    assert code == 2 and "not empty" in err
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    # The dense phase trains normally; the first ADMM stage diverges.
    result = cli("--workdir", workdir, "--config.admm.learning_rate=1e6", data_dir=data_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "loss became" in result.stderr and "nan" in result.stderr.lower() or "inf" in result.stderr
    assert not os.path.exists(os.path.join(workdir, "report.json"))
    steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert steps and steps[-1] == 32  # the end of the dense phase


def test_help_explains_the_ratio_and_stages(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "fraction of channels removed" in out
    assert "0.9 -> 0.5, 0.75, 0.9" in out


def test_a_zoo_model_with_batchnorm_and_residuals_runs_through_the_cli(tmp_path, data_dir):
    """ResNet-20: groups discovered from the traced program, collapsed at the end."""
    workdir = str(tmp_path / "run")
    result = cli(
        "--workdir",
        workdir,
        "--ratio",
        "0.5",
        "--config.model.name=resnet20",
        "--config.data.limit=128",
        "--config.data.eval_limit=128",
        "--config.data.batch_size=32",
        "--config.dense.epochs=1",
        "--config.admm.epochs_per_stage=1",
        "--config.retrain.epochs=1",
        "--config.measure.batch_size=16",
        "--config.measure.repeats=2",
        data_dir=data_dir,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    assert report["dense"]["params"] == 272_186  # ResNet-20 on 1-channel input
    assert all(layer["kept"] == layer["total"] // 2 for layer in report["layers"].values())
    assert report["collapsed"]["max_abs_diff"] < 1e-4
    assert 0.2 < report["collapsed"]["params"] / report["dense"]["params"] < 0.35


def test_dense_warmup_rises_linearly_then_follows_the_schedule():
    config = default_config.get_config()
    config.dense.learning_rate, config.dense.warmup = 0.05, 0.1
    dense = pipeline.settings(config).dense
    lr = pipeline.learning_rate(dense, 1000)
    np.testing.assert_allclose([lr(0), lr(50), lr(100)], [0.0, 0.025, 0.05], rtol=1e-6)
    assert 0.0 <= float(lr(1000)) < 1e-6 and float(lr(550)) < 0.05  # then cosine to 0 over the rest
    constant = pipeline.learning_rate(dataclasses.replace(dense, schedule="constant"), 1000)
    np.testing.assert_allclose([constant(50), constant(100), constant(900)], [0.025, 0.05, 0.05], rtol=1e-6)
    assert pipeline.learning_rate(dataclasses.replace(dense, warmup=0.0, schedule="constant"), 1000) == 0.05
    for bad in (1.0, -0.1):
        config.dense.warmup = bad
        with pytest.raises(UserError, match=r"dense.warmup must be a fraction of the phase in \[0, 1\)"):
            pipeline.check_config(config)


def test_a_macs_budget_run_collapses_to_a_model_within_the_budget(tmp_path, data_dir):
    """--config.prune.budget=macs: ratio 0.75 removes 3/4 of the MACs, the layers competing for what is kept."""
    import jax.numpy as jnp

    from admmprune import costs
    from admmprune.checkpoint import load_model
    from admmprune.configs import smoke

    workdir = str(tmp_path / "run")
    flags = ("--ratio", "0.75", "--config.prune.budget=macs", "--config.dense.epochs=1", "--config.retrain.epochs=0")
    result = cli("--workdir", workdir, *flags, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    assert [s["ratio"] for s in report["stages"]] == [0.5, 0.75]
    x = jnp.zeros((1, 28, 28, 1), jnp.float32)
    dense = sum(costs.layer_macs(admmprune.models.get("lenet5"), x).values())
    small = load_model(os.path.join(workdir, "model"))
    assert sum(costs.layer_macs(small, x).values()) <= 0.25 * dense
    kept = [v["kept"] / v["total"] for v in report["layers"].values()]
    assert len(set(kept)) > 1  # not uniform widths: the layers competed for the budget
    config = smoke.get_config()
    config.prune.budget, config.prune.method = "macs", "magnitude"
    with pytest.raises(UserError, match="prune.budget=macs works with --method admm only, not magnitude"):
        pipeline.check_config(config)


def test_a_run_from_a_saved_dense_model_ends_where_the_full_run_ends(smoke_run, tmp_path, data_dir):
    """dense.init skips the dense phase: the methods of one seed share one dense model, at no cost in results."""
    workdir = str(tmp_path / "run")
    result = cli("--workdir", workdir, f"--config.dense.init={smoke_run[0]}", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert f"dense     from {smoke_run[0]}  accuracy" in result.stdout
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    assert report["dense"].pop("init") == smoke_run[0]
    assert strip_timing(report) == strip_timing(smoke_run[1])
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        phases = {json.loads(line).get("phase") for line in f}
    assert "dense" not in phases  # no dense step was taken


def test_a_saved_dense_model_of_another_architecture_is_refused(smoke_run, capsys, tmp_path):
    workdir = tmp_path / "w"
    init = os.path.join(smoke_run[0], "dense")
    code, err = run_main(
        ["--workdir", str(workdir), f"--config.dense.init={init}", "--config.model.name=vgg11"], capsys
    )
    assert code == 2
    assert f"dense.init {init} holds a lenet5" in err and "not this run's vgg11" in err
    assert "Traceback" not in err and not workdir.exists()
    code, err = run_main(["--workdir", str(workdir), f"--config.dense.init={tmp_path / 'none'}"], capsys)
    assert code == 2 and "no saved model in" in err and not workdir.exists()


def _kl_on_eval_slice(teacher, student, data_dir, temperature):
    """Mean KL(teacher || student) of the softened predictions on the smoke eval slice."""
    images = eval_slice(data_dir)["image"]
    teacher.eval()
    student.eval()
    return float(distillation_loss(student(images), teacher(images), temperature)) / temperature**2


def test_distillation_pulls_the_pruned_model_towards_the_dense_one(smoke_run, tmp_path, data_dir):
    """retrain.distill=1 trains the masked phases on the dense model's softened outputs alone:
    the pruned model ends closer to the dense one (in KL) than the same run without it."""
    workdir = str(tmp_path / "distilled")
    result = cli(
        "--workdir",
        workdir,
        f"--config.dense.init={smoke_run[0]}",
        "--config.retrain.distill=1.0",
        "--config.retrain.temperature=2.0",
        data_dir=data_dir,
    )
    assert result.returncode == 0, result.stderr
    dense = admmprune.load(os.path.join(smoke_run[0], "dense"))
    plain = _kl_on_eval_slice(dense, admmprune.load(os.path.join(smoke_run[0], "model")), data_dir, 2.0)
    distilled = _kl_on_eval_slice(dense, admmprune.load(os.path.join(workdir, "model")), data_dir, 2.0)
    assert distilled < plain, (distilled, plain)
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["retrain"]["distill"] == 1.0


@pytest.mark.parametrize("field, value", [("distill", "1.5"), ("distill", "-0.1"), ("temperature", "0.0")])
def test_bad_distillation_settings_are_refused(field, value, capsys, tmp_path):
    workdir = tmp_path / "w"
    code, err = run_main(["--workdir", str(workdir), f"--config.retrain.{field}={value}"], capsys)
    assert code == 2 and f"retrain.{field}" in err and "Traceback" not in err and not workdir.exists()


def test_distillation_loss_is_the_tempered_kl():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(8, 10)).astype(np.float32), rng.normal(size=(8, 10)).astype(np.float32)
    for temperature in (1.0, 4.0):
        p = np.exp(t / temperature) / np.exp(t / temperature).sum(-1, keepdims=True)
        q = np.exp(s / temperature) / np.exp(s / temperature).sum(-1, keepdims=True)
        expected = temperature**2 * np.mean(np.sum(p * np.log(p / q), -1))
        assert float(distillation_loss(s, t, temperature)) == pytest.approx(expected, rel=1e-5)
    assert float(distillation_loss(t + 3.0, t, 2.0)) == pytest.approx(0.0, abs=1e-6)  # a shift changes nothing
