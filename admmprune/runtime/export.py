"""Export a saved model's forward pass as a serialized ``jax.export`` artifact.

    python -m admmprune.export WORKDIR/model --output model.jax

The artifact is StableHLO with the weights baked in and a symbolic batch
size. It runs with plain JAX, without admmprune or flax installed::

    import jax
    forward = jax.export.deserialize(open("model.jax", "rb").read())
    logits = forward.call(images)  # images: float32 [B, H, W, C]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from admmprune._errors import UserError


def input_shape(model: Any) -> tuple[int, ...]:
    """One example's input shape, from the constructor arguments of a model of :mod:`admmprune.models`."""
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise UserError(f"cannot tell the input shape of {type(model).__name__}; pass --input-shape")
    if "in_shape" in config:
        return tuple(config["in_shape"])
    if "in_features" in config:
        return (int(config["in_features"]),)
    raise UserError(f"cannot tell the input shape of {type(model).__name__}; pass --input-shape")


def _call(model: Any, x: Any) -> Any:
    return model(x)


def export_forward(
    model: Any,
    shape: Sequence[int] | None = None,
    *,
    dtype: Any = None,
    call: Callable[[Any, Any], Any] | None = None,
) -> bytes:
    """Serializes the eval-mode forward pass of ``model`` for a symbolic batch.

    Args:
        model: an NNX module; it is not modified (a copy is put in eval mode).
        shape: one example's input shape; default from :func:`input_shape`
            (a model of :mod:`admmprune.models`; give it for any other).
        dtype: the input's dtype: ``float32`` for images, ``int32`` for token
            ids; default the model's ``input_dtype`` attribute (the zoo's GPT
            has one), else ``float32``.
        call: how to call the model on the input batch, ``call(model, x)``;
            default ``model(x)``. Binds what else its ``__call__`` takes, e.g.
            ``lambda m, x: m(x, deterministic=True)`` or
            ``lambda m, x: m(x, rngs=None)``. Top-level on the command line
            (``--call MODULE:FUNCTION``).

    Returns:
        The bytes of ``jax.export.Exported.serialize()``.

    Raises:
        UserError: ``shape`` is not one the model takes (it says which it
            does), or no shape is given and the model's is unknown.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    call = _call if call is None else call
    dtype = jnp.dtype(getattr(model, "input_dtype", "float32") if dtype is None else dtype)
    if shape is None:
        shape = input_shape(model)
    else:
        shape = tuple(shape)
        _check_shape(model, shape, dtype, call)
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state, copy=True)
    copy.eval()
    graphdef, state = nnx.split(copy)

    def forward(x):
        return call(nnx.merge(graphdef, state), x)  # the weights become constants

    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *shape), dtype)
    return bytes(jax.export.export(jax.jit(forward))(spec).serialize())


def _check_shape(model: Any, shape: tuple[int, ...], dtype: Any = np.float32, call: Callable = _call) -> None:
    """Traces one example of ``shape`` through ``model`` (shapes only) before the export does.

    Raises:
        UserError: a dimension is not positive, or the model fails on the shape.
    """
    import jax
    from flax import nnx

    name = type(model).__name__
    try:
        expected = ",".join(map(str, input_shape(model)))
    except UserError:
        expected = None
    takes = f"{name} takes inputs of shape {expected}" if expected else f"{name} does not take it"
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise UserError(f"input shape {','.join(map(str, shape))} needs positive sizes; {takes}")
    graphdef, state = nnx.split(model)

    def forward(x):
        copy = nnx.merge(graphdef, state, copy=True)
        copy.eval()
        return call(copy, x)

    try:
        jax.eval_shape(forward, jax.ShapeDtypeStruct((1, *shape), dtype))
    except Exception as e:  # noqa: BLE001 - whatever the model raises on a shape it cannot take
        if expected:
            raise UserError(
                f"{takes}, not {','.join(map(str, shape))} ({type(e).__name__}); pass --input-shape {expected}"
            ) from None
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(
            f"{name} fails on a batch of shape {','.join(map(str, shape))} {np.dtype(dtype).name} "
            f"({type(e).__name__}{': ' + detail if detail else ''}); give the shape and dtype it takes "
            "(--input-shape, --input-dtype) and bind the other arguments of its __call__ (--call)"
        ) from None


__all__ = ["export_forward", "input_shape"]
