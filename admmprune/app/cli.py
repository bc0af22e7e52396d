"""What the command lines share: typed absl flags, a config with
``--config.FIELD=VALUE`` overrides, help text, and one-line errors.

``python -m admmprune.train | analyze | export | oneshot`` each describe their arguments
with a :class:`Parser`: typed flags (absl parsers: integers, numbers, lists),
positional arguments, and for train and analyze ``--config`` with the
overrides of ``ml_collections.config_flags``, which parse each value as the
type of the field it sets. :meth:`Parser.parse` turns every mistake into a
:class:`~admmprune.UserError` (one ``error:`` line and exit status 2 through
:func:`admmprune._errors.run_cli`) rather than absl's usage dump, and prints
the help for ``--help``.

Each parse builds its own ``absl.flags.FlagValues``, never the global
``FLAGS``: the commands are functions that tests, notebooks and other
commands (analyze runs train's config handling) call many times in one
process.

``--config`` takes a config file or the name of a shipped config
(``admmprune/configs/``). The file is loaded here, so that a missing or broken
one is a one-line error, and handed to ``config_flags.DEFINE_config_dict``,
which defines the overrides.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import re
import shutil
import sys
import textwrap
import types
from collections.abc import Sequence
from typing import Any, NamedTuple

from absl import flags
from ml_collections import ConfigDict, config_flags

from admmprune import configs
from admmprune._errors import UserError

#: The directory of the shipped configs, selectable by name (``--config smoke``).
CONFIG_DIR = os.path.dirname(os.path.abspath(configs.__file__))
#: The arguments that print the help and exit (absl's and argparse's spellings).
HELP = ("-h", "--help", "--helpshort", "--helpfull", "-?")
_CONFIG = "config"
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]*)")


# --- configs -----------------------------------------------------------------------


def shipped_configs() -> list[str]:
    """The names of the configs in :data:`CONFIG_DIR`."""
    return sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


def load_config(spec: str) -> ConfigDict:
    """Loads ``get_config()`` from a config file path or a shipped config name.

    Raises:
      UserError: there is no such file or name, the file fails to load, or its
        ``get_config()`` does not return a ``ConfigDict``.
    """
    path = spec
    if not os.path.exists(path):
        named = os.path.join(CONFIG_DIR, f"{spec}.py")
        if os.sep not in spec and os.path.exists(named):
            path = named
        else:
            raise UserError(f"no config file {spec!r}; give a path or one of: {', '.join(shipped_configs())}")
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


def default_workdir(config: ConfigDict) -> str:
    """``runs/MODEL-DATASET-METHOD-RATIO``: where a run of ``config`` goes unless told
    (``METHOD-SPARSITY-RATIO`` for a sparsity other than channel, ``METHOD-NofM`` for N:M)."""
    p = config.prune
    pruned = f"{p.method}-{p.ratio:g}"
    sparsity = p.get("sparsity", "channel")
    if sparsity == "nm":
        pruned = f"{p.method}-{p.n}of{p.m}"
    elif sparsity != "channel":
        pruned = f"{p.method}-{sparsity}-{p.ratio:g}"
    return os.path.join("runs", f"{config.model.name}-{config.data.name}-{pruned}")


def _field(config: ConfigDict, key: str) -> tuple[ConfigDict, str]:
    """The ConfigDict holding ``key`` (dotted) and the key's last part.

    Raises:
      UserError: no such field, naming what its section has.
    """
    node, parts = config, key.split(".")
    for i, part in enumerate(parts):
        if not isinstance(node, ConfigDict) or part not in node:
            where = ".".join(parts[:i]) or "the config"
            choices = ", ".join(sorted(node.keys())) if isinstance(node, ConfigDict) else "none"
            raise UserError(f"unknown config key {key!r} ({where} has: {choices})")
        if i < len(parts) - 1:
            node = node[part]
    return node, parts[-1]


def apply_overrides(config: ConfigDict, overrides: Sequence[str]) -> ConfigDict:
    """Sets fields of ``config`` in place from ``--config.FIELD=VALUE`` arguments.

    Each value is parsed as its field's type (``config_flags``): ``0.5,0.75``
    or ``(0.5, 0.75)`` for a tuple, ``true``/``false`` for a bool; a
    ``--config.FIELD VALUE`` pair is two arguments.

    Raises:
      UserError: an unknown field, a value of the wrong type, or an argument
        that is not an override.
    """
    overrides = list(overrides)
    for item in overrides:
        if item.startswith("-") and not _OVERRIDE.match(item):
            raise UserError(f"{item!r} is not a --config.FIELD=VALUE override")
    fv = flags.FlagValues()
    _define_config(fv, config, overrides)
    leftover = _parse_flags(fv, overrides, config)
    if leftover:
        raise UserError(f"unrecognized arguments: {' '.join(leftover)}; see --help")
    return config


def _define_config(fv: flags.FlagValues, config: ConfigDict, argv: list[str], help_text: str = "the config") -> None:
    for item in argv:
        if item == "--":
            break
        m = _OVERRIDE.match(item)
        if m:
            _field(config, m.group(1))
    try:
        # Not locked: the config stays a plain ConfigDict for the code that reads it.
        config_flags.DEFINE_config_dict(
            _CONFIG, config, help_text, flag_values=fv, lock_config=False, sys_argv=["prog", *argv]
        )
    except flags.Error as e:  # a field of a type config_flags cannot parse
        raise UserError(" ".join(str(e).split())) from None


# --- flags -------------------------------------------------------------------------


class _Refused(ValueError):
    """A parser's own message for a bad value, shown as it is."""


