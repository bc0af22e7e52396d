"""Checkpoints that describe themselves: arrays, data position and metadata.

The only module of admmprune that imports orbax. A checkpoint step holds three
items:

- ``state``: a pytree of jax/numpy arrays (params, optimizer and ADMM state),
- ``data_state``: where the data iterator is (``iterator.get_state()`` of a
  :func:`admmprune.runtime.data.make_loader` iterator), as JSON,
- ``metadata``: a JSON dict that says what the arrays are (architecture widths
  after collapse, phase and stage, the config), readable on its own so that the
  restore target can be built from it first.

Saving is atomic: orbax writes a step into a temporary directory and renames it
when complete, so a process killed mid-save leaves no step that
:meth:`Checkpointer.latest_step` would return; the leftover temporary directory
is removed the next time the directory is opened.

Examples:
    >>> ckpt = Checkpointer(workdir / "checkpoints")  # doctest: +SKIP
    >>> ckpt.save(step, state, data_state=it.get_state(), metadata={"widths": w})
    >>> meta = ckpt.restore_metadata()  # build the model from meta["widths"] ...
    >>> step, state, data_state, meta = ckpt.restore(jax.eval_shape(lambda: state))
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import reprlib
import sys
from typing import Any, NamedTuple, Self

import jax
import numpy as np
import orbax.checkpoint as ocp

from admmprune._errors import UserError

__all__ = ["Checkpointer", "Restored", "load_model", "save_model"]

_STATE = "state"
_DATA = "data_state"
_META = "metadata"


class Restored(NamedTuple):
    """One restored checkpoint step.

    Attributes:
        step: The step number.
        state: The pytree of arrays, with the target's structure, shapes and
            dtypes (and shardings, where the target gives them).
        data_state: The data iterator state as saved (None if none was saved).
        metadata: The metadata dict as saved (JSON round trip: tuples come back
            as lists).
    """

    step: int
    state: Any
    data_state: Any
    metadata: dict[str, Any]


# What the file system says when it cannot take a checkpoint: the user's
# environment, not a bug (tensorstore reports them in the message's text).
_NO_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
_NO_WRITE_TEXT = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "No space left", "Read-only file system")
_NO_WRITE_REASONS = ("No space left on device", "Disk quota exceeded", "Read-only file system", "Permission denied")


def _one_line(e: BaseException, limit: int = 240) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0].split(" See full TensorStore details")[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _DropOrbaxErrors(logging.Filter):
    """Drops orbax's own logging of an error it also raises (a traceback of
    hundreds of lines on stderr), while the caller turns the error into one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in record.pathname)


class _DropAbandonedOrbaxTasks(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" for orbax's own
    read tasks: when one array read fails, orbax raises that error (reported in
    one line) and leaves the reads that fail after it unretrieved, which asyncio
    logs with their traceback when they are collected."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Task exception was never retrieved") and f"{os.sep}orbax{os.sep}" in message)


# What tensorstore's callbacks raise when they finish the writes or reads of
# an operation orbax gave up on (its first error ends it), into event loops
# orbax has closed by then, or at interpreter exit.
_STRAY_CALLBACK_ERRORS = ("Event loop is closed", "cannot schedule new futures after interpreter shutdown")


def _ignore_stray_callbacks() -> None:
    """Keeps those callbacks' errors from printing tracebacks after the error's one line.

    Python reports them through ``sys.unraisablehook`` or, from a native
    thread's callback, ``sys.excepthook``; this chains hooks that drop only
    them, and orbax's own read coroutines that the same failure left behind
    (their error is the one already reported), once per process. asyncio logs
    those coroutines' tasks ("Task exception was never retrieved") when they
    are collected; a filter on its logger drops those records too.
    """

    def stray(e) -> bool:
        return isinstance(e, RuntimeError) and str(e) in _STRAY_CALLBACK_ERRORS

    previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook
    if not getattr(previous_unraisable, "_drops_stray_callbacks", False):

        def unraisable_hook(unraisable):
            # Also the other reads of an operation orbax gave up on: coroutines of
            # its own that end in the same error after it (reported already, in one line).
            code = getattr(unraisable.object, "cr_code", None)
            abandoned = code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename
            if not (stray(unraisable.exc_value) or abandoned):
                previous_unraisable(unraisable)

        unraisable_hook._drops_stray_callbacks = True
        sys.unraisablehook = unraisable_hook
    if not getattr(previous_except, "_drops_stray_callbacks", False):

        def except_hook(exc_type, exc_value, tb):
            if not stray(exc_value):
                previous_except(exc_type, exc_value, tb)

        except_hook._drops_stray_callbacks = True
        sys.excepthook = except_hook
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedOrbaxTasks) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropAbandonedOrbaxTasks())


