"""The criteria analysis: its statistics, its outputs, and its command line."""

import csv
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_criteria import fast_model  # the tests directory is on sys.path (pytest's rootdir import)

from admmprune import analyze, criteria
from admmprune.core.sparsity import Filter
from admmprune.runtime.checkpoint import save_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUTS = ("similarity.csv", "applicability.csv", "normality.csv", "analysis.json", "summary.md")


# --- statistics -----------------------------------------------------------------


def test_normality_passes_a_gaussian_and_rejects_a_uniform_sample():
    rng = np.random.default_rng(0)
    gaussian = analyze.normality(rng.normal(0.5, 2.0, size=2000))
    assert not gaussian["shapiro_reject"] and not gaussian["ks_reject"] and not gaussian["ad_reject"]
    assert gaussian["mean"] == pytest.approx(0.5, abs=0.15) and gaussian["std"] == pytest.approx(2.0, rel=0.05)
    uniform = analyze.normality(rng.uniform(-1, 1, size=2000))
    assert uniform["shapiro_reject"] and uniform["ks_reject"] and uniform["ad_reject"]
    assert uniform["shapiro_n"] == uniform["n"] == 2000


def test_normality_subsamples_shapiro_reproducibly():
    x = np.random.default_rng(1).normal(size=(40, 300))
    a, b = analyze.normality(x, seed=3), analyze.normality(x, seed=3)
    assert a == b and a["n"] == 12000 and a["shapiro_n"] == analyze.SHAPIRO_MAX
    assert analyze.normality(x, seed=4)["shapiro_w"] != a["shapiro_w"]
    constant = analyze.normality(np.ones(50))
    assert math.isnan(constant["shapiro_p"]) and constant["ks_reject"] is None


def test_rank_correlations_and_pruned_sets():
    s = np.array([3.0, 1.0, 4.0, 1.5, 9.0, 2.6])
    assert analyze.rank_correlations(s, s) == pytest.approx((1.0, 1.0))
    assert analyze.rank_correlations(s, -s) == pytest.approx((-1.0, -1.0))
    assert analyze.rank_correlations(s, 2 * s + 1) == pytest.approx((1.0, 1.0))  # ranks, not values
    assert all(math.isnan(v) for v in analyze.rank_correlations(s, np.ones(6)))
    # the channels select() removes at keep_ratio = 1 - ratio
    params, specs = {"w": jnp.ones((2, 6), jnp.float32)}, {"w": Filter(group="g")}
    for ratio in (0.2, 0.5, 0.9):
        kept = criteria.select({"g": jnp.asarray(s, jnp.float32)}, specs, params, 1 - ratio)["w"][0]
        np.testing.assert_array_equal(analyze.pruned(s, ratio), ~np.asarray(kept))
    a, b = np.array([1, 1, 0, 0], bool), np.array([0, 1, 1, 0], bool)
    assert analyze.jaccard(a, b) == pytest.approx(1 / 3) and analyze.jaccard(a, a) == 1.0
    assert analyze.jaccard(np.zeros(4, bool), np.zeros(4, bool)) == 1.0


def test_applicability_flags_constant_scores_and_ties_at_the_cut():
    distinct = analyze.applicability(np.arange(1.0, 11.0), 0.5)
    assert not distinct["flagged"] and distinct["pruned"] == 5
    assert distinct["cv"] == pytest.approx(np.std(np.arange(1.0, 11.0)) / 5.5)
    assert distinct["rel_gap"] == pytest.approx((6 - 5) / 6)
    constant = analyze.applicability(np.ones(10), 0.5)
    assert constant["flagged"] and "nearly constant" in constant["reason"]
    tie = analyze.applicability(np.array([0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0]), 0.25)  # dead channels
    assert tie["flagged"] and "tie" in tie["reason"] and "constant" not in tie["reason"]
    missing = analyze.applicability(np.full(4, np.nan), 0.5)
    assert missing["flagged"] and "does not apply" in missing["reason"]


def test_one_weight_per_channel_l1_and_l2_rank_alike(tmp_path):
    rng = np.random.default_rng(0)
    params = {
        "g": {"bias": jnp.asarray(rng.normal(size=9), jnp.float32)},  # one weight per channel
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 7)), jnp.float32)},
    }
    specs = {"g": {"bias": Filter(group="g")}, "conv": {"kernel": Filter(group="c")}}
    grads = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params) for _ in range(2)]
    result = analyze.analyze(params, specs, ratio=0.4, grads=grads)
    assert result["criteria"] == ["l1", "l2", "fpgm", "taylor", "lamp", "random"]
    assert "bn_scale" in result["skipped"]
    rows = {(r["group"], r["a"], r["b"]): r for r in result["similarity"]}
    assert rows["g", "l1", "l2"]["spearman"] == pytest.approx(1.0)
    assert rows["g", "l1", "l2"]["kendall"] == pytest.approx(1.0)
    assert rows["g", "l1", "l2"]["jaccard"] == 1.0
    assert ("g", "l1", "fpgm") not in rows  # fpgm has no producing kernel in g: NaN, left out
    for r in result["similarity"]:
        for key in ("spearman", "kendall", "jaccard"):
            assert -1 <= r[key] <= 1
        if r["a"] == r["b"]:
            assert r["spearman"] == pytest.approx(1.0) and r["jaccard"] == 1.0
    assert [r["layer"] for r in result["normality"]] == ["conv"]
    # Undefined values (NaN) are written as JSON null, which every JSON reader takes.
    out = analyze.write(result, str(tmp_path / "analysis"), figures=False)
    with open(os.path.join(out, "analysis.json")) as f:
        written = json.load(f, parse_constant=lambda name: pytest.fail(f"{name} in analysis.json"))
    assert any(r["cv"] is None for r in written["applicability"] if r["criterion"] == "fpgm")