class _BadValue(flags.IllegalFlagValueError):
    """A bad value of one of our flags, with its one-line message."""


class _Flag(flags.Flag):
    """An absl flag whose bad value reads ``--name must be <what>, got 'value'``."""

    def _parse(self, argument):
        try:
            return self.parser.parse(argument)
        except _Refused as e:
            raise _BadValue(str(e)) from None
        except (TypeError, ValueError, OverflowError):
            what = self.parser.syntactic_help or self.parser.flag_type()
            raise _BadValue(f"--{self.name} must be {what}, got {argument!r}") from None


class _OpenInterval(flags.FloatParser):
    """A number strictly between two bounds (absl's bounds are inclusive)."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high
        self.syntactic_help = f"a number in ({low:g}, {high:g})"

    def is_outside_bounds(self, val: float) -> bool:
        return not self.low < val < self.high


class _Sequence(flags.ListParser):
    """Comma-separated values, each converted by ``convert``, as a tuple."""

    def __init__(self, convert, what: str):
        super().__init__()
        self.convert = convert
        self.syntactic_help = what

    def parse(self, argument):
        if isinstance(argument, (list, tuple)):
            return tuple(argument)
        return tuple(self.convert(s) for s in super().parse(argument) if s)


class _Choices(flags.ListParser):
    """Comma-separated names, each one of ``choices``, as a list."""

    def __init__(self, choices: Sequence[str], noun: str):
        super().__init__()
        self.choices, self.noun = tuple(choices), noun
        self.syntactic_help = f"comma-separated, from {','.join(self.choices)}"

    def parse(self, argument):
        if isinstance(argument, list):
            return argument
        items = [s for s in super().parse(argument) if s]
        unknown = [s for s in items if s not in self.choices]
        if unknown or not items:
            first = (unknown or [""])[0]
            raise _Refused(f"unknown {self.noun} {first!r}; choose from {', '.join(self.choices)}")
        return items


class Option(NamedTuple):
    """One argument of a command line, as its help and reference show it."""

    #: ``("--ratio",)``; empty for a positional argument.
    flags: tuple[str, ...]
    #: The flag's (or positional argument's) name.
    name: str
    #: What stands for its value in the help (``RATIO``); ``None`` for a switch.
    metavar: str | None
    default: Any
    help: str
    #: The heading it is listed under; ``None``: the command's own options.
    group: str | None
    required: bool


class _Spec(NamedTuple):
    option: Option
    parser: flags.ArgumentParser
    boolean: bool


class Parser:
    """A command line: typed absl flags, positional arguments and, optionally,
    ``--config`` with ``--config.FIELD=VALUE`` overrides.

    Each ``add_*`` method defines a flag; :meth:`parse` parses a command line
    into a namespace with one attribute per flag (dashes become underscores),
    per positional argument, and ``config`` (the ConfigDict with its
    overrides applied, or ``None``).

    Args:
      prog: how the command is run, for the usage line.
      description: the text after the usage line.
      epilog: the text after the options.
    """

    def __init__(self, prog: str, *, description: str, epilog: str = ""):
        self.prog, self.description, self.epilog = prog, description, epilog
        self._specs: list[_Spec] = []
        self._positionals: list[Option] = []
        self._config: tuple[str | None, str] | None = None

    # --- definitions

    def _add(self, name, parser, default, help, *, group, metavar, required=False, boolean=False):
        metavar = None if boolean else metavar or name.upper().replace("-", "_")
        option = Option((f"--{name}",), name, metavar, default, help, group, required)
        self._specs.append(_Spec(option, parser, boolean))

    def add_positional(self, name: str, help: str, *, required: bool = True) -> None:
        """A positional argument (at most one of them optional, the last)."""
        self._positionals.append(Option((), name, name, None, help, None, required))

    def add_config(self, help: str, *, default: str | None) -> None:
        """``--config FILE_OR_NAME`` and ``--config.FIELD=VALUE``; without a
        ``default``, overrides need an explicit ``--config``."""
        self._config = (default, help)

    def add_string(self, name, help, *, default=None, required=False, group=None, metavar=None) -> None:
        self._add(name, flags.ArgumentParser(), default, help, group=group, metavar=metavar, required=required)

    def add_switch(self, name, help, *, group=None) -> None:
        """A boolean flag: ``--name`` (also ``--noname``, ``--name=false``)."""
        parser = flags.BooleanParser()
        parser.syntactic_help = "true or false"
        self._add(name, parser, False, help, group=group, metavar=None, boolean=True)

    def add_integer(self, name, help, *, default=None, minimum=None, group=None, metavar=None) -> None:
        parser = flags.IntegerParser(lower_bound=minimum)
        parser.syntactic_help = "an integer" if minimum is None else f"an integer >= {minimum}"
        self._add(name, parser, default, help, group=group, metavar=metavar)

    def add_number(self, name, help, *, default=None, within=None, group=None, metavar=None) -> None:
        """A float flag; ``within=(low, high)``: strictly between them."""
        parser = flags.FloatParser() if within is None else _OpenInterval(*within)
        if within is None:
            parser.syntactic_help = "a number"
        self._add(name, parser, default, help, group=group, metavar=metavar)

    def add_sequence(self, name, help, *, convert=float, what="comma-separated numbers", group=None, metavar=None):
        """Comma-separated values converted by ``convert``: a tuple."""
        self._add(name, _Sequence(convert, what), None, help, group=group, metavar=metavar)

    def add_choices(self, name, help, *, choices, noun, group=None, metavar=None) -> None:
        """Comma-separated names from ``choices``: a list."""
        self._add(name, _Choices(choices, noun), None, help, group=group, metavar=metavar)

    # --- what it is

    def options(self) -> list[Option]:
        """Every argument, as the help lists them (without ``--help``)."""
        out = list(self._positionals)
        if self._config is not None:
            default, help = self._config
            out.append(Option(("--config",), _CONFIG, "CONFIG", default, help, None, False))
            what = "set any field of the config, parsed as the field's type (repeatable; --helpfull lists them)"
            out.append(Option(("--config.FIELD=VALUE",), "config.FIELD", None, None, what, None, False))
        return out + [s.option for s in self._specs]

    def _define(self, config: ConfigDict | None, argv: list[str]) -> flags.FlagValues:
        fv = flags.FlagValues()
        for spec in self._specs:
            o = spec.option
            flag = _Flag(spec.parser, flags.ArgumentSerializer(), o.name, o.default, o.help, boolean=spec.boolean)
            flags.DEFINE_flag(flag, fv)
        if config is not None:
            _define_config(fv, config, argv, self._config[1])
        return fv

    def _default_config(self) -> ConfigDict | None:
        default = self._config[0] if self._config is not None else None
        return None if default is None else load_config(default)

    def flag_values(self, config: ConfigDict | None = None) -> flags.FlagValues:
        """The absl flags that :meth:`parse` defines for a command line
        without overrides (``config``: the config of ``--config``; default
        its default, if the command has one)."""
        return self._define(config if config is not None else self._default_config(), [])

    def format_help(self, *, full: bool = False, config: ConfigDict | None = None) -> str:
        """The help text; ``full`` adds every config field with its value in
        ``config`` (default: the default config)."""
        width = max(shutil.get_terminal_size().columns - 2, 40)
        usage = ["[-h]"]
        for o in self.options():
            if o.name == "config.FIELD":
                usage.append("[--config.FIELD=VALUE ...]")
            elif o.flags:
                text = f"{o.flags[0]} {o.metavar}" if o.metavar else o.flags[0]
                usage.append(text if o.required else f"[{text}]")
        usage += [o.name if o.required else f"[{o.name}]" for o in self._positionals]
        lines, indent = [f"usage: {self.prog}"], " " * len(f"usage: {self.prog}")
        for item in usage:  # wrapped between items, never inside one
            if len(lines[-1]) + 1 + len(item) > width and lines[-1] != indent:
                lines.append(indent)
            lines[-1] += f" {item}"
        lines.append("")
        if self.description:
            lines += [self.description.rstrip(), ""]
        what = "show this help and exit" + (" (--helpfull: with every config field)" if self._config else "")
        sections: dict[str, list[Option]] = {}
        if self._positionals:
            sections["positional arguments"] = list(self._positionals)
        sections["options"] = [Option(("-h", "--help"), "help", None, None, what, None, False)]
        for o in self.options():
            if o.flags:
                sections.setdefault(o.group or "options", []).append(o)
        for title, items in sections.items():
            lines.append(f"{title}:")
            for o in items:
                lines += _format_option(o, width)
            lines.append("")
        config = config if config is not None or not full else self._default_config()
        if full and config is not None:
            lines.append("config fields (--config.FIELD=VALUE), with their values in this --config:")
            for key, value, kind in _flatten(config):
                lines.append(f"  --config.{key}={value}  ({kind})")
            lines.append("")
        if self.epilog:
            lines += [self.epilog.rstrip(), ""]
        return "\n".join(lines).rstrip() + "\n"

    # --- parsing

    def parse(self, argv: Sequence[str]) -> types.SimpleNamespace:
        """Parses a command line (without the program name).

        Prints the help and raises ``SystemExit(0)`` for ``-h``/``--help``
        (``--helpfull``: with every config field).

        Raises:
          UserError: an unknown flag or config field, a bad value, a missing
            or broken config file, a missing or surplus positional argument.
        """
        argv = list(argv)
        flag_part = argv[: argv.index("--")] if "--" in argv else argv
        if any(a in HELP for a in flag_part):
            full = "--helpfull" in flag_part
            spec = self._split_config(argv)[0] if full else None
            sys.stdout.write(self.format_help(full=full, config=load_config(spec) if spec is not None else None))
            raise SystemExit(0)
        spec, rest, overrides = self._split_config(argv)
        if overrides and spec is None:
            raise UserError(f"{overrides[0]} overrides a config: it needs --config")
        config = load_config(spec) if spec is not None else None
        fv = self._define(config, rest)
        leftover = _parse_flags(fv, rest, config)
        values = {s.option.name.replace("-", "_"): fv[s.option.name].value for s in self._specs}
        if len(leftover) > len(self._positionals):
            raise UserError(f"unrecognized arguments: {' '.join(leftover[len(self._positionals) :])}; see --help")
        missing = [o.name for o in self._positionals[len(leftover) :] if o.required]
        missing += [f"--{s.option.name}" for s in self._specs if s.option.required and values[s.option.name] is None]
        if missing:
            raise UserError(f"the following arguments are required: {', '.join(missing)}; see --help")
        for i, o in enumerate(self._positionals):
            values[o.name] = leftover[i] if i < len(leftover) else None
        if self._config is not None:
            values[_CONFIG] = config
        return types.SimpleNamespace(**values)

    def _split_config(self, argv: list[str]) -> tuple[str | None, list[str], list[str]]:
        """``(the --config value or its default, argv without it, the overrides)``;
        ``--config`` may come anywhere, before or after its overrides."""
        if self._config is None:  # --config and its overrides are unknown flags, for absl to refuse
            return None, argv, []
        spec, rest, overrides = self._config[0], [], []
        items = iter(argv)
        for item in items:
            if item == "--":
                rest += [item, *items]
                break
            if item in ("--config", "-config"):
                spec = next(items, None)
                if spec is None:
                    raise UserError("--config needs a value: a config file or a shipped name; see --help")
            elif item.startswith(("--config=", "-config=")):
                spec = item.split("=", 1)[1]
            else:
                if _OVERRIDE.match(item):
                    overrides.append(item)
                rest.append(item)
        return spec, rest, overrides


def _parse_flags(fv: flags.FlagValues, argv: list[str], config: ConfigDict | None) -> list[str]:
    """Parses ``argv`` with ``fv``; returns the positional arguments.

    Raises:
      UserError: whatever absl or config_flags refuse, as one line.
    """
    fv.set_gnu_getopt(True)  # positional arguments anywhere, as argparse allows
    try:
        return fv(["prog", *argv])[1:]
    except _BadValue as e:
        raise UserError(str(e)) from None
    except flags.UnrecognizedFlagError as e:
        shown = e.flagvalue if str(e.flagvalue).startswith("-") else f"--{e.flagname}"
        close = difflib.get_close_matches(e.flagname, [n for n in fv if not n.startswith(f"{_CONFIG}.")], n=1)
        hint = f" (did you mean --{close[0]}?)" if close else ""
        raise UserError(f"unrecognized arguments: {shown}{hint}; see --help") from None
    except flags.IllegalFlagValueError as e:
        raise UserError(_override_error(str(e), argv, config)) from None
    except flags.Error as e:
        raise UserError(f"{' '.join(str(e).split())}; see --help") from None


def _override_error(message: str, argv: list[str], config: ConfigDict | None) -> str:
    """absl's ``flag --config.KEY=VALUE: reason`` as ``bad value VALUE for config key KEY (type): reason``."""
    m = re.match(rf"flag --{_CONFIG}\.([^=\s]+)=", message)
    if m is None or config is None:
        return " ".join(message.split())
    key, tail = m.group(1), message[m.end() :]
    values = [a.split("=", 1)[1] for a in argv if a.startswith((f"--{_CONFIG}.{key}=", f"-{_CONFIG}.{key}="))]
    values += [b for a, b in zip(argv, argv[1:], strict=False) if a in (f"--{_CONFIG}.{key}", f"-{_CONFIG}.{key}")]
    value, reason = tail, tail
    for v in values:
        if tail.startswith(f"{v}: "):
            value, reason = v, tail[len(v) + 2 :]
            break
    node, last = _field(config, key)
    kind = node.get_type(last).__name__
    return " ".join(f"bad value {value!r} for config key {key!r} (type {kind}): {reason}".split())


