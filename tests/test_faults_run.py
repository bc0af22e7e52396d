"""Faults a training run meets in its workdir, each reproduced (issue 13).

Every case ends in one ``error:`` line and exit status 2 with the workdir's
files unchanged, or in a resume that ends with the uninterrupted run's report.
Cases that can fail before training run in-process through ``train.main``;
the others run the real CLI in a subprocess, so that what orbax's background
threads print at interpreter exit is checked too.
"""

import json
import os
import random
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import pytest
from _cli import ROOT, SMOKE, cli, command, kill_after_checkpoint, snapshot, strip_timing

from admmprune import UserError, train
from admmprune.app import pipeline
from admmprune.checkpoint import Checkpointer

# One ADMM stage: the faults do not depend on the length of the run.
SHORT = ("--ratio", "0.5")


@pytest.fixture(scope="module", autouse=True)
def prepared(data_dir):
    """MNIST prepared before any test captures stderr (the preparation's progress bars go there)."""
    from admmprune.runtime import data

    data.load_source("mnist", "test[:1]", data_dir)


def run_main(args, capsys, data_dir):
    # optax's cosine schedule mixes a float and an int32: not strict-promotion clean.
    with jax.numpy_dtype_promotion("standard"):
        code = train.main(["--config", SMOKE, f"--config.data.data_dir={data_dir}", *SHORT, *args])
    captured = capsys.readouterr()
    return code, captured.err, captured.out


def assert_one_error_line(err, *needles):
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def comparable(data_dir, *args):
    config, _ = train.parse_args(["--config", SMOKE, f"--config.data.data_dir={data_dir}", *SHORT, *args])
    return pipeline.settings(config).comparable


def fake_run(workdir, data_dir, *, report=None):
    """A workdir as a run of the short smoke config leaves it: its config (and report)."""
    os.makedirs(workdir, exist_ok=True)
    pipeline.write_json_atomic(os.path.join(workdir, "config.json"), comparable(data_dir))
    if report is not None:
        pipeline.write_json_atomic(os.path.join(workdir, "report.json"), report)


def mount(*args):
    result = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is not allowed here: {result.stderr.strip()}")


@pytest.fixture
def read_only(tmp_path):
    """A function that makes a directory read-only by a read-only bind mount
    over it (chmod denies nothing to root); unmounted after the test."""
    mounted = []

    def make(path):
        mount("--bind", str(path), str(path))
        mounted.append(str(path))
        mount("-o", "remount,ro,bind", str(path))

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", path], check=False)


# --- the workdir's path and files ------------------------------------------------


def test_workdir_below_a_regular_file(tmp_path, capsys, data_dir):
    (tmp_path / "notes.txt").write_text("precious")
    code, err, _ = run_main(["--workdir", str(tmp_path / "notes.txt" / "run")], capsys, data_dir)
    assert code == 2
    assert_one_error_line(err, "notes.txt is a file", "use another --workdir")
    assert (tmp_path / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("content", ['{"seed": 0, "mod', "[1, 2, 3]\n", ""])
def test_damaged_config_json_is_refused_untouched(content, tmp_path, capsys, data_dir):
    workdir = tmp_path / "run"
    fake_run(workdir, data_dir)
    (workdir / "config.json").write_text(content)
    (workdir / "checkpoints").mkdir()
    before = snapshot(workdir)
    code, err, _ = run_main(["--workdir", str(workdir)], capsys, data_dir)
    assert code == 2
    assert_one_error_line(err, f"{workdir / 'config.json'} is damaged", "delete")
    assert snapshot(workdir) == before


def test_damaged_report_json_is_refused_untouched(tmp_path, capsys, data_dir):
    workdir = tmp_path / "run"
    fake_run(workdir, data_dir, report={})
    (workdir / "report.json").write_text('["not", "a report"]')
    before = snapshot(workdir)
    code, err, _ = run_main(["--workdir", str(workdir)], capsys, data_dir)
    assert code == 2
    assert_one_error_line(err, "report.json is damaged", "delete it and rerun the same command")
    assert snapshot(workdir) == before


@pytest.mark.parametrize("kind", ["empty", "interrupted", "finished"])
def test_read_only_workdir(kind, tmp_path, capsys, data_dir, read_only):
    workdir = tmp_path / "run"
    workdir.mkdir()
    if kind == "interrupted":
        fake_run(workdir, data_dir)
    elif kind == "finished":
        fake_run(workdir, data_dir, report={"dense": {"accuracy": 0.5}})
    before = snapshot(workdir)
    read_only(workdir)
    code, err, out = run_main(["--workdir", str(workdir)], capsys, data_dir)
    if kind == "finished":  # a finished run is only read
        assert code == 0 and err == "" and "complete" in out
    else:
        assert code == 2
        assert_one_error_line(err, "Read-only file system", "use a writable --workdir")
    assert snapshot(workdir) == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.seed=-1"], "got -1"),
        (["--config.data.augment=foo"], "data.augment must be comma-separated names"),
    ],
)
def test_bad_values_are_refused_before_the_workdir_is_claimed(args, message, tmp_path, capsys, data_dir):
    workdir = tmp_path / "run"
    code, err, _ = run_main(["--workdir", str(workdir), *args], capsys, data_dir)
    assert code == 2
    assert_one_error_line(err, message)
    assert not workdir.exists()


