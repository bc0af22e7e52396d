"""The run's directory: claiming it, atomic JSON, the metrics log, saved models."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
from flax import nnx

from admmprune._errors import UserError
from admmprune.app.pipeline._config import RUNTIME_KEYS
from admmprune.runtime import checkpoint as checkpoint_lib


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` through a temporary file: never half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def claim(comparable: dict[str, Any], workdir: str) -> dict[str, Any] | None:
    """Checks the workdir holds this run or none, and claims it; returns a finished run's report.

    Args:
      comparable: the run's config as JSON, without its runtime fields.
      workdir: the run's directory.

    Raises:
      UserError: if the workdir holds another run or other files.
    """
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} exists and is not a directory")
    config_path = os.path.join(workdir, "config.json")
    if os.path.exists(config_path):
        with open(config_path) as f:
            saved = {k: v for k, v in json.load(f).items() if k not in RUNTIME_KEYS}
        if saved != comparable:
            diff = sorted(diff_keys(saved, comparable))
            raise UserError(
                f"workdir {workdir} holds a run with a different config (differs in: "
                f"{', '.join(diff[:5])}{', ...' if len(diff) > 5 else ''}); "
                "use another --workdir, or rerun with the same config to resume"
            )
        report_path = os.path.join(workdir, "report.json")
        if os.path.exists(report_path):
            with open(report_path) as f:
                return json.load(f)
        return None
    if os.path.isdir(workdir) and os.listdir(workdir):
        raise UserError(f"workdir {workdir} is not empty and holds no admmprune run; use another --workdir")
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(config_path, comparable)
    return None


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys at which two JSON trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class MetricsLog:
    """Appends JSON lines; on resume, drops lines after the restored step."""

    def __init__(self, path: str, resume_step: int | None, *, enabled: bool = True):
        self.path, self._file = path, None
        if not enabled:  # another process than 0: it writes no files
            return
        if os.path.exists(path):
            keep = []
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by a crash
                        continue
                    if resume_step is not None and record.get("step", 0) <= resume_step:
                        keep.append(line if line.endswith("\n") else line + "\n")
            with open(path + ".tmp", "w") as f:
                f.writelines(keep)
            os.replace(path + ".tmp", path)
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def save_model_once(directory: str, model: nnx.Module) -> None:
    """Saves ``model`` to ``directory`` unless it is there; a crash leaves no partial directory."""
    if jax.process_index() != 0 or os.path.exists(directory):
        return
    tmp = f"{directory}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    checkpoint_lib.save_model(tmp, model)
    os.replace(tmp, directory)