@contextlib.contextmanager
def _orbax_errors_raised_not_logged():
    logger, drop = logging.getLogger("absl"), _DropOrbaxErrors()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class Checkpointer:
    """Saves and restores numbered checkpoint steps in one directory.

    A thin wrapper over ``orbax.checkpoint.CheckpointManager``. Use it as a
    context manager, or call :meth:`close`, so that a pending save finishes.
    Every process of a multi-process run must make the same calls.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 2,
        async_save: bool = False,
        this_process_only: bool = False,
    ):
        """Opens (creating if needed) a checkpoint directory.

        Args:
            directory: Where the steps live, one subdirectory per step.
            max_to_keep: How many of the most recent steps to keep; None keeps all.
            async_save: Whether :meth:`save` returns while the arrays are still
                being written (call :meth:`wait` or :meth:`close` before relying
                on them). Synchronous by default.
            this_process_only: Whether this process alone uses the directory
                (in a multi-process run, the others make no matching calls): it
                must then save host arrays (numpy), not global ``jax.Array`` s.

        Raises:
            UserError: ``max_to_keep`` is not a positive integer or None.
        """
        if max_to_keep is not None and (not isinstance(max_to_keep, int) or max_to_keep <= 0):
            raise UserError(f"max_to_keep must be a positive integer or None, got {max_to_keep!r}")
        self._directory = os.path.abspath(os.fspath(directory))
        # Before any operation: the callbacks race the error that ends it.
        _ignore_stray_callbacks()
        multiprocessing = {}
        if this_process_only and jax.process_count() > 1:
            me = jax.process_index()
            multiprocessing["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}
            )
            os.makedirs(self._directory, exist_ok=True)  # orbax cannot create it for a subset of processes
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=not multiprocessing,
            # Removes what a process killed mid-save left behind.
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            **multiprocessing,
        )
        self._manager = ocp.CheckpointManager(self._directory, options=options, item_names=(_STATE, _DATA, _META))

    @property
    def directory(self) -> str:
        """The absolute path of the checkpoint directory."""
        return self._directory

    def save(
        self,
        step: int,
        state: Any,
        *,
        data_state: Any = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        """Saves one step, atomically, then drops steps beyond ``max_to_keep``.

        Args:
            step: The step number; must be larger than every saved step.
            state: A pytree of jax or numpy arrays.
            data_state: The data iterator's state; anything JSON can encode.
            metadata: A JSON-encodable dict that describes ``state``.

        Raises:
            UserError: ``step`` is negative or not after the latest saved step,
                or the file system refuses the write (full, read-only, not
                permitted); nothing of the step is left to be picked up.
        """
        if not isinstance(step, int) or step < 0:
            raise UserError(f"checkpoint step must be a non-negative integer, got {step!r}")
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            raise UserError(
                f"cannot save step {step} in {self._directory}: step {latest} is already "
                "there; resume from it or use an empty directory"
            )
        try:
            with _orbax_errors_raised_not_logged():
                self._manager.save(
                    step,
                    args=ocp.args.Composite(
                        **{
                            _STATE: ocp.args.StandardSave(state),
                            _DATA: ocp.args.JsonSave(data_state),
                            _META: ocp.args.JsonSave(dict(metadata or {})),
                        }
                    ),
                )
        except Exception as e:
            code = getattr(e, "errno", None)
            if code in _NO_WRITE_ERRNOS or any(t in str(e) for t in _NO_WRITE_TEXT):
                reasons = [r for r in _NO_WRITE_REASONS if r in str(e)]
                reason = os.strerror(code) if code in _NO_WRITE_ERRNOS else (reasons or [_one_line(e)])[0]
                raise UserError(
                    f"cannot write checkpoint step {step} in {self._directory}: {reason}; "
                    "free space there (or make it writable) and rerun the same command to resume"
                ) from None
            raise

    def wait(self) -> None:
        """Blocks until a pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def latest_step(self) -> int | None:
        """Returns the newest complete step, or None if there is none."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Returns the complete steps on disk, oldest first."""
        return sorted(self._manager.all_steps())

    def _step(self, step: int | None) -> int:
        if step is None:
            step = self._manager.latest_step()
            if step is None:
                raise UserError(f"no checkpoint in {self._directory}: train first or pick a workdir")
        elif step not in self._manager.all_steps():
            raise UserError(f"no checkpoint step {step} in {self._directory}; steps there: {self.all_steps()}")
        return step

    def restore_metadata(self, step: int | None = None) -> dict[str, Any]:
        """Reads only the metadata of a step, without touching its arrays.

        Args:
            step: The step; None means the latest.

        Returns:
            The metadata dict as saved.

        Raises:
            UserError: there is no such step, or its metadata cannot be read
                (a damaged file).
        """
        step = self._step(step)
        try:
            with _orbax_errors_raised_not_logged():
                restored = self._manager.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
        except Exception as e:
            raise UserError(
                f"checkpoint step {step} in {self._directory} is damaged: its metadata cannot be read ({_one_line(e)})"
            ) from None
        return restored[_META]

    def restore(self, target: Any, step: int | None = None) -> Restored:
        """Restores a step into the structure of ``target``.

        Args:
            target: A pytree with the structure, shapes and dtypes of the saved
                state: concrete arrays, or abstract ones such as
                ``jax.eval_shape`` returns (``jax.ShapeDtypeStruct`` leaves, with
                a ``sharding`` to restore onto specific devices).
            step: The step; None means the latest.

        Returns:
            A :class:`Restored` ``(step, state, data_state, metadata)``.

        Raises:
            UserError: there is no such step, the saved arrays do not match
                ``target`` (e.g. a different architecture), or the step's
                files are damaged (the message says which).
        """
        step = self._step(step)
        try:
            with _orbax_errors_raised_not_logged():
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        **{
                            _STATE: ocp.args.StandardRestore(target),
                            _DATA: ocp.args.JsonRestore(),
                            _META: ocp.args.JsonRestore(),
                        }
                    ),
                )
        except Exception as e:
            detail = _one_line(e)
            # tensorstore's errors start with a status (DATA_LOSS: ...): a file is damaged.
            damaged = not isinstance(e, ValueError) or isinstance(e, json.JSONDecodeError)
            if not damaged and not detail.split(":")[0].isupper():
                raise UserError(
                    f"checkpoint step {step} in {self._directory} does not match the model to "
                    f"restore into ({detail}); build the model from restore_metadata() first"
                ) from None
            raise UserError(f"checkpoint step {step} in {self._directory} is damaged ({detail})") from None
        return Restored(step, restored[_STATE], restored[_DATA], restored[_META])

    def set_aside(self, step: int) -> str:
        """Renames a step that cannot be restored to ``<step>.damaged`` (or
        ``.damaged-2``, ...), which is no step, so that the previous one is the
        latest; nothing is deleted. Every process calls it; process 0 renames.

        Returns:
            The new path of the step's directory.
        """
        old = os.path.join(self._directory, str(step))
        new, n = f"{old}.damaged", 1
        while os.path.exists(new):
            n += 1
            new = f"{old}.damaged-{n}"
        if jax.process_index() == 0:
            os.rename(old, new)
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"admmprune_set_aside_{step}")
        self._manager.reload()
        return new

    def close(self) -> None:
        """Waits for a pending save and releases the manager (and its threads,
        which would otherwise print errors of their own at interpreter exit)."""
        with _orbax_errors_raised_not_logged():
            self._manager.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# --------------------------------------------------------------------------
