import os
import tempfile

# One persistent XLA compilation cache for the whole run: both xdist workers
# and every command line or notebook they start (the environment is
# inherited) compile the same small programs over and over, and on CPU the
# compiles take more time than the steps. A fresh directory per run (the
# workers inherit the controller's environment). A size limit turns on the
# cache's file lock, so that a process never reads an entry another is
# writing; that lock also makes every write read the whole directory, so only
# compiles of 0.1 s or more are kept (some hundreds, not thousands: the smoke
# pipeline's second run takes 31 s instead of 47 s; with every compile kept,
# 24 s, but the suite slowed down).
os.environ.setdefault("ADMMPRUNE_TEST_RUN", str(os.getpid()))  # the controller's pid, inherited by the workers
_RUN = os.environ["ADMMPRUNE_TEST_RUN"]
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"admmprune-xla-{_RUN}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402 - after the cache's environment
import pytest  # noqa: E402

# Every test runs with strict dtype promotion: silent upcasts are bugs here.
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="session")
def data_dir():
    """One tfds data dir for the whole run, shared by the xdist workers: MNIST and
    Fashion-MNIST are prepared into it once, by whichever worker gets the lock first."""
    import filelock

    from admmprune.runtime import data

    path = os.path.join(tempfile.gettempdir(), f"admmprune-tfds-{_RUN}")
    os.makedirs(path, exist_ok=True)
    with filelock.FileLock(f"{path}.lock"):
        for name in ("mnist", "fashion_mnist"):
            data.dataset_info(name, path)  # prepares it offline unless it is there
    return path
