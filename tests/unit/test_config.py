"""Run settings: defaults, then the TOML file, then flags; the saved file repeats the run."""

import dataclasses

import pytest

from coordinator import config as cfg
from coordinator.cli import build_parser, resolve_run_config
from coordinator.errors import UsageError


def resolved(argv, tmp_path=None, toml=None):
    if toml is not None:
        path = tmp_path / "experiment.toml"
        path.write_text(toml)
        argv = ["--config", str(path), *argv]
    return resolve_run_config(build_parser().parse_args(["run", *argv]))


def test_flags_override_the_file_which_overrides_the_defaults(tmp_path):
    config = resolved(["--rounds", "5", "--torch-objective", "swap:2,3"], tmp_path,
                      'rounds = 9\nepochs = 3\nbatch-size = 32\ntorch_objective = "swap:7,1"\nlocal = true\n')
    assert config.rounds == 5  # flag beats file
    assert config.objective_for("torch") == "swap:2,3"  # flag beats file
    assert (config.epochs, config.batch_size, config.local) == (3, 32, True)  # file beats default
    assert config.lr == cfg.RunConfig().lr and config.addresses()["keras"] == cfg.RunConfig().addresses()["keras"]  # defaults remain


def test_a_run_table_is_read_too(tmp_path):
    assert resolved([], tmp_path, "[run]\nseed = 7\n").seed == 7


def test_no_file_no_flags_gives_the_defaults():
    assert resolved([]) == cfg.RunConfig()


def test_every_run_and_twin_flag_has_a_config_key():
    commands = build_parser()._subparsers._group_actions[0].choices
    dests = {a.dest for name in ("run", "twin") for a in commands[name]._actions} - {"help", "config", "quiet", "json", "no_report", "resume"}
    assert dests == set(cfg.VALIDATORS)


def test_list_settings_read_back_from_the_saved_file(tmp_path):
    config = cfg.RunConfig(worker=["torch=127.0.0.1:1", "jax=127.0.0.1:2"], objective=["jax=swap:3,8"], workers="torch,jax", order="jax,torch")
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml(config))
    assert cfg.resolve(cfg.load_config_file(path), {}) == config
    assert config.addresses() == {"torch": "127.0.0.1:1", "jax": "127.0.0.1:2"}
    assert config.ring(["torch", "jax"]) == ["jax", "torch"]
    assert config.objective_for("jax") == "swap:3,8" and config.objective_for("torch") == "swap:1,7" and config.objective_for("jax-b") == "identity"


@pytest.mark.parametrize("flags,message", [
    (["--worker", "torch"], "is not NAME=HOST:PORT"),
    (["--worker", "Torch=127.0.0.1:1"], "is not a worker name"),
    (["--objective", "jax=swap:3"], "swap takes exactly two labels"),
    (["--workers", "torch,torch"], "each once"),
])
def test_bad_worker_flags_name_the_fix(flags, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", *flags])
    assert message in capsys.readouterr().err


def test_saved_config_reads_back_to_the_same_settings(tmp_path):
    config = cfg.resolve({"rounds": 3, "local": True, "lr": 0.05, "data_dir": '/data/"quoted" dir', "torch_objective": "perm:1,0,2,3,4,5,6,7,8,9"})
    path = tmp_path / "config.toml"
    path.write_text(cfg.to_toml(config))
    assert cfg.resolve(cfg.load_config_file(path), {}) == dataclasses.replace(config, objective=["torch=swap:0,1"])
    default = tmp_path / "default.toml"
    default.write_text(cfg.to_toml(cfg.RunConfig()))  # data_dir unset stays unset
    assert cfg.resolve(cfg.load_config_file(default), {}) == cfg.RunConfig()


@pytest.mark.parametrize(
    "toml, message",
    [("roundz = 3", "unknown key 'roundz'"), ("rounds = 0", "key rounds: 0 must be at least 1"),
     ("rounds = 2.5", "not a whole number"), ('torch = "nohost"', "is not HOST:PORT"),
     ('keras_objective = "swap:1"', "exactly two labels"), ("local = 1", "not true or false"),
     ("momentum = 1.0", "must be in [0, 1)"), ("rounds = [", "not valid TOML")],
)
def test_bad_files_are_usage_errors_naming_the_key(tmp_path, toml, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        resolved([], tmp_path, toml)


def test_bad_flags_exit_with_usage_code_and_the_reason(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["run", "--rounds", "0"])
    assert info.value.code == 2
    assert "0 must be at least 1" in capsys.readouterr().err

