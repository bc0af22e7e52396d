"""Command line: prune a network with ADMM (or a baseline) and write a report.

This file is intentionally short: the logic is in :mod:`admmprune.app.pipeline`,
which a notebook calls the same way.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys

from ml_collections import ConfigDict

from admmprune._errors import UserError, run_cli

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "configs")

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

Rerunning the same command resumes an interrupted run from its last checkpoint,
and says so when the run is already complete."""

EPILOG = """\
config overrides: --config.FIELD=VALUE for any field of the config, e.g.
  --config.admm.rho=0.01 --config.data.name=fashion_mnist --config.model.name=mlp
The fields are documented in admmprune/configs/default.py.

Every training step runs data-parallel on all devices this process sees. Several
processes (hosts) run one job when each is started with the same arguments plus
--coordinator HOST:PORT --num-processes N --process-id I (or the environment
variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID), or with
--distributed where JAX finds them itself (Cloud TPU pod slices, SLURM, Open MPI).
See docs/distributed.md."""


def load_config(spec: str) -> ConfigDict:
    """Loads ``get_config()`` from a config file path or a shipped config name."""
    path = spec
    if not os.path.exists(path):
        named = os.path.join(_CONFIG_DIR, f"{spec}.py")
        if os.sep not in spec and os.path.exists(named):
            path = named
        else:
            names = sorted(f[:-3] for f in os.listdir(_CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))
            raise UserError(f"no config file {spec!r}; give a path or one of: {', '.join(names)}")
    module_spec = importlib.util.spec_from_file_location("admmprune_user_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        config = module.get_config()
    except Exception as e:  # noqa: BLE001 - the user's file, whatever it raises: one line
        raise UserError(f"config {path} failed to load: {type(e).__name__}: {e}") from None
    if not isinstance(config, ConfigDict):
        raise UserError(f"get_config() in {path} must return an ml_collections.ConfigDict")
    return config


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.lower() in ("none", "null"):
            return None
        return text


def apply_override(config: ConfigDict, key: str, text: str) -> None:
    """Sets ``config.<key>`` from its command-line text, keeping the field's type."""
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "the config"
            choices = ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else "none"
            raise UserError(f"unknown config key {key!r} ({where} has: {choices})")
        if i < len(parts) - 1:
            node = node[part]
    value = _parse_value(text)
    if isinstance(node[parts[-1]], tuple) and isinstance(value, (int, float)):
        value = (value,)
    try:
        node[parts[-1]] = value
    except (TypeError, ValueError) as e:
        raise UserError(f"bad value {text!r} for config key {key!r}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line's flags (``--config.FIELD=VALUE`` overrides are parsed
    separately, by :func:`parse_args`)."""
    parser = argparse.ArgumentParser(
        prog="python -m admmprune.train", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default="default", help="config file (configs/X.py) or shipped name (default, smoke)")
    parser.add_argument("--ratio", help="fraction of channels removed per prunable layer, in (0, 1); default 0.9")
    parser.add_argument("--stages", help="comma-separated stage ratios ending at the ratio, e.g. 0.5,0.75,0.9")
    parser.add_argument(
        "--method",
        help="admm (default), or a method to compare it with on equal epochs: magnitude (filter pruning by "
        "prune.criterion, one-shot or iterative), l1_mask (learned L1-regularized channel masks), slimming "
        "(L1 on BatchNorm scales), relaxation (sigmoid channel gates with a FLOPs target), group_lasso; "
        "see admmprune/app/methods.py",
    )
    parser.add_argument("--workdir", help="the run's directory (default: runs/MODEL-DATASET-METHOD-RATIO)")
    group = parser.add_argument_group("multi-process runs (docs/distributed.md)")
    group.add_argument("--coordinator", help="HOST:PORT of process 0, the same for every process")
    group.add_argument("--num-processes", help="how many processes run the job")
    group.add_argument("--process-id", help="this process's index, 0 to N-1; 0 writes the report")
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-process run that JAX detects (TPU pod slice, SLURM, Open MPI)")
    group.add_argument("--init-timeout", default="300", help="seconds to wait for every process to join (300)")
    return parser


def parse_args(argv: list[str]) -> tuple[ConfigDict, str]:
    """The config and workdir of a command line; joins a multi-process run first
    if the flags (or the environment) ask for one, before JAX's devices are used."""
    args, rest = build_parser().parse_known_args(argv)
    join_run(args)

    config = load_config(args.config)
    overrides = []
    i = 0
    while i < len(rest):
        item = rest[i]
        if not item.startswith("--config."):
            raise UserError(f"unrecognized argument {item!r}; see --help")
        key, sep, value = item[len("--config."):].partition("=")
        if not sep:
            if i + 1 >= len(rest):
                raise UserError(f"--config.{key} needs a value")
            i += 1
            value = rest[i]
        overrides.append((key, value))
        i += 1
    for key, value in overrides:
        apply_override(config, key, value)
    if args.ratio is not None:
        try:
            ratio = float(args.ratio)
        except ValueError:
            raise UserError(f"--ratio must be a number in (0, 1), got {args.ratio!r}") from None
        config.prune.ratio = ratio
    if args.stages is not None:
        try:
            config.prune.stages = tuple(float(s) for s in args.stages.split(",") if s.strip())
        except ValueError:
            raise UserError(f"--stages must be comma-separated numbers, got {args.stages!r}") from None
    if args.method is not None:
        config.prune.method = args.method
    workdir = args.workdir or os.path.join(
        "runs", f"{config.model.name}-{config.data.name}-{config.prune.method}-{config.prune.ratio:g}"
    )
    return config, workdir


def join_run(args: argparse.Namespace) -> None:
    """Calls ``jax.distributed.initialize`` if the flags (or environment) ask for
    several processes; before anything else uses JAX's devices."""
    try:
        timeout = int(args.init_timeout)
    except ValueError:
        raise UserError(f"--init-timeout must be a number of seconds, got {args.init_timeout!r}") from None
    from admmprune.runtime import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id, auto=args.distributed,
                           timeout=timeout, exit_on_timeout=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def body():
        config, workdir = parse_args(argv)
        from absl import logging as absl_logging

        # tfds logs absl warnings (no OpenCV, a variant folder without info) that
        # are not actionable here.
        absl_logging.set_verbosity(absl_logging.ERROR)
        from admmprune import pipeline  # heavy imports after argument errors

        pipeline.run(config, workdir)

    return run_cli(body, interrupted="interrupted; rerun the same command to resume from the last checkpoint")


if __name__ == "__main__":
    sys.exit(main())
