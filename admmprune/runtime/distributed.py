"""Data parallelism over every device of every process, on JAX's own runtime (L4).

No communication layer of its own: a ``jax.sharding.Mesh`` with one ``data``
axis over ``jax.devices()`` (all devices of all processes), batches sharded
along it, and jitted steps that declare their shardings, so XLA inserts the
gradient all-reduce (and, with FSDP, the parameter all-gathers). Several
processes (hosts) join through ``jax.distributed.initialize``; on CPU their
collectives go through gloo.

A run keeps its state in one of two forms:

- *global*: ``jax.Array`` s over the mesh (:meth:`DataParallel.put`), what the
  training steps and orbax's multi-process checkpoints take;
- *local*: whole arrays on this process's first device
  (:meth:`DataParallel.local`), identical on every process, what host-side work
  takes (evaluation, hard pruning, collapse, measurements). Every process does
  that work itself, so no result needs to be sent around.

On one device both forms are the same arrays, and a run computes exactly what
it did before data parallelism existed.

Examples:
    >>> dp = DataParallel(param_sharding="fsdp")  # doctest: +SKIP
    >>> params = dp.put(params)  # sharded along each leaf's largest divisible axis
    >>> batch = dp.batch(local_batch)  # this process's rows of the global batch
    >>> host_params = dp.local(params)  # whole arrays, for host-side work
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from admmprune._errors import UserError

__all__ = [
    "AXIS",
    "ENV",
    "PARAM_SHARDINGS",
    "DataParallel",
    "check_same",
    "initialize",
    "is_primary",
    "primary_first",
]

AXIS = "data"
"""The mesh axis that batches (and FSDP-sharded parameters) are split along."""

PARAM_SHARDINGS = ("replicated", "fsdp")
"""Values of ``config.distributed.param_sharding``."""

ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES", "process_id": "JAX_PROCESS_ID"}
"""The environment variables :func:`initialize` reads where a flag is missing.
JAX itself reads ``JAX_COORDINATOR_ADDRESS``; the other two are admmprune's."""

