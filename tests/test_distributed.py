"""Data-parallel and multi-process runs give what one device gives.

The device count is fixed when JAX starts, so every run here is a subprocess
with CPU devices made by ``XLA_FLAGS=--xla_force_host_platform_device_count``.
A smoke run costs its compilations (once per phase and process), so there are
two of them besides the 1-device reference: the pipeline's step on meshes of
1 and 8 devices in one process, and the whole pipeline on 8 devices split
over two processes on 127.0.0.1 (collectives through gloo), FSDP-sharded,
killed and resumed.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from _cli import ROOT, command, strip_timing
from flax import nnx

import admmprune
from admmprune import train

# A shorter smoke run: 8 steps an epoch; dense 2 epochs, one ADMM stage and
# retraining 1 epoch each (32 steps), a checkpoint every 4. The time goes into
# compiling, once per phase and process.
SMALL = (
    "--stages=0.9",
    "--config.data.limit=512",
    "--config.data.eval_limit=256",
    "--config.checkpoint_every=4",
    "--config.measure.repeats=1",
    "--config.measure.batch_size=16",
)
EIGHT_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
FOUR_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


def run(workdir, *args, data_dir, env=None, timeout=300):
    return subprocess.run(
        command("--workdir", workdir, *SMALL, *args, data_dir=data_dir),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def start(workdir, *args, data_dir, log, env=None):
    return subprocess.Popen(
        command("--workdir", workdir, *SMALL, *args, data_dir=data_dir),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read(workdir):
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        metrics = [json.loads(line) for line in f]
    return report, metrics


def assert_same_run(workdir, reference):
    """The report, per-step losses and kept channels of ``reference``, up to float rounding.

    Sums over a batch split across devices round differently, and ADMM's
    projections amplify that: until the first projection the losses agree to
    ~1e-4 (see below), after it to ~1e-3 (measured: 2.5e-3 at most), and an evaluation may
    differ by an example or two; the channels kept are the same.
    """
    (report, metrics), (ref_report, ref_metrics) = read(workdir), read(reference)
    assert strip_timing(report) == approx_tree(strip_timing(ref_report), rel=1e-2, abs=1e-2)
    assert report["layers"] == ref_report["layers"]
    assert [m["step"] for m in metrics] == [m["step"] for m in ref_metrics]  # one writer, no step twice
    losses, ref_losses = np.array([m["loss"] for m in metrics]), np.array([m["loss"] for m in ref_metrics])
    dense = np.array([m["phase"] == "dense" for m in ref_metrics])
    # Rounding only, amplified by training: the kernel gradient is summed in batch chunks on CPU
    # (one device: chunks of 16; eight: per-device sums of 8), so the dense losses differ by ~1e-4
    # after 16 steps (measured 1.7e-4), where one whole-batch sum gave ~1e-6.
    np.testing.assert_allclose(losses[dense], ref_losses[dense], rtol=1e-3)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)
    # The same channels kept: the collapsed models hold the same weights.
    slim, ref_slim = (
        nnx.to_pure_dict(nnx.state(admmprune.load(os.path.join(d, "model")), nnx.Param)) for d in (workdir, reference)
    )
    for a, b in zip(*(sorted(nnx.traversals.flatten_mapping(s).items()) for s in (slim, ref_slim)), strict=True):
        assert a[0] == b[0]
        np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[1]), atol=1e-2)


def approx_tree(obj, **tol):
    if isinstance(obj, dict):
        return {k: approx_tree(v, **tol) for k, v in obj.items()}
    if isinstance(obj, list):
        return [approx_tree(v, **tol) for v in obj]
    return pytest.approx(obj, **tol) if isinstance(obj, float) else obj


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("one_device") / "run")
    result = run(workdir, data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return workdir


def test_two_processes_on_eight_devices_resume_after_one_is_killed_and_end_like_one(reference, tmp_path, data_dir):
    # 2 processes x 4 devices, FSDP: arrays split across processes, gathered for
    # the host-side work, saved and restored shard by shard.
    workdir, port = str(tmp_path / "run"), free_port()

    def both(log_name):
        logs = [open(tmp_path / f"{log_name}{i}.log", "w") for i in range(2)]  # noqa: SIM115 - closed below
        flags = (
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--config.distributed.param_sharding=fsdp",
        )
        procs = [
            start(workdir, *flags, "--process-id", str(i), data_dir=data_dir, log=logs[i], env=FOUR_DEVICES)
            for i in range(2)
        ]
        return procs, logs

    procs, logs = both("first")
    ckpt_dir, deadline, killed_at = os.path.join(workdir, "checkpoints"), time.time() + 240, None
    while time.time() < deadline and procs[1].poll() is None:
        steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
        if steps and steps[-1] > 20:  # the end of the ADMM stage (step 24): restore Z and U, then prune
            os.kill(procs[1].pid, signal.SIGKILL)
            killed_at = steps[-1]
            break
        time.sleep(0.05)
    procs[0].kill()  # it would wait for its peer until JAX's heartbeat timeout (100 s)
    for p, log in zip(procs, logs, strict=True):
        p.wait()
        log.close()
    assert killed_at is not None, "the run ended before it could be killed"
    assert not os.path.exists(os.path.join(workdir, "report.json"))

    port = free_port()
    procs, logs = both("second")
    codes = [p.wait(timeout=300) for p in procs]
    for log in logs:
        log.close()
    out = [(tmp_path / f"second{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], out
    assert "resuming from checkpoint" in out[0]
    assert "done:" in out[0] and "done:" not in out[1]  # process 0 alone reports
    assert read(workdir)[0]["machine"]["devices"] == "cpu x8"
    assert_same_run(workdir, reference)


STEPS_ON_MESHES = """
import jax, numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
import admmprune as ap
from admmprune import distributed, graph, models, pipeline, train
from admmprune import UserError

