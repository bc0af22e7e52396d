"""Command line: prune a network with ADMM (or a baseline) and write a report.

This file is intentionally short: the logic is in :mod:`admmprune.app.pipeline`,
which a notebook calls the same way.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

from ml_collections import ConfigDict

from admmprune._errors import run_cli
from admmprune.app import cli
from admmprune.app.cli import load_config

DESCRIPTION = """\
Prune a network with progressive ADMM (or another --method) to structured
(filter/neuron) sparsity, retrain with the masks fixed, collapse it into a
smaller model, evaluate and write WORKDIR/report.json.
With no arguments: LeNet-5 on MNIST (prepared offline on first use), ratio 0.9.

--ratio R is the fraction of channels removed in every prunable layer (conv
filters, dense neurons; never the output layer): 0.9 keeps 2 of LeNet-5's 20
conv1 filters, 5 of 50 conv2 filters and 50 of 500 fc1 neurons. ADMM reaches it
in progressive stages that halve what is left while more than 0.05 below R:
0.9 -> 0.5, 0.75, 0.9; 0.7 -> 0.5, 0.7; 0.5 -> 0.5. Set them with --stages.
--sparsity unstructured (nm, column, block) prunes single weights (N:M
entries, columns, blocks) of the same layers instead, and keeps the masked
model: R is then the fraction of each kernel's weights (columns, blocks) removed.

Rerunning the same command resumes an interrupted run from its last checkpoint,
and says so when the run is already complete."""

EPILOG = """\
config overrides: --config.FIELD=VALUE for any field of the config, e.g.
  --config.admm.rho=0.01 --config.data.name=fashion_mnist --config.model.name=mlp
Each value is parsed as its field's type (ml_collections.config_flags): a tuple
as 0.5,0.75 or "(0.5, 0.75)", a bool as true/false. The fields are documented in
admmprune/configs/default.py; --helpfull lists them with their values.

Every training step runs data-parallel on all devices this process sees. Several
processes (hosts) run one job when each is started with the same arguments plus
--coordinator HOST:PORT --num-processes N --process-id I (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or with
--distributed where JAX finds them itself (Cloud TPU pod slices, SLURM, Open MPI).
See docs/distributed.md."""


def build_parser() -> cli.Parser:
    """The command line's arguments (typed absl flags, and ``--config`` with its
    ``--config.FIELD=VALUE`` overrides)."""
    parser = cli.Parser("python -m admmprune.train", description=DESCRIPTION, epilog=EPILOG)
    parser.add_config(
        f"config file (configs/X.py) or shipped name ({', '.join(cli.shipped_configs())})", default="default"
    )
    parser.add_number(
        "ratio",
        "fraction of channels removed per prunable layer, in (0, 1); default 0.9",
        within=(0.0, 1.0),
        metavar="R",
    )
    parser.add_sequence(
        "stages", "comma-separated stage ratios ending at the ratio, e.g. 0.5,0.75,0.9", metavar="R1,R2,..."
    )
    parser.add_string(
        "method",
        "admm (default), or a method to compare it with on equal epochs: magnitude (filter pruning by "
        "prune.criterion, one-shot or iterative), l1_mask (learned L1-regularized channel masks), slimming "
        "(L1 on BatchNorm scales), relaxation (sigmoid channel gates with a FLOPs target), group_lasso; "
        "see admmprune/app/methods.py",
    )
    parser.add_string(
        "sparsity",
        "channel (default: filters and neurons, collapsed into a smaller model), or a set on every pruned "
        "kernel, kept as a masked model: unstructured, nm (prune.n of every prune.m weights, 2:4 by default), "
        "column or block (prune.block); methods admm and magnitude",
    )
    parser.add_string("workdir", "the run's directory (default: runs/MODEL-DATASET-METHOD-RATIO)")
    group = "multi-process runs (docs/distributed.md)"
    parser.add_string(
        "coordinator", "HOST:PORT of process 0, the same for every process", group=group, metavar="HOST:PORT"
    )
    parser.add_integer("num-processes", "how many processes run the job", group=group, metavar="N")
    parser.add_integer("process-id", "this process's index, 0 to N-1; 0 writes the report", group=group, metavar="I")
    parser.add_switch(
        "distributed", "join a multi-process run that JAX detects (TPU pod slice, SLURM, Open MPI)", group=group
    )
    parser.add_integer(
        "init-timeout",
        "seconds to wait for every process to join",
        default=300,
        minimum=1,
        group=group,
        metavar="SECONDS",
    )
    return parser


def parse_args(argv: list[str]) -> tuple[ConfigDict, str]:
    """The config and workdir of a command line; joins a multi-process run first
    if the flags (or the environment) ask for one, before JAX's devices are used.

    Raises:
      UserError: a bad command line (one line: see :class:`admmprune.app.cli.Parser`).
    """
    args = build_parser().parse(argv)
    join_run(args)
    config = args.config
    if args.ratio is not None:
        config.prune.ratio = args.ratio
    if args.stages is not None:
        config.prune.stages = args.stages
    if args.method is not None:
        config.prune.method = args.method
    if args.sparsity is not None:
        config.prune.sparsity = args.sparsity
    return config, args.workdir or cli.default_workdir(config)


def apply_override(config: ConfigDict, key: str, text: str) -> None:
    """Sets ``config.<key>`` from its command-line text, parsed as the field's
    type, as ``--config.<key>=<text>`` does.

    Raises:
      UserError: an unknown key or a value of the wrong type.
    """
    cli.apply_overrides(config, [f"--config.{key}={text}"])


def join_run(args: SimpleNamespace) -> None:
    """Calls ``jax.distributed.initialize`` if the flags (or environment) ask for
    several processes; before anything else uses JAX's devices."""
    from admmprune.runtime import distributed

    distributed.initialize(
        args.coordinator,
        args.num_processes,
        args.process_id,
        auto=args.distributed,
        timeout=args.init_timeout,
        exit_on_timeout=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body():
        config, workdir = parse_args(argv)
        from absl import logging as absl_logging

        # tfds logs absl warnings (no OpenCV, a variant folder without info) that
        # are not actionable here.
        absl_logging.set_verbosity(absl_logging.ERROR)
        from admmprune.app import pipeline  # heavy imports after argument errors

        pipeline.run(config, workdir)

    return run_cli(body, interrupted="interrupted; rerun the same command to resume from the last checkpoint")


__all__ = ["apply_override", "build_parser", "join_run", "load_config", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