# --- the command line -----------------------------------------------------------


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def check_outputs(out, *, figures):
    for name in OUTPUTS:
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "analysis.json")) as f:
        result = json.load(f)
    similarity = read_csv(os.path.join(out, "similarity.csv"))
    assert len(similarity) == len(result["similarity"]) > 0
    for row in similarity:
        for key in ("spearman", "kendall", "jaccard"):
            assert row[key] == "" or -1 <= float(row[key]) <= 1
        if row["a"] == row["b"] and row["spearman"]:
            assert float(row["spearman"]) == pytest.approx(1.0) and float(row["kendall"]) == pytest.approx(1.0)
    assert len(read_csv(os.path.join(out, "applicability.csv"))) == len(result["groups"]) * len(result["criteria"])
    assert len(read_csv(os.path.join(out, "normality.csv"))) == len(result["normality"])
    pngs = set(os.listdir(os.path.join(out, "figures"))) if figures else set()
    for group in result["groups"] if figures else ():
        stem = group.replace("/", ".")
        assert {f"{stem}.correlation.png", f"{stem}.scores.png"} <= pngs
    for row in result["normality"] if figures else ():
        assert f"{row['layer'].replace('/', '.')}.qq.png" in pngs
    assert figures == os.path.isdir(os.path.join(out, "figures"))
    return result


def test_cli_trains_the_dense_model_then_analyzes_it(tmp_path, data_dir, capsys):
    workdir = str(tmp_path / "run")
    config = ["--config", "smoke", "--workdir", workdir, f"--config.data.data_dir={data_dir}"]
    short = ["--config.dense.epochs", "1", "--config.data.limit=256", "--config.data.eval_limit=64"]
    argv = [*config, *short, "--taylor-batches", "2", "--batch-size", "64"]
    # optax's cosine schedule (dense training) mixes a float and an int32: not strict-promotion clean.
    with jax.numpy_dtype_promotion("standard"):
        assert analyze.main(argv) == 0
    out = os.path.join(workdir, "analysis")
    result = check_outputs(out, figures=True)
    # taylor from the run's dataset; LeNet-5 has no normalization
    assert result["criteria"] == ["l1", "l2", "fpgm", "taylor", "lamp", "random"]
    assert result["dataset"] == "mnist" and list(result["groups"]) == ["conv1", "conv2", "fc1"]
    assert [r["layer"] for r in result["normality"]] == ["conv1", "conv2", "fc1", "fc2"]
    with open(os.path.join(out, "summary.md")) as f:
        summary = f.read()
    assert "| l1 | l2 |" in summary and "bn_scale skipped" in summary

    # a second analysis does not replace the first without --overwrite
    before = os.stat(os.path.join(out, "analysis.json")).st_mtime_ns
    capsys.readouterr()
    assert analyze.main([workdir]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: output") and "--overwrite" in err[0]
    assert os.stat(os.path.join(out, "analysis.json")).st_mtime_ns == before
    assert analyze.main([workdir, "--overwrite", "--criteria", "l2,l1", "--no-figures"]) == 0
    assert check_outputs(out, figures=False)["criteria"] == ["l2", "l1"]
    assert not [n for n in os.listdir(workdir) if n.startswith(".analysis")]  # no temp dirs left next to it


def test_cli_on_a_saved_resnet(tmp_path):
    model_dir = str(tmp_path / "models" / "resnet20")
    save_model(model_dir, fast_model("resnet20", in_shape=(8, 8, 3)))
    assert analyze.main([model_dir, "--no-figures", "--ratio", "0.25"]) == 0
    result = check_outputs(str(tmp_path / "models" / "analysis"), figures=False)
    assert result["criteria"] == ["l1", "l2", "fpgm", "bn_scale", "lamp", "random"]
    assert "taylor" in result["skipped"] and result["ratio"] == 0.25
    assert len(result["groups"]) == 12  # the stem with its residual stage, and each block's inner conv
    assert len(result["normality"]) == 22  # 21 convs and the head
    assert {r["kind"] for r in result["normality"]} == {"conv", "dense"}


def run_cli(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "admmprune.analyze", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "a.txt").write_text("hello")
    cases = {
        "no such model directory": [str(tmp_path / "missing")],
        "--ratio must be a number in (0, 1)": [str(not_a_model), "--ratio", "1.5"],
    }
    procs = {expected: run_cli(*args) for expected, args in cases.items()}  # in parallel
    for expected, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        assert proc.returncode == 2, stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr
        assert stdout == ""
    # the rest in-process (the same main)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    in_process = {
        "is not a model saved by admmprune": [str(not_a_model)],
        "unknown criterion 'l3'": [str(not_a_model), "--criteria", "l1,l3"],
        "needs --config": [str(not_a_model), "--config.seed=1"],
        "not both": [str(not_a_model), "--config", "smoke"],
        "has no dense model yet": [str(workdir)],
        "--taylor-batches must be an integer >= 1": [str(not_a_model), "--taylor-batches", "0"],
        "unrecognized arguments": [str(not_a_model), "--bogus"],
    }
    for expected, args in in_process.items():
        assert analyze.main(args) == 2, expected
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not os.path.exists(tmp_path / "analysis")


def test_explicit_criteria_that_cannot_apply_are_errors(tmp_path, capsys):
    model_dir = str(tmp_path / "lenet")
    save_model(model_dir, fast_model("lenet5", features=(4, 6, 8)))
    for args, expected in (
        (["--criteria", "taylor"], "taylor criterion needs gradients"),
        (["--criteria", "bn_scale"], "bn_scale does not apply to this model: no group has a normalization scale"),
    ):
        assert analyze.main([model_dir, *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], lines
    assert not os.path.exists(tmp_path / "analysis")
