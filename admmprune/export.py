"""Command line: ``python -m admmprune.export MODEL_DIR --output FILE``.

This file is intentionally short; the export is a library function
(:func:`admmprune.runtime.export.export_forward`), re-exported here where
users imported it before the code was organised by layers.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from admmprune._errors import UserError, run_cli
from admmprune.app import cli
from admmprune.runtime.export import *  # noqa: F403 - the names users imported from admmprune.export
from admmprune.runtime.export import __all__ as _library
from admmprune.runtime.export import export_forward

DESCRIPTION = """\
Export a saved model's forward pass as a serialized jax.export artifact:
StableHLO with the weights baked in and a symbolic batch size, which runs with
plain JAX, without admmprune or flax installed:

    import jax
    forward = jax.export.deserialize(open("model.jax", "rb").read())
    logits = forward.call(images)  # images: float32 [B, H, W, C]"""


def build_parser() -> cli.Parser:
    """The command line's arguments (typed absl flags)."""
    parser = cli.Parser("python -m admmprune.export", description=DESCRIPTION)
    parser.add_positional("model_dir", "a model saved by admmprune (e.g. WORKDIR/model)")
    parser.add_string("output", "file to write (must not exist)", required=True, metavar="FILE")
    parser.add_sequence(
        "input-shape",
        "one example's shape, e.g. 28,28,1 (default: from the model)",
        convert=int,
        what="integers like 28,28,1",
        metavar="SHAPE",
    )
    parser.add_string(
        "input-dtype",
        "the input's dtype: float32 (images) or int32 (token ids); default: the model's input_dtype, else float32",
        metavar="DTYPE",
    )
    parser.add_string(
        "like",
        "for a model that is not admmprune's: MODULE:FUNCTION, importable from the current directory or "
        "PYTHONPATH, that builds it with no arguments (its dense constructor if it was collapsed)",
        metavar="MODULE:FUNCTION",
    )
    parser.add_string(
        "call",
        "MODULE:FUNCTION taking (model, x) that calls the model, to bind the other arguments of its __call__ "
        "(default: model(x))",
        metavar="MODULE:FUNCTION",
    )
    return parser


def _imported(flag: str, name: str):
    """The function ``MODULE:FUNCTION`` names (given on the command line: the user's own code)."""
    import importlib

    module, _, attr = name.partition(":")
    if not module or not attr:
        raise UserError(f"--{flag} takes MODULE:FUNCTION, e.g. mymodels:build, not {name!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:  # python -m puts it there; a console script does not
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything on import
        raise UserError(f"--{flag}: cannot import {module} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(found, part):
            raise UserError(f"--{flag}: {module} has no {attr}")
        found = getattr(found, part)
    if not callable(found):
        raise UserError(f"--{flag}: {name} is a {type(found).__name__}, not a function")
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body():
        args = build_parser().parse(argv)
        if os.path.exists(args.output):
            raise UserError(f"{args.output} exists; choose a new --output")
        from admmprune.runtime.checkpoint import load_model  # heavy imports after argument errors

        try:
            dtype = None if args.input_dtype is None else np.dtype(args.input_dtype)
        except TypeError:
            raise UserError(f"--input-dtype must be a dtype like float32 or int32, got {args.input_dtype!r}") from None
        like = None if args.like is None else _imported("like", args.like)
        call = None if args.call is None else _imported("call", args.call)
        data = export_forward(load_model(args.model_dir, like=like), args.input_shape, dtype=dtype, call=call)
        tmp = f"{args.output}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, args.output)
        except OSError as e:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise UserError(f"cannot write {args.output} ({e.strerror or e}); choose another --output") from None
        print(f"wrote {args.output} ({len(data):,} bytes)")

    return run_cli(body, interrupted="interrupted; nothing was written")


__all__ = [*_library, "build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
