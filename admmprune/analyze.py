"""Command line: how far pruning criteria agree, and whether they can decide.

This file is intentionally short: the analysis is a library
(:mod:`admmprune.app.analyze`) that notebooks call the same way. Its public
names are re-exported here, where users imported them before the code was
organised by layers.
"""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

from admmprune._errors import UserError, run_cli
from admmprune.app import cli
from admmprune.app.analyze import *  # noqa: F403 - the names users imported from admmprune.analyze
from admmprune.app.analyze import __all__ as _library
from admmprune.app.analyze import analyze, check_output, dataset_batches, model_specs, taylor_grads, write
from admmprune.structure.criteria import CRITERIA

DESCRIPTION = """\
How far pruning criteria agree, and whether they can decide.

    python -m admmprune.analyze runs/lenet5-mnist-admm-0.9          # a pipeline workdir
    python -m admmprune.analyze path/to/saved/model --dataset mnist  # a save_model directory
    python -m admmprune.analyze --config smoke --workdir /tmp/smoke  # train the dense model first

For every prunable channel group of a trained model it scores the channels by
every criterion of admmprune.structure.criteria that applies and writes to the
output directory (default WORKDIR/analysis, or MODEL_DIR/../analysis):

- similarity.csv: per group and pair of criteria, the Spearman and Kendall
  (tau-b) rank correlations of their scores, and the Jaccard overlap of the
  channels each would prune at --ratio (the fraction removed);
- applicability.csv: per group and criterion, the coefficient of variation
  of the scores, the relative gap at the cut, and a flag where the criterion
  cannot tell channels apart;
- normality.csv: per layer kernel, whether its trained weights look
  Gaussian, the assumption behind magnitude criteria and FPGM's geometric
  median;
- analysis.json with all of it and the scores themselves, summary.md,
  and figures/: per group a heat map of the Spearman correlations and
  histograms of the scores, per layer a normal Q-Q plot.

An existing output directory is only replaced with --overwrite; the new
one is written next to it and renamed into place at the end."""


def build_parser() -> cli.Parser:
    """The command line's arguments (typed absl flags; with ``--config``, its
    ``--config.FIELD=VALUE`` overrides as in ``python -m admmprune.train``)."""
    parser = cli.Parser(
        "python -m admmprune.analyze",
        description=DESCRIPTION,
        epilog="With --config, any --config.FIELD=VALUE override of python -m admmprune.train applies.",
    )
    parser.add_positional("path", "a saved model directory (save_model), or a pipeline workdir", required=False)
    parser.add_config("train the dense model of this config first (as python -m admmprune.train)", default=None)
    parser.add_string("workdir", "with --config: the run's directory (default: the train CLI's)")
    parser.add_string("output", "output directory (default: WORKDIR/analysis or MODEL_DIR/../analysis)")
    parser.add_number(
        "ratio", "fraction of channels pruned, for the overlaps", default=0.5, within=(0.0, 1.0), metavar="R"
    )
    parser.add_choices(
        "criteria",
        f"comma-separated, from {','.join(CRITERIA)} (default: all that apply)",
        choices=CRITERIA,
        noun="criterion",
        metavar="C1,C2,...",
    )
    parser.add_string(
        "dataset",
        "mnist, fashion_mnist, ...: training batches for the taylor criterion, normalized as the run's "
        "config says (default: the workdir's dataset; with a bare model dir, normalized as the train CLI does)",
    )
    parser.add_string("data-dir", "the tfds data directory (default: the run's, or the tfds default)")
    parser.add_integer("taylor-batches", "batches of gradients for taylor", default=4, minimum=1, metavar="N")
    parser.add_integer("batch-size", "batch size of those batches", default=128, minimum=1, metavar="N")
    parser.add_integer("seed", "seed of the random criterion, the batches and subsamples", default=0, minimum=0)
    parser.add_switch("no-figures", "write no PNG figures")
    parser.add_switch("overwrite", "replace an existing output directory")
    return parser


def parse_args(argv: list[str]) -> SimpleNamespace:
    """The arguments of a command line, checked.

    Raises:
      UserError: a bad command line, or neither (or both) of a path and ``--config``.
    """
    args = build_parser().parse(argv)
    if (args.path is None) == (args.config is None):
        raise UserError("give a saved model directory or workdir, or --config to train one (not both)")
    return args


def run(args: SimpleNamespace) -> str:
    """What the command does, for parsed arguments (:func:`parse_args`);
    returns the output directory."""
    import admmprune

    if args.config is not None:
        from admmprune.runtime import distributed

        # As the train CLI: a multi-process run that the environment asks for.
        distributed.initialize(exit_on_timeout=True)
        config = args.config
        workdir = args.workdir or cli.default_workdir(config)
        model_dir = os.path.join(workdir, "dense")
        data = {"name": config.data.name, "data_dir": config.data.data_dir, "normalize": config.data.normalize}
    else:
        model_dir, data = cli.find_model(args.path)
    default = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "analysis")
    output = check_output(args.output or default, overwrite=args.overwrite)
    if args.config is not None:
        from admmprune.app import pipeline

        pipeline.run(config, workdir, stop_after="dense")
    model = admmprune.load(model_dir)  # its errors name the file and what to do
    dataset = args.dataset or data.get("name")
    grads = None
    if dataset is not None and (args.criteria is None or "taylor" in args.criteria):
        batches = dataset_batches(
            model,
            dataset,
            data_dir=args.data_dir or data.get("data_dir"),
            batches=args.taylor_batches,
            batch_size=args.batch_size,
            normalize=bool(data.get("normalize", True)),
            seed=args.seed,
        )
        grads = taylor_grads(model, batches)
    from flax import nnx

    _, params, _ = nnx.split(model, nnx.Param, ...)
    result = analyze(
        params,
        model_specs(model),
        ratio=args.ratio,
        criteria=args.criteria,
        grads=grads,
        seed=args.seed,
        progress=True,
    )
    result = {"source": os.path.abspath(model_dir), "seed": args.seed, "dataset": dataset, **result}
    return write(result, output, params=params, overwrite=args.overwrite, figures=not args.no_figures, progress=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body():
        args = parse_args(argv)
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # tfds's absl warnings are not actionable here
        output = run(args)
        print(f"analysis in {output} (summary.md, analysis.json, *.csv{'' if args.no_figures else ', figures/'})")

    return run_cli(body, interrupted="interrupted; nothing was written to the output directory")


__all__ = [*_library, "build_parser", "main", "parse_args", "run"]

if __name__ == "__main__":
    sys.exit(main())
