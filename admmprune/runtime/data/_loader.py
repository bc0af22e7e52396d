"""Batches from a random-access source: a deterministic, checkpointable grain pipeline."""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from admmprune._errors import UserError
from admmprune.runtime.data._sources import ArraySource, TokenSource

AUGMENTATIONS = ("random_crop_pad", "flip")
"""Names :func:`make_loader` accepts in ``augment``."""


def _as_channels(value, channels: int, what: str) -> np.ndarray:
    arr = np.asarray(value, np.float32).reshape(-1)
    if arr.size == 1:
        arr = np.repeat(arr, channels)
    if arr.size != channels:
        raise UserError(f"normalize {what} has {arr.size} values for {channels}-channel images")
    return arr


class _IndexStream:
    """The example indices of one shard, epoch after epoch, a batch at a time.

    Position ``p`` of the stream is example ``perm_e[shard_index + r *
    shard_count]`` with ``e, r = divmod(p, per_shard)`` and ``perm_e`` epoch
    ``e``'s permutation of ``range(n)``: grain's ``MapDataset.range(n)
    .shuffle(seed)[shard_index::shard_count].repeat().batch()``, batch for
    batch (the tests compare them), with grain's own per-epoch ``index_shuffle``
    evaluated once per epoch into an array. Composed element by element, grain
    spends about 7 us per example in Python on this, a tenth of a LeNet-5 MNIST
    epoch's compute on this project's 2-core machines; as whole batches of
    array indexing it is 2 us.
    """

    def __init__(self, n: int, per_shard: int, shard_index: int, shard_count: int, seed: int | None):
        self._n, self._per_shard = n, per_shard
        self._shard = np.arange(per_shard, dtype=np.int64) * shard_count + shard_index
        self._seed = seed
        self._cache: tuple[int, np.ndarray] | None = None  # (epoch, its indices): batches come in order

    def _epoch(self, epoch: int) -> np.ndarray:
        cached = self._cache
        if cached is not None and cached[0] == epoch:
            return cached[1]
        if self._seed is None:
            indices = self._shard
        else:
            shuffle = functools.partial(
                grain.experimental.index_shuffle, max_index=self._n - 1, seed=(self._seed + epoch) % 2**32, rounds=4
            )
            indices = np.fromiter(map(shuffle, self._shard.tolist()), np.int64, count=self._per_shard)
        self._cache = (epoch, indices)
        return indices

    def batch(self, index: int, *, size: int, total: int) -> np.ndarray:
        start = index * size
        positions = np.arange(start, min(start + size, total), dtype=np.int64)
        epochs, offsets = np.divmod(positions, self._per_shard)
        out = np.empty(len(positions), np.int64)
        for epoch in np.unique(epochs).tolist():  # one epoch, or two where a batch spans a boundary
            where = epochs == epoch
            out[where] = self._epoch(epoch)[offsets[where]]
        return out


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


class _GatherTokens:
    """Turns a batch of example indices into model inputs and next-token labels."""

    def __init__(self, source):
        self._source = source

    def __call__(self, indices: np.ndarray):
        indices = np.asarray(indices)
        if isinstance(self._source, TokenSource):
            windows = self._source.tokens[indices]
        else:
            getitems = getattr(self._source, "__getitems__", None)
            ids = [int(i) for i in indices]
            examples = getitems(ids) if getitems else [self._source[i] for i in ids]
            windows = np.stack([np.asarray(e["tokens"], np.int32) for e in examples])
        return {"tokens": np.ascontiguousarray(windows[:, :-1]), "label": np.ascontiguousarray(windows[:, 1:])}


def model_inputs(batch: Mapping[str, Any]) -> Any:
    """What a model reads from a batch of :func:`make_loader`: its ``"tokens"``, or its ``"image"``."""
    return batch["tokens"] if "tokens" in batch else batch["image"]


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

    A source of token windows (``{"tokens": [seq_len + 1]}`` examples, such as
    a :class:`~admmprune.runtime.data.TokenSource`) gives batches of the first
    ``seq_len`` tokens of each window and, as labels, the last ``seq_len`` (the
    next token at every position); it takes no ``normalize`` or ``augment``.

    ``iter(loader)`` gives a grain ``DatasetIterator``; its ``get_state()`` is a
    small JSON-able dict and ``set_state(state)`` on a fresh iterator of the
    same loader replays exactly the same next batches.

    Args:
        source: A random-access source of ``{"image": uint8 [H,W,C], "label"}``
            dicts (or of ``{"tokens"}`` windows), such as
            :func:`~admmprune.runtime.data.load_source` returns.
        batch_size: Examples per batch on this process.
        seed: Seed of the shuffle and of the augmentations, in ``[0, 2**32)``.
        shuffle: Whether to shuffle (each epoch differently).
        num_epochs: Passes over the data; None repeats forever.
        drop_remainder: Whether to drop a last batch smaller than ``batch_size``.
        normalize: ``(mean, std)`` of pixels scaled to [0, 1], scalars or one
            value per channel (see :data:`~admmprune.runtime.data.NORMALIZATION`); None only scales
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
        int32 [B]}`` numpy batches; of token windows, ``{"tokens": int32
        [B,seq_len], "label": int32 [B,seq_len]}``.

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

    tokens = isinstance(source, TokenSource) or (not isinstance(source, ArraySource) and "tokens" in source[0])
    if tokens and (normalize is not None or augment):
        raise UserError("a source of token windows takes no normalize or augment (they are for images)")

    mean = std = None
    if normalize is not None:
        channels = int(np.shape(source[0]["image"])[-1])
        mean = _as_channels(normalize[0], channels, "mean")
        std = _as_channels(normalize[1], channels, "std")
        if np.any(std <= 0):
            raise UserError(f"normalize std must be positive, got {std.tolist()}")

    stream = _IndexStream(n, per_shard, shard_index, shard_count, seed if shuffle else None)
    total = sys.maxsize if num_epochs is None else per_shard * num_epochs
    batches = total // batch_size if drop_remainder or num_epochs is None else -(-total // batch_size)
    ds = grain.MapDataset.range(batches).map(functools.partial(stream.batch, size=batch_size, total=total))
    if tokens:
        ds = ds.map(_GatherTokens(source))
    elif augment:
        gather = _Gather(source, mean=mean, std=std, augment=augment, crop_padding=crop_padding)
        # A per-shard seed: the same batch position on two processes must not
        # get the same crops and flips.
        aug_seed = int(np.random.SeedSequence([seed, shard_index, 1]).generate_state(1)[0])
        ds = ds.random_map(gather, seed=aug_seed)
    else:
        ds = ds.map(_Gather(source, mean=mean, std=std, augment=augment, crop_padding=crop_padding))
    if read_options is None:
        read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
    return ds.to_iter_dataset(read_options)
