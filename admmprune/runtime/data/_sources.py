"""Finding, preparing and opening tfds datasets offline, and reading them into memory."""

from __future__ import annotations

import os
import types
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from admmprune._errors import UserError
from admmprune.runtime.data._offline import OFFLINE_BUILDERS, prepare_offline

NORMALIZATION: Mapping[str, tuple[tuple[float, ...], tuple[float, ...]]] = types.MappingProxyType(
    {
        "mnist": ((0.1307,), (0.3081,)),
        "fashion_mnist": ((0.2860,), (0.3530,)),
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
        "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    }
)
"""Per-channel ``(mean, std)`` of the training split, on pixels scaled to [0, 1]."""

# Splits whose decoded images take at most this many bytes are read into memory
# once: decoding one PNG per example through the data source costs ~170 us, which
# would make an MNIST epoch take ~10 s instead of well under one.
_IN_MEMORY_MAX_BYTES = 1 << 30
_READ_CHUNK = 4096


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
            f"unknown dataset {name!r}: use a tfds dataset name such as 'mnist', 'fashion_mnist' or 'cifar10'"
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
    offline = OFFLINE_BUILDERS.get(builder.name)
    if (
        not builder.is_prepared()
        and offline is not None
        and builder.builder_config is None
        and builder.version == offline.VERSION
    ):
        prepare_offline(builder.name, data_dir)
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

    A dataset is either of images with class labels or of token windows
    (``shakespeare_chars``): examples of ``seq_len + 1`` token ids, of which a
    model reads the first ``seq_len`` and predicts each next one.

    Attributes:
        name: The tfds name of the dataset.
        num_classes: Number of classes of the ``label`` feature; of a token
            dataset, the vocabulary size.
        image_shape: ``(height, width, channels)`` of the ``image`` feature; of
            a token dataset, ``(seq_len,)``: the shape of one model input.
        splits: Number of examples in each split.
        mean: Per-channel mean of the pixels scaled to [0, 1], or None if unknown
            (and for tokens).
        std: Per-channel standard deviation, or None if unknown (and for tokens).
        vocabulary: Of a character-level token dataset, the characters of the
            token ids ``0 .. num_classes - 1``; None for images.
    """

    name: str
    num_classes: int
    image_shape: tuple[int, ...]
    splits: Mapping[str, int]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    vocabulary: str | None = None

    @property
    def tokens(self) -> bool:
        """Whether the examples are token windows (and batches ``{"tokens", "label"}``)."""
        return self.vocabulary is not None


def _check_features(name: str, builder) -> str | None:
    """Checks that ``builder``'s dataset is one admmprune reads; returns its
    vocabulary if it is a token dataset, None if it is of images."""
    features = builder.info.features
    keys = set(features.keys()) if hasattr(features, "keys") else set()
    vocabulary = getattr(type(builder), "VOCABULARY", None)
    if "tokens" in keys and isinstance(vocabulary, str) and vocabulary:
        shape, dtype = tuple(features["tokens"].shape), features["tokens"].np_dtype
        if len(shape) != 1 or shape[0] is None or shape[0] < 2 or not np.issubdtype(dtype, np.integer):
            raise UserError(
                f"dataset {name!r} has tokens {dtype}{list(shape)}; admmprune needs "
                "windows of a fixed number (at least 2) of integer token ids"
            )
        return vocabulary
    _check_image_classification(name, features)
    return None


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
            or neither an image classification dataset with fixed-shape images
            nor a token dataset.
    """
    data_dir = _resolve_data_dir(data_dir)
    builder = _prepared_builder(name, data_dir)
    features = builder.info.features
    vocabulary = _check_features(name, builder)
    splits = {k: int(v.num_examples) for k, v in builder.info.splits.items()}
    if vocabulary is not None:
        return DatasetInfo(
            name=builder.name,
            num_classes=len(vocabulary),
            image_shape=(int(features["tokens"].shape[0]) - 1,),
            splits=splits,
            mean=None,
            std=None,
            vocabulary=vocabulary,
        )
    mean, std = NORMALIZATION.get(builder.name, (None, None))
    return DatasetInfo(
        name=builder.name,
        num_classes=int(features["label"].num_classes),
        image_shape=tuple(int(d) for d in features["image"].shape),
        splits=splits,
        mean=mean,
        std=std,
    )


class ArraySource(Sequence):
    """A random-access source of decoded examples held in memory.

    Indexing gives the same ``{"image": uint8 [H,W,C], "label": int}`` dicts as a
    tfds data source; :func:`~admmprune.runtime.data.make_loader` gathers whole batches from the arrays.

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


class TokenSource(Sequence):
    """A random-access source of token windows held in memory.

    Indexing gives ``{"tokens": int32 [seq_len + 1]}`` dicts, the feature a
    tfds data source of a token dataset gives;
    :func:`~admmprune.runtime.data.make_loader` gathers whole batches from the
    array and splits each window into inputs and next-token labels.

    Attributes:
        tokens: int32 array ``[N, seq_len + 1]`` of token ids (read-only).
    """

    def __init__(self, tokens: np.ndarray):
        """Wraps an array of windows.

        Args:
            tokens: Array ``[N, seq_len + 1]`` of non-negative integer token ids,
                ``seq_len >= 1``.
        """
        tokens = np.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise UserError(
                f"TokenSource needs integer token windows [N, seq_len + 1] with seq_len >= 1; "
                f"got {tokens.dtype}{list(tokens.shape)}"
            )
        if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.int32).max):
            raise UserError(f"TokenSource token ids must be in [0, 2**31), got {tokens.min()} .. {tokens.max()}")
        tokens = np.asarray(tokens, np.int32)
        tokens.flags.writeable = False
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TokenSource(self.tokens[index])
        return {"tokens": self.tokens[index]}

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [self[int(i)] for i in indices]

    def __repr__(self) -> str:
        return f"TokenSource(tokens=int32{list(self.tokens.shape)})"


def _examples(source: Sequence[Mapping[str, Any]], n: int):
    """``(index, example)`` of the first ``n`` examples, read in chunks."""
    getitems = getattr(source, "__getitems__", None)
    for start in range(0, n, _READ_CHUNK):
        indices = list(range(start, min(start + _READ_CHUNK, n)))
        examples = getitems(indices) if getitems else [source[i] for i in indices]
        yield from zip(indices, examples, strict=True)


def read_arrays(source: Sequence[Mapping[str, Any]]) -> ArraySource | TokenSource:
    """Reads every example of a random-access source into memory.

    Args:
        source: A random-access source of ``{"image", "label"}`` dicts, or of
            dicts with ``"tokens"`` (a token dataset's), such as a tfds data
            source.

    Returns:
        An :class:`ArraySource` (a :class:`TokenSource` for tokens) with the
        same examples in the same order.

    Raises:
        UserError: the source is empty.
    """
    if isinstance(source, ArraySource | TokenSource):
        return source
    n = len(source)
    if n == 0:
        raise UserError("the data source is empty: check the split name and the data dir")
    first = source[0]
    if "tokens" in first:
        tokens = np.empty((n, *np.shape(first["tokens"])), np.int32)
        for i, example in _examples(source, n):
            tokens[i] = example["tokens"]
        return TokenSource(tokens)
    images = np.empty((n, *np.shape(first["image"])), np.uint8)
    labels = np.empty((n,), np.int32)
    for i, example in _examples(source, n):
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

    MNIST, Fashion-MNIST and ``shakespeare_chars`` are prepared into
    ``data_dir`` the first time they are asked for (about 6 s); any other
    dataset must already be prepared there in the ``array_record`` format.
    Nothing is downloaded.

    Args:
        name: A tfds dataset name, optionally with config and version
            (``"mnist"``, ``"cifar10"``, ``"mnist:3.0.1"``).
        split: A tfds split, with slicing if wanted (``"train"``, ``"test"``,
            ``"train[:90%]"``).
        data_dir: The tfds data directory; None means the tfds default
            (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        in_memory: Whether to decode the whole split into memory once (an
            :class:`ArraySource`, or :class:`TokenSource`) instead of decoding
            each example when it is read (the tfds data source). None decides
            by size: splits whose images (tokens) fit in 1 GiB are read into
            memory, which makes an epoch of MNIST take well under a second
            instead of ~10 s.

    Returns:
        A random-access sequence of ``{"image": uint8 [H,W,C], "label": int}``;
        of a token dataset, of dicts with ``"tokens"`` (``[seq_len + 1]``).

    Raises:
        UserError: the dataset is unknown, not available offline, stored in a
            format that needs TensorFlow, neither an image classification
            dataset nor a token dataset, or the split does not exist.
    """
    data_dir = _resolve_data_dir(data_dir)
    builder = _prepared_builder(name, data_dir)
    vocabulary = _check_features(name, builder)
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except (ValueError, KeyError) as e:  # unknown split or bad slice
        splits = sorted(builder.info.splits.keys())
        raise UserError(f"cannot read split {split!r} of {name!r} ({e}); its splits are {splits}") from None
    if in_memory is None:
        if vocabulary is None:
            example_bytes = int(np.prod(builder.info.features["image"].shape))
        else:  # int32 ids in memory
            example_bytes = 4 * int(np.prod(builder.info.features["tokens"].shape))
        in_memory = len(source) * example_bytes <= _IN_MEMORY_MAX_BYTES
    return read_arrays(source) if in_memory else source