def _flatten(config: ConfigDict, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted key, value, type name)`` of every field, sections in order."""
    out = []
    for key, value in config.items():
        if isinstance(value, ConfigDict):
            out += _flatten(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value, config.get_type(key).__name__))
    return out


def _format_option(o: Option, width: int) -> list[str]:
    """An option as argparse lists it: the flag, its help wrapped beside or below it."""
    if not o.flags:
        invocation = o.name
    else:
        invocation = ", ".join(f"{f} {o.metavar}" if o.metavar and f.startswith("--") else f for f in o.flags)
    text = o.help
    if o.default is not None and o.default is not False and "default" not in text:
        text += f" (default: {o.default})"
    column = 24
    body = textwrap.wrap(text, max(width - column, 20)) or [""]
    if len(invocation) + 2 <= column - 2:
        first = [f"  {invocation:<{column - 2}}{body[0]}"]
        return first + [" " * column + b for b in body[1:]]
    return [f"  {invocation}"] + [" " * column + b for b in body]


__all__ = [
    "CONFIG_DIR",
    "HELP",
    "Option",
    "Parser",
    "apply_overrides",
    "default_workdir",
    "load_config",
    "shipped_configs",
]


# --- saved models -------------------------------------------------------------------


def find_model(path: str) -> tuple[str, dict[str, Any]]:
    """``(model dir, the run's data settings or {})`` for a saved model directory or a
    pipeline workdir (its dense model), as the analyze and oneshot commands take them.

    Raises:
      UserError: no such directory, a workdir without its dense model yet, or a
        damaged ``config.json``.
    """
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
        try:
            with open(run_config) as f:
                data = json.load(f).get("data", {})
            if not isinstance(data, dict):
                raise TypeError(f"its 'data' is a {type(data).__name__}")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"{run_config} is damaged ({detail}); restore it, or pass --dataset and give the model directory"
            ) from None
    return model_dir, data