def test_a_run_that_never_reached_a_checkpoint_gives_way_to_the_corrected_config(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    fake_run(workdir, data_dir)
    os.makedirs(os.path.join(workdir, "checkpoints", "8.orbax-checkpoint-tmp"))  # a save that did not end
    notes = []
    corrected = comparable(data_dir, "--config.dense.learning_rate=0.0123")
    finished, lock = pipeline.claim(corrected, workdir, log=notes.append)
    lock.release()
    assert finished is None and "never reached a checkpoint" in notes[0]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f) == corrected
    # Once a checkpoint exists, the workdir is that run's.
    os.makedirs(os.path.join(workdir, "checkpoints", "8"))
    with pytest.raises(UserError, match="different config"):
        pipeline.claim(comparable(data_dir), workdir, log=notes.append)


# --- the lock ---------------------------------------------------------------------


def test_a_workdir_in_use_is_refused_at_once_naming_its_holder(tmp_path, capsys, data_dir):
    workdir = tmp_path / "run"
    fake_run(workdir, data_dir)
    holder = pipeline.WorkdirLock.acquire(str(workdir), print)
    try:
        before = snapshot(workdir)
        t0 = time.perf_counter()
        code, err, _ = run_main(["--workdir", str(workdir)], capsys, data_dir)
        assert code == 2
        assert_one_error_line(err, "is in use by", f"pid {os.getpid()} on host {os.uname().nodename}")
        assert time.perf_counter() - t0 < 60
        assert snapshot(workdir) == before
    finally:
        holder.release()
    assert not (workdir / ".lock").exists()


def test_a_stale_lock_is_taken_over_with_a_note_and_leftovers_are_removed(tmp_path, data_dir):
    workdir = tmp_path / "run"
    fake_run(workdir, data_dir)
    # What kill -9 leaves: a lock file nobody holds, and half-written files.
    (workdir / ".lock").write_text(json.dumps({"pid": 999999, "host": "gone", "started": "yesterday"}))
    leftovers = ["dense.tmp-4242", "model.tmp-4242"]
    for name in leftovers:
        (workdir / name / "0").mkdir(parents=True)
    (workdir / "report.json.tmp-4242").write_text("{")
    (workdir / "config.json.tmp-4242").write_text("{")
    notes = []
    finished, lock = pipeline.claim(comparable(data_dir), str(workdir), log=notes.append)
    try:
        assert finished is None
        assert len(notes) == 1 and "took over the lock of pid 999999 on host gone" in notes[0]
        assert json.loads((workdir / ".lock").read_text())["pid"] == os.getpid()
        assert sorted(os.listdir(workdir)) == [".lock", "config.json"]
    finally:
        lock.release()


# --- the metrics log --------------------------------------------------------------


