"""Export a saved model's forward pass as a serialized ``jax.export`` artifact.

    python -m admmprune.export WORKDIR/model --output model.jax

The artifact is StableHLO with the weights baked in and a symbolic batch
size. It runs with plain JAX, without admmprune or flax installed::

    import jax
    forward = jax.export.deserialize(open("model.jax", "rb").read())
    logits = forward.call(images)  # images: float32 [B, H, W, C]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from admmprune._errors import UserError, run_cli


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


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags."""
    parser = argparse.ArgumentParser(prog="python -m admmprune.export", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a model saved by admmprune (e.g. WORKDIR/model)")
    parser.add_argument("--output", required=True, help="file to write (must not exist)")
    parser.add_argument("--input-shape", help="one example's shape, e.g. 28,28,1 (default: from the model)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)

    def body():
        if os.path.exists(args.output):
            raise UserError(f"{args.output} exists; choose a new --output")
        shape = None
        if args.input_shape:
            try:
                shape = tuple(int(s) for s in args.input_shape.split(","))
            except ValueError:
                raise UserError(f"--input-shape must be integers like 28,28,1, got {args.input_shape!r}") from None
        from admmprune.runtime.checkpoint import load_model

        data = export_forward(load_model(args.model_dir), shape)
        tmp = f"{args.output}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, args.output)
        print(f"wrote {args.output} ({len(data):,} bytes)")

    return run_cli(body, interrupted="interrupted; nothing was written")



__all__ = ["build_parser", "export_forward", "input_shape", "main"]
