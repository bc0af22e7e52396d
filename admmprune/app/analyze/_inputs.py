"""What the criteria analysis reads from a model besides its weights: the spec
tree that groups its channels, batches of a dataset that fits it, and the
gradients of those batches (for the ``taylor`` criterion).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from admmprune._errors import UserError
from admmprune._types import Params, Specs


def model_specs(model: Any) -> Specs:
    """The spec tree the pipeline prunes: a declared chain, else traced discovery.

    Raises:
      UserError: a model without a chain whose input shape is unknown.
    """
    from flax import nnx

    from admmprune.structure import discovery, graph

    _, params, _ = nnx.split(model, nnx.Param, ...)
    if getattr(model, "chain", None) is not None:
        return graph.chain_specs(params, model.chain)
    in_shape = getattr(model, "config", {}).get("in_shape")
    if in_shape is None:
        raise UserError(f"{type(model).__name__} declares no chain and no in_shape: cannot trace its channel groups")
    return discovery.discover_nnx(model, jax.ShapeDtypeStruct((1, *in_shape), np.float32)).specs


def taylor_grads(model: Any, batches: Sequence[Mapping[str, Any]]) -> list[Params]:
    """Cross-entropy gradients of ``model``'s ``nnx.Param`` state, one per batch
    (of images, or of tokens with next-token labels).

    The model runs in training mode, as in Molchanov et al., whose gradients
    are those of training; BatchNorm's statistics are not updated.
    """
    import optax
    from flax import nnx

    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def grad(params, rest, images, labels):
        def loss(params):
            logits = nnx.merge(graphdef, params, rest, copy=True)(images)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.grad(loss)(params)

    from admmprune.runtime.data import model_inputs  # tfds and grain only when asked for

    return [grad(params, rest, model_inputs(b), b["label"]) for b in batches]


def dataset_batches(
    model: Any, name: str, *, data_dir: str | None, batches: int, batch_size: int, normalize: bool, seed: int
) -> list[dict[str, np.ndarray]]:
    """``batches`` shuffled training batches of ``name`` that fit ``model``.

    Raises:
      UserError: the dataset cannot be had, or its images do not fit the model
        (or the model is not an image classifier).
    """
    from admmprune.runtime import data as data_lib

    info = data_lib.dataset_info(name, data_dir)
    model.eval()  # traced for its shape only: BatchNorm must not update its statistics
    try:
        out = jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, *info.image_shape), np.float32))
    except Exception as e:  # noqa: BLE001 - whatever the model raises on a wrong shape: one line
        raise UserError(
            f"the model does not take {name} images of shape {info.image_shape} ({type(e).__name__}); "
            "give the dataset it was trained on"
        ) from None
    if getattr(out, "ndim", None) != 2:
        raise UserError("the taylor criterion needs an image classifier (logits of shape (batch, classes))")
    source = data_lib.load_source(name, f"train[:{batches * batch_size}]", data_dir)
    norm = (info.mean, info.std) if normalize and info.mean is not None else None
    loader = data_lib.make_loader(
        source, batch_size=batch_size, seed=seed, normalize=norm, shard_index=0, shard_count=1
    )
    return [batch for _, batch in zip(range(batches), loader, strict=False)]  # the loader never ends