T = TypeVar("T")


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    timeout: int = 300,
    exit_on_timeout: bool = False,
) -> bool:
    """Joins this process to a multi-process run, if one is asked for.

    Call it before anything else touches JAX's devices. With none of the three
    settings (arguments or :data:`ENV` variables) and ``auto=False`` it does
    nothing: a single-process run over this process's devices. ``auto=True``
    without settings lets JAX detect the cluster (Cloud TPU pod slices, SLURM,
    Open MPI).

    Args:
        coordinator: ``host:port`` of process 0, which every process reaches.
        num_processes: How many processes take part.
        process_id: This process's index, in ``[0, num_processes)``.
        auto: Whether to let JAX detect the missing settings.
        timeout: Seconds to wait for every process to join.
        exit_on_timeout: What happens when they have not joined by then: JAX
            aborts the process from C++ (a fatal log line and SIGABRT, which no
            Python code can catch); with this flag, the process prints one
            ``error:`` line and exits with status 2 just before (command lines).

    Returns:
        Whether ``jax.distributed.initialize`` was called.

    Raises:
        UserError: the settings are incomplete or out of range, or the processes
            did not all join within ``timeout`` seconds.
    """
    settings = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    for key, var in ENV.items():
        if settings[key] is None and os.environ.get(var):
            settings[key] = os.environ[var]
    for key in ("num_processes", "process_id"):
        if settings[key] is not None:
            try:
                settings[key] = int(settings[key])
            except ValueError:
                raise UserError(f"{key.replace('_', ' ')} must be an integer, got {settings[key]!r}") from None
    given = [k for k, v in settings.items() if v is not None]
    if not given and not auto:
        return False
    if given and not auto and len(given) < 3:
        missing = [f"--{k.replace('_', '-')} (or {ENV[k]})" for k in settings if settings[k] is None]
        raise UserError(f"a multi-process run needs {' and '.join(missing)} as well")
    n, i = settings["num_processes"], settings["process_id"]
    if n is not None and n < 1:
        raise UserError(f"the number of processes must be positive, got {n}")
    if n is not None and i is not None and not 0 <= i < n:
        raise UserError(f"the process id must be in [0, {n}), got {i}")
    if settings["coordinator"] is not None and ":" not in settings["coordinator"]:
        raise UserError(f"the coordinator must be HOST:PORT, got {settings['coordinator']!r}")
    if not isinstance(timeout, int) or timeout < 1:
        raise UserError(f"the initialization timeout must be a positive number of seconds, got {timeout!r}")
    # CPU devices of different processes talk through gloo (the default, none,
    # cannot cross processes); GPUs and TPUs keep their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    where = settings["coordinator"] or "the detected coordinator"
    advice = (
        "start every process with the same --coordinator and --num-processes within the timeout, "
        "and check that the coordinator's address is reachable from every host"
    )
    joined = threading.Event()
    if exit_on_timeout:

        def watchdog():
            if not joined.wait(timeout):
                print(
                    f"error: the {n or 'detected'} processes did not all join the run at {where} within "
                    f"{timeout} s; {advice}",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(2)

        threading.Thread(target=watchdog, daemon=True).start()
    try:
        # JAX's own deadline comes later than the watchdog's, so that the
        # watchdog (when there is one) speaks first.
        jax.distributed.initialize(
            settings["coordinator"], n, i, initialization_timeout=timeout + (30 if exit_on_timeout else 0)
        )
    except (RuntimeError, ValueError) as e:  # jax's XlaRuntimeError is a RuntimeError
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not join the multi-process run at {where} ({detail}); {advice}") from None
    finally:
        joined.set()
    return True


def is_primary() -> bool:
    """Whether this is process 0, the one that writes reports, logs and models."""
    return jax.process_index() == 0


_MESSAGE_BYTES = 1024


def primary_first(fn: Callable[[], T]) -> T:
    """Runs ``fn`` on process 0, then on the others; a ``UserError`` stops all.

    For work that only process 0 may start (claiming a workdir): the others wait,
    then run ``fn`` too (they find what process 0 made). When process 0 raises a
    :class:`UserError`, every process raises it, instead of the others waiting
    for a process that has gone.
    """
    if jax.process_count() == 1:
        return fn()
    message, result = "", None
    if is_primary():
        try:
            result = fn()
        except UserError as e:
            message = str(e) or "failed"
    data = np.frombuffer(message.encode()[:_MESSAGE_BYTES].ljust(_MESSAGE_BYTES, b"\0"), np.uint8)
    message = bytes(multihost_utils.broadcast_one_to_all(data)).rstrip(b"\0").decode(errors="replace")
    if message:
        raise UserError(message)
    return result if is_primary() else fn()


def check_same(text: str, what: str) -> None:
    """Raises a ``UserError`` on every process unless ``text`` is the same on all."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest(), np.uint8)
    gathered = multihost_utils.process_allgather(digest)
    if not np.all(gathered == gathered[0]):
        raise UserError(f"the processes were started with different {what}; start them all with the same arguments")


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class DataParallel:
    """A one-axis device mesh and the shardings of a data-parallel run.

    Args:
        param_sharding: ``"replicated"`` (every device holds every parameter,
            optimizer and ADMM array) or ``"fsdp"`` (each array split along its
            largest axis that the device count divides; the others replicated).
        devices (Sequence[jax.Device] | None): The mesh's devices; None means all
            of them, of all processes.

    Raises:
        UserError: an unknown ``param_sharding``.
    """

    def __init__(self, *, param_sharding: str = "replicated", devices=None):
        if param_sharding not in PARAM_SHARDINGS:
            raise UserError(f"distributed.param_sharding must be one of {PARAM_SHARDINGS}, got {param_sharding!r}")
        self.param_sharding = param_sharding
        self.mesh = Mesh(np.asarray(jax.devices() if devices is None else devices), (AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.data = NamedSharding(self.mesh, P(AXIS))
        self._local_device = jax.local_devices()[0]

    @property
    def size(self) -> int:
        """The number of devices, of all processes."""
        return self.mesh.size

    def local_batch_size(self, batch_size: int) -> int:
        """This process's rows of a global batch of ``batch_size``.

        Raises:
            UserError: ``batch_size`` does not divide by the device count.
        """
        if batch_size % self.size:
            raise UserError(
                f"data.batch_size {batch_size} does not divide by the {self.size} devices "
                f"({jax.process_count()} process(es)); use a multiple of {self.size}"
            )
        return batch_size // jax.process_count()

    # --- shardings ------------------------------------------------------------

    def sharding(self, x) -> NamedSharding:
        """The sharding of one array (or shape-dtype struct) of the train state."""
        if self.param_sharding == "replicated" or self.size == 1 or not np.ndim(x) or _is_key(x):
            return self.replicated
        shape = np.shape(x)
        axes = [a for a in range(len(shape)) if shape[a] >= self.size and shape[a] % self.size == 0]
        if not axes:
            return self.replicated
        axis = max(axes, key=lambda a: (shape[a], -a))  # the largest; the first of equals
        return NamedSharding(self.mesh, P(*(AXIS if a == axis else None for a in range(len(shape)))))

    def shardings(self, tree: Any) -> Any:
        """:meth:`sharding` of every leaf of ``tree``."""
        return jax.tree.map(self.sharding, tree)

    def abstract(self, tree: Any) -> Any:
        """Shape-dtype structs with their shardings: an orbax restore target."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.sharding(x)), tree)

    # --- moving between the forms ---------------------------------------------

    def put(self, tree: Any) -> Any:
        """Global arrays over the mesh, sharded by :meth:`sharding`.

        Every process must pass the same values (the local form is).
        """
        return jax.tree.map(self._put, tree)

    def _put(self, x):
        sharding = self.sharding(x)
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        if _is_key(x):
            impl = jax.random.key_impl(x)
            return jax.random.wrap_key_data(self._put(jax.random.key_data(x)), impl=impl)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    def batch(self, local: Any) -> Any:
        """A global batch, sharded along :data:`AXIS`, from this process's rows."""
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.data, x), local)

    def local(self, tree: Any) -> Any:
        """Whole arrays on this process's first device, for host-side work."""
        return jax.tree.map(self._local, tree)

    def _local(self, x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_replicated:
            x = x.addressable_data(0)
        elif not x.is_fully_addressable:  # FSDP across processes: gather the shards
            if _is_key(x):
                impl = jax.random.key_impl(x)
                return jax.random.wrap_key_data(self._local(jax.random.key_data(x)), impl=impl)
            x = multihost_utils.process_allgather(x, tiled=True)
        return jax.device_put(x, self._local_device)
