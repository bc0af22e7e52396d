"""Export a saved model's forward pass as a serialized ``jax.export`` artifact.

    python -m admmprune.export WORKDIR/model --output model.jax

The artifact is StableHLO with the weights baked in and a symbolic batch
size. It runs with plain JAX, without admmprune or flax installed::

    import jax
    forward = jax.export.deserialize(open("model.jax", "rb").read())
    logits = forward.call(images)  # images: float32 [B, H, W, C]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from admmprune._errors import UserError


def input_shape(model: Any) -> tuple[int, ...]:
    """One example's input shape, from the model's constructor arguments."""
    config = model.config
    if "in_shape" in config:
        return tuple(config["in_shape"])
    if "in_features" in config:
        return (int(config["in_features"]),)
    raise UserError(f"cannot tell the input shape of {type(model).__name__}; pass --input-shape")


def export_forward(model: Any, shape: Sequence[int] | None = None) -> bytes:
    """Serializes the eval-mode forward pass of ``model`` for a symbolic batch.

    Args:
        model: an NNX module; it is not modified (a copy is put in eval mode).
        shape: one example's input shape; default from :func:`input_shape`.

    Returns:
        The bytes of ``jax.export.Exported.serialize()``.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    shape = tuple(shape) if shape is not None else input_shape(model)
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state, copy=True)
    copy.eval()
    graphdef, state = nnx.split(copy)

    def forward(x):
        return nnx.merge(graphdef, state)(x)  # the weights become constants

    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *shape), jnp.float32)
    return bytes(jax.export.export(jax.jit(forward))(spec).serialize())


__all__ = ["export_forward", "input_shape"]