def test_a_garbage_line_in_metrics_is_reported_and_kept_aside(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    lines = ['{"step": 1, "loss": 2.0}\n', "#@!garbage\n", '{"step": 2, "loss": 1.0}\n', '{"step": 3, "lo']
    with open(path, "w") as f:
        f.writelines(lines)
    notes = []
    pipeline.MetricsLog(path, 2, log=notes.append).close()
    with open(path) as f:
        assert f.read() == lines[0] + lines[2]  # history kept; the cut last line is a crash's
    assert len(notes) == 1 and "line 2 not a JSON record" in notes[0] and "metrics.jsonl.damaged" in notes[0]
    with open(path + ".damaged") as f:
        assert f.read() == "".join(lines)


# --- damaged checkpoints ------------------------------------------------------------


def _damage(step_dir, kind):
    if kind == "metadata":
        open(os.path.join(step_dir, "metadata", "metadata"), "w").close()
        return
    if kind == "manifest":
        path = os.path.join(step_dir, "state", "manifest.ocdbt")
    else:
        data = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
        path = max((os.path.join(data, f) for f in os.listdir(data)), key=os.path.getsize)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if kind == "truncated":
            f.truncate(size // 2)
        else:
            f.write(b"\0" * size)


@pytest.mark.parametrize("kind", ["truncated", "zeroed", "manifest", "metadata"])
def test_a_damaged_step_is_one_line_and_can_be_set_aside(kind, tmp_path):
    state = {"w": jax.random.normal(jax.random.key(0), (64, 64)), "b": jnp.arange(64.0)}
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state, metadata={"step": 1})
        ckpt.save(2, jax.tree.map(lambda x: x + 1, state), metadata={"step": 2})
    _damage(str(tmp_path / "2"), kind)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(UserError) as e:
            ckpt.restore_metadata()
            ckpt.restore(jax.eval_shape(lambda: state))
        message = str(e.value)
        assert "checkpoint step 2" in message and "is damaged" in message
        assert "\n" not in message and len(message) < 500
        assert ckpt.set_aside(2).endswith("2.damaged") and ckpt.latest_step() == 1
        assert float(ckpt.restore(jax.eval_shape(lambda: state)).state["b"][1]) == 1.0
    assert sorted(os.listdir(tmp_path)) == ["1", "2.damaged"]


# --- whole runs: the CLI in a subprocess ---------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The short smoke run's report, uninterrupted."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    result = cli("--workdir", workdir, *SHORT, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    with open(os.path.join(workdir, "report.json")) as f:
        return json.load(f)


def _report(workdir):
    with open(os.path.join(workdir, "report.json")) as f:
        return json.load(f)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(reference, tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    # Dense is 32 steps, the ADMM stage ends at 48: killed inside the stage.
    killed_at = kill_after_checkpoint(workdir, *SHORT, data_dir=data_dir, after_step=32)
    assert killed_at is not None, "the run ended before it could be killed"
    ckpt_dir = os.path.join(workdir, "checkpoints")
    steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
    assert len(steps) >= 2  # two kept; a third when killed before the oldest was removed
    _damage(os.path.join(ckpt_dir, str(steps[-1])), "truncated")
    result = cli("--workdir", workdir, *SHORT, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"checkpoint step {steps[-1]}" in warnings[0], result.stdout
    assert f"resuming from checkpoint step {steps[-2]}" in result.stdout
    assert f"{steps[-1]}.damaged" in os.listdir(ckpt_dir)  # set aside, not deleted
    assert "Traceback" not in result.stderr
    assert strip_timing(_report(workdir)) == strip_timing(reference)


def test_sigterm_saves_a_checkpoint_and_a_rerun_ends_with_the_same_report(reference, tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    metrics = os.path.join(workdir, "metrics.jsonl")
    # Metrics are flushed every 4 steps: signal once step `after` is logged (the run has 64 steps).
    after = random.Random().choice(range(4, 60, 4))
    proc = subprocess.Popen(
        command("--workdir", workdir, *SHORT, data_dir=data_dir),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics):
            with open(metrics) as f:
                if any(json.loads(line)["step"] >= after for line in f if line.endswith("\n")):
                    break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, (after, err)
    assert err.count("\n") == 1 and err.startswith("stopped by SIGTERM at step ") and "rerun the same command" in err
    stopped_at = int(err.split("at step ")[1].split(":")[0])
    assert stopped_at > after - 4
    assert str(stopped_at) in os.listdir(os.path.join(workdir, "checkpoints"))
    assert not os.path.exists(os.path.join(workdir, ".lock"))
    result = cli("--workdir", workdir, *SHORT, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert f"resuming from checkpoint step {stopped_at}" in result.stdout
    assert strip_timing(_report(workdir)) == strip_timing(reference)


def test_a_loss_that_diverges_before_the_first_checkpoint_says_so(tmp_path, data_dir):
    workdir = str(tmp_path / "run")
    result = cli("--workdir", workdir, *SHORT, "--config.dense.learning_rate=1e9", data_dir=data_dir, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_error_line(result.stderr, "stopped before the first checkpoint", "is accepted")
    assert "last good checkpoint" not in result.stderr


def test_a_full_disk_is_one_line_without_a_second_traceback(tmp_path, data_dir):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount("-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk))
    try:
        result = cli("--workdir", str(disk / "run"), *SHORT, data_dir=data_dir, timeout=120)
    finally:
        subprocess.run(["umount", str(disk)], check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert_one_error_line(result.stderr, "No space left on device", "free space")
