import jax
import pytest

# Every test runs with strict dtype promotion: silent upcasts are bugs here.
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """One tfds data dir per session: MNIST and Fashion-MNIST are prepared once."""
    return str(tmp_path_factory.mktemp("tfds"))
