"""The run's directory: claiming and locking it, atomic JSON, the metrics log, saved models."""

from __future__ import annotations

import datetime
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from admmprune._errors import ENVIRONMENT_ERRNOS, UserError
from admmprune.app.pipeline._config import RUNTIME_KEYS
from admmprune.runtime import checkpoint as checkpoint_lib

LOCK = ".lock"
# What a process killed mid-write leaves: removed when the workdir is claimed (locked).
_LEFTOVERS = ("dense.tmp-*", "model.tmp-*", "report.json.tmp-*", "config.json.tmp-*", "metrics.jsonl.tmp")
# What shows a run got past its start: a workdir without them may change its config.
_STARTED = ("dense", "model", "report.json")


def write_json_atomic(path: str, obj: Any) -> None:
    """Writes ``obj`` as JSON to ``path`` through a temporary file: never half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def io_error(e: OSError, what: str) -> UserError:
    """One line for an ``OSError`` the environment caused while doing ``what``."""
    where = f" ({e.filename})" if e.filename else ""
    fix = {
        errno.ENOSPC: "free space there",
        errno.EDQUOT: "free space there",
        errno.EROFS: "use a writable --workdir",
    }.get(e.errno, "fix the path or its permissions, or use another --workdir")
    return UserError(f"cannot {what}: {e.strerror}{where}; {fix}, then rerun the same command")


class WorkdirLock:
    """An exclusive lock on a workdir (``WORKDIR/.lock``): one process runs in it at a time.

    ``flock`` on the open file: the kernel releases it when the holder dies,
    however it dies, so a lock left by a killed run is taken over (with a note)
    and a live one is refused at once with its holder's pid and host.
    """

    def __init__(self, path: str, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, workdir: str, log: Callable[[str], None]) -> WorkdirLock:
        """Takes the lock or raises a ``UserError`` naming who holds it."""
        path = os.path.join(workdir, LOCK)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                if e.errno not in ENVIRONMENT_ERRNOS:
                    raise
                raise io_error(e, f"write to workdir {workdir}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(_read_lock(fd))
                os.close(fd)
                raise UserError(
                    f"workdir {workdir} is in use by {holder}; wait for that run to end "
                    "(or stop it), or use another --workdir"
                ) from None
            # A holder that was ending may have removed the file we opened: lock the one at path.
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_lock(fd)
        if previous is not None:
            log(f"note: took over the lock of {_holder(previous)} on {workdir}: that process is not running")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            if e.errno not in ENVIRONMENT_ERRNOS:
                raise
            raise io_error(e, f"write to workdir {workdir}") from None
        return cls(path, fd)

    def release(self) -> None:
        """Removes the lock file, then lets go (a waiter that opened it retries)."""
        if self._fd is None:
            return
        try:
            os.remove(self.path)
        except OSError:
            pass  # the lock itself goes with the descriptor
        os.close(self._fd)
        self._fd = None


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _read_lock(fd: int) -> dict[str, Any] | None:
    data = os.pread(fd, 4096, 0)
    if not data.strip():
        return None
    try:
        record = json.loads(data)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _holder(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process"
    return f"pid {record.get('pid', '?')} on host {record.get('host', '?')} (since {record.get('started', '?')})"


def _read_json(path: str, what: str, fix: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged (not JSON: {e}); {fix}") from None
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise io_error(e, f"read {what}") from None


def _inspect(comparable: dict[str, Any], workdir: str) -> tuple[str, Any]:
    """What the workdir holds: ``("finished", report)``, ``("resume", None)``,
    ``("new", None)`` or ``("restart", None)`` (another config's run that never
    reached a checkpoint).

    Raises:
      UserError: the workdir holds another run, other files, a damaged file,
        or lies below a file.
    """
    parent = workdir
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        what = "exists and is not a directory" if parent == workdir else f"cannot be made: {parent} is a file"
        raise UserError(f"workdir {workdir} {what}; use another --workdir")
    if parent != workdir:
        return "new", None
    config_path = os.path.join(workdir, "config.json")
    if not os.path.exists(config_path):
        if [f for f in os.listdir(workdir) if f != LOCK]:
            raise UserError(f"workdir {workdir} is not empty and holds no admmprune run; use another --workdir")
        return "new", None
    fix = f"it should hold this run's config as a JSON object: delete {workdir} to start over, or use another --workdir"
    saved = _read_json(config_path, "the run's config", fix)
    if not isinstance(saved, dict):
        raise UserError(f"{config_path} is damaged (a JSON {type(saved).__name__}, not an object); {fix}")
    saved = {k: v for k, v in saved.items() if k not in RUNTIME_KEYS}
    if saved != comparable:
        if not _started(workdir):
            return "restart", None
        diff = sorted(diff_keys(saved, comparable))
        raise UserError(
            f"workdir {workdir} holds a run with a different config (differs in: "
            f"{', '.join(diff[:5])}{', ...' if len(diff) > 5 else ''}); "
            "use another --workdir, or rerun with the same config to resume"
        )
    report_path = os.path.join(workdir, "report.json")
    if os.path.exists(report_path):
        fix = "delete it and rerun the same command to write it again from the last checkpoint"
        report = _read_json(report_path, "the run's report", fix)
        if not isinstance(report, dict):
            raise UserError(f"{report_path} is damaged (a JSON {type(report).__name__}, not an object); {fix}")
        return "finished", report
    return "resume", None


def _started(workdir: str) -> bool:
    """Whether the run in ``workdir`` wrote a checkpoint (or more)."""
    if any(os.path.exists(os.path.join(workdir, f)) for f in _STARTED):
        return True
    ckpt_dir = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt_dir) and any(d.isdigit() or ".damaged" in d for d in os.listdir(ckpt_dir))


def claim(
    comparable: dict[str, Any], workdir: str, *, log: Callable[[str], None], lock: bool = True
) -> tuple[dict[str, Any] | None, WorkdirLock | None]:
    """Checks the workdir holds this run or none, locks and claims it.

    A finished run's workdir is only read. Otherwise the lock is taken first
    (with ``lock``: process 0 of a run), what killed runs left behind is
    removed, and the config is recorded. A workdir whose run never reached its
    first checkpoint may be claimed by another config (what a corrected
    command line does after a run that failed at its start).

    Args:
      comparable: the run's config as JSON, without its runtime fields.
      workdir: the run's directory.
      log: where a note goes (a lock taken over, a config replaced).
      lock: whether to lock the workdir.

    Returns:
      ``(report, None)`` for a finished run; else ``(None, lock)``, the lock
      (None without ``lock``) to :meth:`WorkdirLock.release` when the run ends.

    Raises:
      UserError: if the workdir holds another run or other files, is in use,
        is damaged or cannot be written.
    """
    state, report = _inspect(comparable, workdir)
    if state == "finished":
        return report, None
    created = not os.path.exists(workdir)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        if e.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise io_error(e, f"create workdir {workdir}") from None
    held = None
    try:
        if lock:
            held = WorkdirLock.acquire(workdir, log)
        state, report = _inspect(comparable, workdir)  # again, under the lock
        if state == "finished":  # another process finished it meanwhile
            if held is not None:
                held.release()
            return report, None
        if held is not None:
            _remove_leftovers(workdir)
        if state == "restart":
            log(f"note: {workdir} held another config's run that never reached a checkpoint; replaced by this one")
        if state in ("new", "restart"):
            write_json_atomic(os.path.join(workdir, "config.json"), comparable)
    except BaseException:
        if held is not None:
            held.release()
        if created and os.path.isdir(workdir) and not os.listdir(workdir):
            os.rmdir(workdir)
        raise
    return None, held


def _remove_leftovers(workdir: str) -> None:
    for pattern in _LEFTOVERS:
        for path in glob.glob(os.path.join(glob.escape(workdir), pattern)):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """The dotted keys at which two JSON trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