# Whole models: arrays plus the architecture that gives them their shapes.


_MODEL_FORMAT = "admmprune.model/1"
# What orbax, tensorstore and json raise on a damaged, truncated or missing file
# of a saved model: its files are the user's input, like a command line.
_DAMAGED = (ValueError, KeyError, TypeError, OSError)
_RESAVE = "save the model again with admmprune.save_model (or give another directory)"


def _first_line(e: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    return detail if len(detail) <= limit else detail[: limit - 3] + "..."


def _class_path(model: Any) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)


def _savable(state: Any) -> Any:
    """The state with random keys (a Dropout's ``rngs``) as their raw uint32 data: orbax saves plain arrays."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _unsaved(target: Any) -> Any:
    """The abstract ``target`` as :func:`_savable` saves it (a key's shape gains its data's trailing axis)."""
    return jax.tree.map(lambda x: jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x, target)


def _key_impls(state: Any) -> dict[str, str]:
    """The implementation (e.g. ``threefry2x32``) of each random key in ``state``, by path: saved in the metadata."""
    return {_path(p): str(jax.random.key_impl(x)) for p, x in _flat(state) if _is_key(x)}


def _rewrap(arrays: Any, impls: dict[str, str]) -> Any:
    """Turns the saved raw data of random keys back into keys of their implementation."""

    def one(path, x):
        impl = impls.get(_path(path))
        return x if impl is None else jax.random.wrap_key_data(x, impl=impl)

    return jax.tree_util.tree_map_with_path(one, arrays)


def save_model(directory: str | os.PathLike, model: Any) -> None:
    """Saves an NNX model, for :func:`load_model`: its arrays and what rebuilds its architecture.

    The arrays (parameters and other state, e.g. BatchNorm statistics, random
    keys as their raw data) go to an orbax checkpoint, the rest to its JSON
    metadata. No pickle. For a model of :mod:`admmprune.models` the metadata
    holds its registry name and constructor arguments (the slim widths of a
    collapsed model included), and :func:`load_model` needs nothing else. For
    any other NNX model (a user's, collapsed or not) it holds the class's
    import path only as a reminder, and :func:`load_model` needs ``like=``,
    the user's constructor. In a multi-process run, the calling process
    saves it alone.

    Args:
        directory: A new or empty directory.
        model: An ``nnx.Module``.

    Raises:
        UserError: ``model`` is not an NNX module, or the directory holds
            something else (or is a file).
    """
    from flax import nnx

    from admmprune import models

    if not isinstance(model, nnx.Module):
        raise UserError(
            f"save_model saves NNX modules, not {type(model).__name__}; a Linen model's params are a pytree: "
            "save them with orbax (admmprune.runtime.checkpoint.Checkpointer)"
        )
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"{directory} is a file; save the model to a new directory")
    if os.path.isdir(directory) and os.listdir(directory):
        raise UserError(f"{directory} is not empty; save the model to a new directory")
    if type(model) in map(models.get_class, models.names()):
        meta = {"format": _MODEL_FORMAT, "model": models.name_of(model), "config": model.config}
    else:
        meta = {"format": _MODEL_FORMAT, "model": None, "class": _class_path(model)}
    state = nnx.to_pure_dict(nnx.state(model))
    meta["random_keys"] = _key_impls(state)
    state = _savable(state)
    if jax.process_count() > 1:  # only host arrays can be saved by one process of several
        state = jax.tree.map(np.asarray, state)
    with Checkpointer(directory, max_to_keep=1, this_process_only=True) as ckpt:
        ckpt.save(0, state, metadata=meta)


def _model_spec(meta: Any, directory: str, where: str) -> tuple[str | None, dict[str, Any]]:
    """``(registry name, constructor arguments)`` from a saved model's metadata, checked
    (``(None, {})`` for a model that is not admmprune's).

    Only looks names up in the model registry: nothing named in ``meta`` is
    imported or called.
    """
    from admmprune import models

    if not isinstance(meta, dict):
        raise UserError(f"{where} is damaged (a JSON {type(meta).__name__}, not an object); {_RESAVE}")
    if meta.get("format") != _MODEL_FORMAT:
        raise UserError(
            f"{directory} holds a checkpoint, not a model saved by "
            f"admmprune.save_model (format {reprlib.repr(meta.get('format'))} in {where}); give a model directory"
        )
    name = meta.get("model")
    if name is None and "model" in meta:  # a model of the user's: load_model needs like=
        return None, {}
    if not isinstance(name, str):
        raise UserError(f"{where} is damaged (its 'model' is {reprlib.repr(name)}, not a model name); {_RESAVE}")
    if "config" not in meta:
        raise UserError(f"{where} is damaged (it has no 'config'); {_RESAVE}")
    try:
        return name, models.check_config(name, meta["config"])
    except UserError as e:
        raise UserError(f"{where} is damaged ({e}); {_RESAVE}") from None


def _flat(tree: Any) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _path(keys: Any) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in keys)


class _ModelReader:
    """Reads a saved model's checkpoint without changing its directory.

    Read-only: unlike :class:`Checkpointer` it creates nothing and cleans up
    nothing, so it starts no background thread that could outlive an error
    (orbax's clean-up of temporary directories, which runs on a thread of its
    own, printed a second traceback at interpreter shutdown).
    """

    def __init__(self, directory: str):
        self.directory = directory
        # Not orbax's read_only, which logs two warnings on every open.
        options = ocp.CheckpointManagerOptions(create=False, cleanup_tmp_directories=False)
        handlers = {_STATE: ocp.StandardCheckpointHandler(), _DATA: ocp.JsonCheckpointHandler()}
        handlers[_META] = ocp.JsonCheckpointHandler()
        self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self._manager.close()

    def check_arrays(self, step: int, target: Any) -> None:
        """Compares the saved arrays' names, shapes and dtypes with ``target`` before reading any.

        orbax reads all arrays at once and, when one read fails, leaves the
        others running on an event loop it has closed: they print tracebacks
        later, at interpreter shutdown. A mismatch found here reads nothing.
        """
        where = os.path.join(self.directory, str(step), _STATE)
        saved = self.saved_shapes(step)
        wanted = {_path(p): (tuple(a.shape), np.dtype(a.dtype)) for p, a in _flat(target)}
        for name in sorted(wanted.keys() | saved.keys()):
            if name not in saved:
                problem = f"has no array {name}"
            elif name not in wanted:
                problem = f"has an array {name} that the model does not have"
            elif saved[name] != wanted[name]:
                (shape, dtype), (want_shape, want_dtype) = saved[name], wanted[name]
                problem = f"has {name} of shape {shape} {dtype}, where the model needs {want_shape} {want_dtype}"
            else:
                continue
            raise UserError(f"{where} {problem}, so it does not fit the model its metadata describes; {_RESAVE}")

    def saved_shapes(self, step: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Each saved array's ``(shape, dtype)`` by its path (``"blocks/0/kernel"``), from the metadata alone."""
        try:
            saved = self._manager.item_metadata(step)[_STATE]
            return {_path(p): (tuple(a.shape), np.dtype(a.dtype)) for p, a in _flat(saved.tree)}
        except Exception as e:  # noqa: BLE001 - as in item(): orbax raises what it meets
            where = os.path.join(self.directory, str(step), _STATE)
            raise UserError(f"{where} is damaged ({_first_line(e)}); {_RESAVE}") from None

    def step(self) -> int:
        try:
            step = self._manager.latest_step()
        except _DAMAGED as e:
            raise UserError(f"{self.directory} cannot be read ({_first_line(e)}); {_RESAVE}") from None
        if step is None:
            raise UserError(
                f"{self.directory} is not a model saved by admmprune (save_model): it holds no checkpoint; "
                "give the directory save_model wrote (e.g. WORKDIR/model or WORKDIR/dense)"
            )
        return step

    def item(self, step: int, name: str, args: Any) -> Any:
        where = os.path.join(self.directory, str(step), name)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise even bare Exception on a damaged file
            problem = "is damaged or does not fit the model its metadata describes" if name == _STATE else "is damaged"
            raise UserError(f"{where} {problem} ({_first_line(e)}); {_RESAVE}") from None


def _shaped_like(saved: dict[str, tuple[tuple[int, ...], np.dtype]], target: Any) -> Any:
    """``target`` (a pure dict of abstract arrays) with each array's shape and dtype as saved
    (random keys, and paths that were not saved, as they are)."""

    def one(path, t):
        got = saved.get(_path(path))
        return t if got is None or _is_key(t) else jax.ShapeDtypeStruct(*got)

    return jax.tree_util.tree_map_with_path(one, target)


def _reshaped(abstract: Any, reader: _ModelReader, step: int, what: str) -> Any:
    """``abstract`` with the saved arrays' shapes (a collapsed model's widths; see :func:`load_model`)."""
    from flax import nnx

    from admmprune.structure.collapse import reshaped

    try:
        return reshaped(abstract, _shaped_like(reader.saved_shapes(step), nnx.to_pure_dict(nnx.state(abstract))))
    except ValueError as e:
        raise UserError(f"{reader.directory} does not fit {what} ({_first_line(e)})") from None


def _abstract(like: Any, directory: str) -> Any:
    """The abstract model ``like`` gives: a module, or a function that builds one (run under ``nnx.eval_shape``)."""
    from flax import nnx

    if isinstance(like, nnx.Module):
        return like
    if not callable(like):
        raise UserError(f"like= takes an NNX module or a function that builds one, not {type(like).__name__}")
    try:
        model = nnx.eval_shape(like)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's constructor may raise anything
        raise UserError(f"like= failed to build the model for {directory} ({_first_line(e)})") from None
    if not isinstance(model, nnx.Module):
        raise UserError(f"like= built a {type(model).__name__}, not an NNX module")
    return model


def load_model(directory: str | os.PathLike, like: Any = None) -> Any:
    """Rebuilds a model saved by :func:`save_model`, without rerunning anything.

    A model of :mod:`admmprune.models` needs only its directory: its metadata
    is checked first (:func:`admmprune.models.check_config`), only registered
    model names and their constructors' own arguments are used, and nothing
    named in the metadata is imported or called. Any other NNX model needs
    ``like``, its architecture as the user's code builds it. A collapsed
    model loads from its *dense* constructor: the saved arrays' shapes give
    its widths, and its Flax layers' sizes are set from them as
    :func:`~admmprune.structure.collapse.collapse` sets them
    (:func:`admmprune.structure.collapse.reshaped`). The architecture is built
    with ``nnx.eval_shape`` (no initialization), then filled with the saved
    arrays. The directory is only read.

    Args:
        directory: what :func:`save_model` wrote.
        like: for a model that is not admmprune's (or to override the
            metadata): a function that builds it, called with no arguments,
            e.g. ``lambda: GPT(config, rngs=nnx.Rngs(0))``, or such a module.

    Raises:
        UserError: the directory does not exist or holds no saved model, the
            saved model's files are damaged (the message names the file), a
            user's model is loaded without ``like``, or the saved arrays do not
            fit ``like``'s model (the message names the first that does not).

    Examples:
      >>> save_model("small", collapse(model, masks, found))
      >>> small = load_model("small", like=lambda: MyModel(rngs=nnx.Rngs(0)))
    """
    _ignore_stray_callbacks()  # orbax's reads of a damaged array may outlive its error
    from flax import nnx

    from admmprune import models

    directory = os.path.abspath(os.fspath(directory))
    if not os.path.exists(directory):
        raise UserError(f"no saved model in {directory}: the directory does not exist")
    if not os.path.isdir(directory):
        raise UserError(f"{directory} is a file, not a model saved by admmprune (save_model): give its directory")
    with _ModelReader(directory) as reader:
        step = reader.step()
        where = os.path.join(directory, str(step), _META)
        meta = reader.item(step, _META, ocp.args.JsonRestore())
        name, config = _model_spec(meta, directory, where)
        if like is not None:
            abstract = _reshaped(_abstract(like, directory), reader, step, "the model like= builds")
        elif name is None:
            raise UserError(
                f"{directory} holds a model that is not admmprune's ({meta.get('class', 'a user class')}); "
                "load it with load_model(directory, like=...), giving the function that builds it "
                "(its dense constructor if it was collapsed), or on the command line --like MODULE:FUNCTION"
            )
        else:
            try:
                abstract = nnx.eval_shape(lambda: models.get(name, **config, rngs=nnx.Rngs(0)))
            except UserError as e:
                raise UserError(f"{where} is damaged ({e}); {_RESAVE}") from None
            except (TypeError, ValueError, OverflowError) as e:  # a value the checked types let through
                raise UserError(f"{where} is damaged (model {name!r}: {_first_line(e)}); {_RESAVE}") from None
            if not hasattr(abstract, "widths_arg"):  # its config holds the dense widths (say, a transformer's heads)
                abstract = _reshaped(abstract, reader, step, f"{name} as its metadata describes it")
        target = nnx.to_pure_dict(nnx.state(abstract))
        reader.check_arrays(step, _unsaved(target))
        arrays = reader.item(step, _STATE, ocp.args.StandardRestore(_unsaved(target)))
        impls = meta.get("random_keys") or {}
        if not isinstance(impls, dict) or not all(isinstance(v, str) for v in impls.values()):
            raise UserError(f"{where} is damaged (its 'random_keys' is not an object of names); {_RESAVE}")
        try:
            arrays = _rewrap(arrays, impls)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where} is damaged (random keys: {_first_line(e)}); {_RESAVE}") from None
    state = nnx.state(abstract)
    nnx.replace_by_pure_dict(state, arrays)
    nnx.update(abstract, state)
    return abstract
