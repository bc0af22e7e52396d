"""Command line: how far pruning criteria agree, and whether they can decide.

    python -m admmprune.analyze runs/lenet5-mnist-admm-0.9          # a pipeline workdir
    python -m admmprune.analyze path/to/saved/model --dataset mnist  # a save_model directory
    python -m admmprune.analyze --config smoke --workdir /tmp/smoke  # train the dense model first

For every prunable channel group of a trained model it scores the channels by
every criterion of :mod:`admmprune.structure.criteria` that applies and writes to the
output directory (default ``WORKDIR/analysis``, or ``MODEL_DIR/../analysis``):

- ``similarity.csv``: per group and pair of criteria, the Spearman and Kendall
  (tau-b) rank correlations of their scores, and the Jaccard overlap of the
  channels each would prune at ``--ratio`` (the fraction removed);
- ``applicability.csv``: per group and criterion, the coefficient of variation
  of the scores, the relative gap at the cut, and a flag where the criterion
  cannot tell channels apart (:func:`applicability` states the thresholds);
- ``normality.csv``: per layer kernel, whether its trained weights look
  Gaussian, the assumption behind magnitude criteria and FPGM's geometric
  median (:func:`normality`);
- ``analysis.json`` with all of it and the scores themselves, ``summary.md``,
  and ``figures/``: per group a heat map of the Spearman correlations and
  histograms of the scores, per layer a normal Q-Q plot.

An existing output directory is only replaced with ``--overwrite``; the new
one is written next to it and renamed into place at the end.

This file is intentionally short: the analysis is a library
(:mod:`admmprune.app.analyze`) that notebooks call the same way. Its public
names are re-exported here, where users imported them before the code was
organised by layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from admmprune._errors import UserError, run_cli
from admmprune.app.analyze import *  # noqa: F403 - the names users imported from admmprune.analyze
from admmprune.app.analyze import __all__ as _library
from admmprune.app.analyze import analyze, check_output, dataset_batches, model_specs, taylor_grads, write
from admmprune.structure import criteria as criteria_lib


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse prints the usage too)
        raise UserError(f"{message}; see --help")


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (``--config.FIELD=VALUE`` overrides are set
    aside for the train CLI's parser by ``_parse``)."""
    parser = _Parser(
        prog="python -m admmprune.analyze",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="With --config, any --config.FIELD=VALUE override of python -m admmprune.train applies.",
    )
    parser.add_argument("path", nargs="?", help="a saved model directory (save_model), or a pipeline workdir")
    parser.add_argument("--config", help="train the dense model of this config first (as python -m admmprune.train)")
    parser.add_argument("--workdir", help="with --config: the run's directory (default: the train CLI's)")
    parser.add_argument("--output", help="output directory (default: WORKDIR/analysis or MODEL_DIR/../analysis)")
    parser.add_argument("--ratio", default="0.5", help="fraction of channels pruned, for the overlaps (default 0.5)")
    parser.add_argument(
        "--criteria", help=f"comma-separated, from {','.join(criteria_lib.CRITERIA)} (default: all that apply)"
    )
    parser.add_argument(
        "--dataset",
        help="mnist, fashion_mnist, ...: training batches for the taylor criterion, normalized as the run's "
        "config says (default: the workdir's dataset; with a bare model dir, normalized as the train CLI does)",
    )
    parser.add_argument("--data-dir", help="the tfds data directory (default: the run's, or the tfds default)")
    parser.add_argument("--taylor-batches", default="4", help="batches of gradients for taylor (default 4)")
    parser.add_argument("--batch-size", default="128", help="batch size of those batches (default 128)")
    parser.add_argument("--seed", default="0", help="seed of the random criterion, the batches and subsamples")
    parser.add_argument("--no-figures", action="store_true", help="write no PNG figures")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return parser


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = build_parser()
    own, overrides = [], []
    items = iter(argv)
    for item in items:  # --config.FIELD=VALUE or --config.FIELD VALUE: for the train CLI's parser
        if item.startswith("--config."):
            overrides.append(item)
            if "=" not in item:
                overrides.append(next(items, ""))
        else:
            own.append(item)
    args = parser.parse_args(own)
    if overrides and args.config is None:
        raise UserError(f"{overrides[0]} overrides a config: it needs --config")
    if (args.path is None) == (args.config is None):
        raise UserError("give a saved model directory or workdir, or --config to train one (not both)")
    for name, low in (("ratio", None), ("taylor_batches", 1), ("batch_size", 1), ("seed", 0)):
        text = getattr(args, name)
        try:
            value = float(text) if low is None else int(text)
        except ValueError:
            value = None
        if value is None or (low is None and not 0 < value < 1) or (low is not None and value < low):
            what = "a number in (0, 1)" if low is None else f"an integer >= {low}"
            raise UserError(f"--{name.replace('_', '-')} must be {what}, got {text!r}")
        setattr(args, name, value)
    if args.criteria is not None:
        args.criteria = [c.strip() for c in args.criteria.split(",") if c.strip()]
        unknown = [c for c in args.criteria if c not in criteria_lib.CRITERIA]
        if unknown or not args.criteria:
            raise UserError(
                f"unknown criterion {(unknown or [''])[0]!r}; choose from {', '.join(criteria_lib.CRITERIA)}"
            )
    return args, overrides


def _find_model(path: str) -> tuple[str, dict[str, Any]]:
    """``(model dir, the run's data settings or {})`` for a model dir or workdir."""
    if not os.path.exists(path):
        raise UserError(f"no such model directory or workdir: {path}")
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a directory: give a saved model directory or a pipeline workdir")
    model_dir = path
    if os.path.isfile(os.path.join(path, "config.json")):  # a pipeline workdir
        model_dir = os.path.join(path, "dense")
        if not os.path.isdir(model_dir):
            raise UserError(
                f"workdir {path} has no dense model yet (WORKDIR/dense): let its run finish the dense phase"
            )
    run_config = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "config.json")
    data: dict[str, Any] = {}
    if os.path.isfile(run_config):
        with open(run_config) as f:
            data = json.load(f).get("data", {})
    return model_dir, data


def run(args: argparse.Namespace, overrides: list[str]) -> str:
    """What the command does, for parsed arguments; returns the output directory."""
    import admmprune

    if args.config is not None:
        from admmprune import train

        config, workdir = train.parse_args(
            ["--config", args.config, *overrides, *(["--workdir", args.workdir] if args.workdir else [])]
        )
        model_dir = os.path.join(workdir, "dense")
        data = {"name": config.data.name, "data_dir": config.data.data_dir, "normalize": config.data.normalize}
    else:
        model_dir, data = _find_model(args.path)
    default = os.path.join(os.path.dirname(os.path.abspath(model_dir)), "analysis")
    output = check_output(args.output or default, overwrite=args.overwrite)
    if args.config is not None:
        from admmprune.app import pipeline

        pipeline.run(config, workdir, stop_after="dense")
    try:
        model = admmprune.load(model_dir)
    except UserError as e:
        raise UserError(f"{model_dir} is not a model saved by admmprune (save_model): {e}") from None
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
        args, overrides = _parse(argv)
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)  # tfds's absl warnings are not actionable here
        output = run(args, overrides)
        print(f"analysis in {output} (summary.md, analysis.json, *.csv{'' if args.no_figures else ', figures/'})")

    return run_cli(body, interrupted="interrupted; nothing was written to the output directory")


__all__ = [*_library, "build_parser", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
