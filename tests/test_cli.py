"""The command lines' arguments (admmprune.app.cli on absl flags): parsed as
users type them, and every mistake one ``error:`` line."""

import pytest

from admmprune import train
from admmprune._errors import UserError
from admmprune.app import cli


def test_config_overrides_are_typed_and_may_come_before_the_config():
    config, workdir = train.parse_args(
        [
            "--config.admm.rho=0.5",  # before --config: still applies to it
            "--config",
            "smoke",
            "--config.dense.epochs",  # the value as the next argument
            "3",
            "--config.prune.stages=0.5,0.75",
            "--config.progress=false",
            "--config.data.data_dir=/data",
            "--stages",
            "0.5,0.8",
            "--ratio=0.8",
        ]
    )
    assert config.admm.rho == 0.5 and config.dense.epochs == 3 and config.progress is False
    assert config.data.data_dir == "/data" and config.data.limit == 1024  # smoke's
    assert config.prune.ratio == 0.8 and config.prune.stages == (0.5, 0.8)  # the shorthand wins
    assert workdir == "runs/lenet5-mnist-admm-0.8"
    config, _ = train.parse_args(["--config.prune.stages=0.9"])
    assert config.prune.stages == (0.9,) and config.data.limit is None  # the default config


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config.nope=1"], "unknown config key 'nope' (the config has: admm, "),
        (["--config.admm.nope=1"], "unknown config key 'admm.nope' (admm has: "),
        (["--config.data.limit=2.5"], "bad value '2.5' for config key 'data.limit' (type int)"),
        (["--config.admm.rho", "fast"], "bad value 'fast' for config key 'admm.rho' (type float)"),
        (["--rati", "0.5"], "unrecognized arguments: --rati (did you mean --ratio?)"),
        (["stray"], "unrecognized arguments: stray"),
        (["--config"], "--config needs a value"),
        (["--stages", "0.5,x"], "--stages must be comma-separated numbers, got '0.5,x'"),
        (["--num-processes", "2.5"], "--num-processes must be an integer, got '2.5'"),
        (["--distributed=maybe"], "--distributed must be true or false, got 'maybe'"),
    ],
)
def test_bad_command_lines_are_one_user_error(args, message):
    with pytest.raises(UserError) as e:
        train.parse_args(args)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_helpfull_lists_every_config_field_with_the_given_configs_values(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--config", "smoke", "--helpfull"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config.FIELD=VALUE" in out and "--init-timeout SECONDS" in out
    assert "--config.data.limit=1024  (int)" in out and "--config.admm.rho=0.01  (float)" in out


def test_apply_override_parses_as_the_field_type():
    config = cli.load_config("default")
    train.apply_override(config, "prune.stages", "0.5,0.9")
    train.apply_override(config, "data.normalize", "False")
    assert config.prune.stages == (0.5, 0.9) and config.data.normalize is False
    with pytest.raises(UserError, match="bad value 'x' for config key 'seed'"):
        train.apply_override(config, "seed", "x")


def test_a_parser_without_config_refuses_its_overrides_and_counts_positionals():
    parser = cli.Parser("prog", description="")
    parser.add_positional("path", "a path", required=False)
    parser.add_integer("n", "a count", default=2, minimum=1)
    args = parser.parse(["--n", "3", "p"])
    assert (args.path, args.n) == ("p", 3)
    assert parser.parse([]).path is None
    for argv, message in (
        (["--config.x=1"], "unrecognized arguments: --config.x=1"),
        (["a", "b"], "unrecognized arguments: b"),
        (["--n", "0"], "--n must be an integer >= 1, got '0'"),
    ):
        with pytest.raises(UserError, match="^" + message.replace(".", r"\.").replace("(", r"\(")):
            parser.parse(argv)
