"""Command line and library: one-shot pruning of a trained model from calibration data.

``python -m admmprune.oneshot WORKDIR_OR_MODEL_DIR --sparsity 0.7`` prunes a
saved model layer by layer, without retraining (see ``--help``). The library
calls are re-exported here: :func:`prune` (any function of a parameter
pytree), :func:`prune_model` (a Flax NNX model), :func:`kernel_specs` and
:data:`METHODS`; the layer solvers are :mod:`admmprune.core.layerwise`.
"""

from __future__ import annotations

import os
import sys

from admmprune._errors import UserError, run_cli
from admmprune.app import cli
from admmprune.structure.oneshot import METHODS, Method, kernel_specs, prune, prune_model

DESCRIPTION = (
    """\
Prune a trained model in one shot, layer by layer, from calibration data: no
retraining. Each layer's kernel is pruned so that the layer reproduces its
dense outputs on the calibration inputs (which come through the layers
pruned before it), then the next layer.

    python -m admmprune.oneshot runs/lenet5-mnist-admm-0.9 --sparsity 0.7   # a pipeline workdir's dense model
    python -m admmprune.oneshot path/to/model --dataset mnist --sparsity 2:4 --method sparsegpt

Methods: """
    + "; ".join(f"{m.name}: {m.about}" for m in METHODS.values())
    + """.

It evaluates the model before and after on the dataset's eval split and
writes to the output directory (default WORKDIR/oneshot-METHOD-SPARSITY, or
MODEL_DIR/../oneshot-METHOD-SPARSITY): report.json (accuracy, perplexity for
a token dataset, and per layer the relative reconstruction error on the
calibration inputs, the weights kept and the seconds), model/ (the pruned
model, for admmprune.load) and model.jax (its forward pass, for plain JAX).
An existing output directory is only replaced with --overwrite; a failed run
leaves it untouched."""
)


def build_parser() -> cli.Parser:
    """The command line's arguments (typed absl flags)."""
    parser = cli.Parser("python -m admmprune.oneshot", description=DESCRIPTION)
    parser.add_positional("path", "a saved model directory (save_model), or a pipeline workdir")
    parser.add_string(
        "sparsity",
        "the fraction of each layer's weights removed (0.7), or N:M (2:4: at most 2 non-zeros in every 4 inputs)",
        required=True,
        metavar="S",
    )
    parser.add_choices("method", "how each layer is pruned (default: admm)", choices=tuple(METHODS), noun="method")
    parser.add_integer("calibration", "calibration examples from the training split", default=512, minimum=1)
    parser.add_string("dataset", "mnist, fashion_mnist, shakespeare_chars, ... (default: the workdir's dataset)")
    parser.add_string("data-dir", "the tfds data directory (default: the run's, or the tfds default)")
    parser.add_integer("batch-size", "calibration batch size", default=128, minimum=1, metavar="N")
    parser.add_integer("seed", "seed of the calibration sample", default=0, minimum=0)
    parser.add_sequence(
        "skip",
        "layers left dense: comma-separated substrings of kernel paths (default: the output layer)",
        convert=str,
        what="comma-separated names",
        metavar="NAMES",
    )
    parser.add_string("output", "output directory (default: WORKDIR/oneshot-METHOD-SPARSITY)")
    parser.add_switch("overwrite", "replace an existing output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body():
        args = build_parser().parse(argv)
        from admmprune.app import oneshot as app

        app.parse_sparsity(args.sparsity)  # a bad value fails before any loading
        methods = list(args.method or ["admm"])
        if len(methods) > 1:
            raise UserError(f"--method takes one method, got {','.join(methods)}")
        method = methods[0]
        model_dir, data = cli.find_model(args.path)
        dataset = args.dataset or data.get("name")
        if dataset is None:
            raise UserError(f"{args.path} is a bare model directory: pass --dataset (the data it was trained on)")
        name = f"oneshot-{method}-{args.sparsity.replace(':', 'of')}"
        output = os.path.abspath(args.output or os.path.join(os.path.dirname(os.path.abspath(model_dir)), name))
        if os.path.exists(output) and not args.overwrite:
            raise UserError(f"output {output} already exists; pass --overwrite or another --output")
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # tfds's absl warnings are not actionable here
        report = app.run(
            model_dir,
            output,
            dataset=dataset,
            data_dir=args.data_dir or data.get("data_dir"),
            normalize=bool(data.get("normalize", True)),
            # A workdir's own slices (the smoke config's); a bare model: the whole splits.
            train_split=app.sliced(data.get("train_split", "train"), data.get("limit")),
            eval_split=app.sliced(data.get("eval_split", "test"), data.get("eval_limit")),
            sparsity=args.sparsity,
            method=method,
            samples=args.calibration,
            batch_size=args.batch_size,
            seed=args.seed,
            skip=args.skip,
            overwrite=args.overwrite,
        )
        dense, pruned = report["dense"], report["pruned"]
        extra = ""
        if "perplexity" in dense:
            extra = f", perplexity {dense['perplexity']:.3f} -> {pruned['perplexity']:.3f}"
        print(
            f"{method} at {args.sparsity}: accuracy {dense['accuracy']:.2%} -> {pruned['accuracy']:.2%}{extra} "
            f"({report['prune_seconds']:.1f} s pruning); wrote {output}"
        )

    return run_cli(body, interrupted="interrupted; nothing was written")


__all__ = ["METHODS", "Method", "build_parser", "kernel_specs", "main", "prune", "prune_model"]

if __name__ == "__main__":
    sys.exit(main())
