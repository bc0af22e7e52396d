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
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"admmprune-xla-{os.getpid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402 - after the cache's environment
import pytest  # noqa: E402

# Every test runs with strict dtype promotion: silent upcasts are bugs here.
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One tfds data dir per session: MNIST and Fashion-MNIST are prepared once."""
    return str(tmp_path_factory.mktemp("tfds"))