# The pipeline's ADMM step of the smoke config (a projection every 4 steps).
config = train.load_config("smoke")
rng = np.random.default_rng(0)
batches = [{"image": rng.normal(size=(64, 28, 28, 1)).astype(np.float32),
            "label": rng.integers(0, 10, 64).astype(np.int32)} for _ in range(12)]

def train_on(dp):
    model = models.get("lenet5", rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    specs = graph.chain_specs(params, model.chain)
    tx = pipeline.make_tx(pipeline.settings(config), pipeline.Phase("admm", 1, 0.5), specs, len(batches))
    state = dp.put((params, rest, ap.set_stage(tx.init(params), 0.5)))
    step = pipeline.make_train_step(graphdef, tx, admm_metrics=True,
                                     shardings=(dp.shardings(state), dp.data, dp.replicated))
    losses = []
    for batch in batches:
        *state, metrics = step(*state, dp.batch(batch))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state, dp.local(state)

one, _, (p1, _, s1) = train_on(distributed.DataParallel(devices=jax.devices()[:1]))
# Replicated, the default (the two-process test runs FSDP).
dp = distributed.DataParallel()
assert dp.size == 8
losses, (params, _, _), (p8, _, s8) = train_on(dp)
# Until the first projection only the sums' rounding differs; after it ADMM amplifies that.
np.testing.assert_allclose(losses[:5], one[:5], rtol=1e-5)
np.testing.assert_allclose(losses, one, rtol=1e-2)
for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, b, atol=1e-3)
# The same groups kept by the projection.
for a, b in zip(jax.tree.leaves(ap.find_state(s8).support), jax.tree.leaves(ap.find_state(s1).support)):
    np.testing.assert_array_equal(a, b)
kernel = params["fc1"]["kernel"][...]
assert kernel.sharding.spec == P() and len(kernel.devices()) == 8, kernel.sharding

dp = distributed.DataParallel(param_sharding="fsdp")
# The largest axis that 8 divides; 5x5x1x20 has none; scalars stay whole.
assert dp.sharding(np.zeros((800, 500))).spec == P("data", None)
assert dp.sharding(np.zeros((5, 5, 20, 56))).spec == P(None, None, None, "data")
assert dp.sharding(np.zeros((5, 5, 1, 20))).spec == P()
assert dp.sharding(np.zeros(())).spec == P()
try:
    dp.local_batch_size(60)
except UserError as e:
    assert "does not divide by the 8 devices" in str(e), e
else:
    raise AssertionError("no error")
out = dp.local(dp.put({"w": np.arange(4000.0).reshape(800, 5)}))["w"]
assert np.array_equal(out, np.arange(4000.0).reshape(800, 5)) and len(out.devices()) == 1
print("ok")
"""


def run_on_eight_devices(source):
    """Runs a script in a process with 8 CPU devices; it prints ``ok`` when its checks hold."""
    result = subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **EIGHT_DEVICES},
        check=False,
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_step_on_eight_devices_computes_what_it_does_on_one():
    run_on_eight_devices(STEPS_ON_MESHES)


EXPLICIT_SHARDING = """
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import AxisType, PartitionSpec as P
import admmprune as ap
from admmprune.sparsity import Block, Channel, Column, Filter, NofM, Unstructured

# Weights split over 8 devices under an explicit mesh (jax.set_mesh with
# AxisType.Explicit, where every reshape and sort must be legal for the split):
# ADMM's init, its jitted update and hard pruning give what they give unsplit.
rng = np.random.default_rng(0)
w = {"a": jnp.asarray(rng.normal(size=(16, 32)), jnp.float32), "b": jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)}
grads = jax.tree.map(jnp.ones_like, w)
mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
cases = [{"a": Filter(group="a"), "b": Channel(group="a")}] + [{"a": s, "b": None} for s in
         (Unstructured(), NofM(2, 4), Block((4, 4)), Column())]
for specs in cases:
    tx = optax.chain(ap.admm(specs, rho=1e-2, interval=1), optax.sgd(0.1))
    want_u, want_state = jax.jit(tx.update)(grads, tx.init(w), w)
    want_masks = ap.hard_prune(w, specs, 0.5)[1]
    with jax.set_mesh(mesh):
        split = {"a": jax.device_put(w["a"], P(None, "data")), "b": jax.device_put(w["b"], P("data", None))}
        u, state = jax.jit(tx.update)(grads, tx.init(split), split)
        masks = ap.hard_prune(split, specs, 0.5)[1]
    assert jax.typeof(u["a"]).sharding.spec == P(None, "data"), jax.typeof(u["a"])
    for x, y in zip(jax.tree.leaves((want_u, want_state, want_masks)), jax.tree.leaves((u, state, masks)), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-6)
print("ok")
"""


def test_admm_and_pruning_run_on_explicitly_sharded_weights():
    run_on_eight_devices(EXPLICIT_SHARDING)


def test_unreachable_coordinator_is_one_error_line():
    args = [
        "--config",
        "smoke",
        "--coordinator",
        f"127.0.0.1:{free_port()}",
        "--num-processes",
        "2",
        "--process-id",
        "1",
        "--init-timeout",
        "1",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "admmprune.train", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: the 2 processes did not all join")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--num-processes", "2"], "needs --coordinator"),
        (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"], "in [0, 2)"),
        (["--coordinator", "h:1", "--num-processes", "two", "--process-id", "0"], "must be an integer"),
        (["--init-timeout", "soon"], "--init-timeout"),
    ],
)
def test_bad_multi_process_flags_are_one_error_line(flags, message, capsys):
    assert train.main(["--config", "smoke", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