class MetricsLog:
    """Appends JSON lines; on resume, drops lines after the restored step.

    A last line cut short (a crash mid-write) is dropped. A line that is not a
    JSON record anywhere else means the file was damaged from outside: it is
    dropped too, but the file as it was is kept as ``metrics.jsonl.damaged``
    and a note says so, so that no history is lost without a word.
    """

    def __init__(
        self,
        path: str,
        resume_step: int | None,
        *,
        enabled: bool = True,
        log: Callable[[str], None] | None = None,
    ):
        self.path, self._file = path, None
        if not enabled:  # another process than 0: it writes no files
            return
        if os.path.exists(path):
            with open(path, "rb") as f:
                lines = f.read().decode(errors="replace").splitlines(keepends=True)
            keep, bad = [], []
            for n, line in enumerate(lines, 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    if n < len(lines) or line.endswith("\n"):  # not merely a last line cut by a crash
                        bad.append(n)
                    continue
                if resume_step is not None and record.get("step", 0) <= resume_step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            if bad:
                copy = _free_name(path + ".damaged")
                shutil.copyfile(path, copy)
                (log or print)(
                    f"note: {path} line{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad[:5]))}"
                    f"{', ...' if len(bad) > 5 else ''} not a JSON record: dropped; the file as it was is in {copy}"
                )
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
            self._file = None


def _free_name(path: str) -> str:
    new, n = path, 1
    while os.path.exists(new):
        n += 1
        new = f"{path}-{n}"
    return new


def save_model_once(directory: str, model: nnx.Module) -> None:
    """Saves ``model`` to ``directory`` unless it is there; a crash leaves no partial directory."""
    if jax.process_index() != 0 or os.path.exists(directory):
        return
    tmp = f"{directory}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    try:
        checkpoint_lib.save_model(tmp, model)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.replace(tmp, directory)
