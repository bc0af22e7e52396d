"""Running ``python -m admmprune.train`` from tests: the real entry point, in a subprocess."""

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.py")
TIMING_KEYS = {"seconds", "date", "machine", "latency_ms", "speedup", "time"}


def command(*args, data_dir):
    return [sys.executable, "-m", "admmprune.train", "--config", SMOKE, f"--config.data.data_dir={data_dir}", *args]


def cli(*args, data_dir, timeout=300):
    """Runs the smoke config with ``args``; returns the ``CompletedProcess``."""
    return subprocess.run(
        command(*args, data_dir=data_dir), capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False
    )


def kill_after_checkpoint(workdir, *args, data_dir, after_step, timeout=240):
    """Starts a run and kills it (-9) once a checkpoint past ``after_step`` exists; returns that step or None."""
    proc = subprocess.Popen(
        command("--workdir", workdir, *args, data_dir=data_dir),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt_dir = os.path.join(workdir, "checkpoints")
    deadline, killed_at = time.time() + timeout, None
    while time.time() < deadline and proc.poll() is None:
        steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) if os.path.isdir(ckpt_dir) else []
        if steps and steps[-1] > after_step:
            os.kill(proc.pid, signal.SIGKILL)
            killed_at = steps[-1]
            break
        time.sleep(0.05)
    proc.wait()
    return killed_at


def strip_timing(obj):
    """A report without the fields that differ between identical runs (times, dates, machine)."""
    if isinstance(obj, dict):
        return {k: strip_timing(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [strip_timing(v) for v in obj]
    return obj


def snapshot(directory):
    """Every file under ``directory`` with its size and mtime."""
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[os.path.relpath(p, directory)] = (st.st_size, st.st_mtime_ns)
    return out


def eval_slice(data_dir):
    """The smoke config's eval slice (the first 512 MNIST test images), normalized as the pipeline does."""
    from admmprune import data

    info = data.dataset_info("mnist", data_dir)
    loader = data.make_loader(
        data.load_source("mnist", "test[:512]", data_dir),
        batch_size=512,
        seed=0,
        shuffle=False,
        drop_remainder=False,
        normalize=(info.mean, info.std),
        shard_index=0,
        shard_count=1,
    )
    return next(iter(loader))


def eval_slice_accuracy(model, data_dir):
    """A model's accuracy on :func:`eval_slice`, in eval mode."""
    import numpy as np

    batch = eval_slice(data_dir)
    model.eval()
    return float(np.mean(np.asarray(model(batch["image"]).argmax(-1)) == batch["label"]))
