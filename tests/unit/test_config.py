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


# -- named workers, and the default workers' aliases -----------------------------------------
#: A config.toml as the coordinator wrote it before workers were named settings (5fdea1b).
OLD_CONFIG = """# Resolved settings of this run; repeat it with: coordinator run --config config.toml
[run]
rounds = 2
torch = "10.0.0.1:1"
keras = "10.0.0.1:2"
local = false
epochs = 1
batch_size = 64
lr = 0.01
momentum = 0.5
seed = 0
model = "mlp"
dataset = "mnist"
torch_objective = "identity"
keras_objective = "swap:2,5"
# data_dir is not set
out = "runs"
max_train_samples = 3000
connect_timeout = 15.0
call_timeout = 300.0
train_timeout = 1800.0
# tls_ca is not set
# tls_cert is not set
# tls_key is not set
# tls_server_name is not set
# token_file is not set
{worker}
# workers is not set
# order is not set
{objective}
via_coordinator = false
every_steps = 0
twin_objective = "identity"
"""
#: The keys of results.json's `config` before named workers: readers (compare, reports) keep them.
OLD_RESULT_KEYS = {"rounds", "torch", "keras", "local", "epochs", "batch_size", "lr", "momentum", "seed", "model", "dataset",
                   "torch_objective", "keras_objective", "data_dir", "out", "max_train_samples", "connect_timeout", "call_timeout",
                   "train_timeout", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "token_file", "worker", "workers", "order",
                   "objective", "via_coordinator", "every_steps", "twin_objective"}


def test_the_default_workers_are_a_table_and_their_flags_fill_the_named_settings():
    assert cfg.RunConfig().addresses() == {d.name: d.address() for d in cfg.DEFAULT_WORKERS}
    config = resolved(["--torch", "10.0.0.1:1", "--keras", "10.0.0.1:2", "--keras-objective", "swap:2,5"])
    assert config.worker == ["torch=10.0.0.1:1", "keras=10.0.0.1:2"] and config.objective == ["keras=swap:2,5"]
    assert config == resolved(["--worker", "torch=10.0.0.1:1", "--worker", "keras=10.0.0.1:2", "--objective", "keras=swap:2,5"])
    assert config.objective_for("torch") == "swap:1,7" and config.objective_for("jax") == "identity"
    assert resolved(["--torch", "10.0.0.1:1"]).addresses() == {"torch": "10.0.0.1:1", "keras": cfg.RunConfig().addresses()["keras"]}
    assert resolved(["--objective", "torch=swap:3,4", "--torch-objective", "identity"]).objective_for("torch") == "swap:3,4"  # the list wins


def test_the_default_workers_addresses_come_from_their_environment_variables(monkeypatch):
    monkeypatch.setenv("WEIGHTRELAY_TORCH_ADDRESS", "torch-worker:50051")
    assert resolved([]).addresses()["torch"] == "torch-worker:50051"
    assert resolved(["--torch", "10.0.0.1:1"]).addresses()["torch"] == "10.0.0.1:1"


def test_results_keep_the_keys_of_before_named_workers():
    config = resolved(["--torch", "10.0.0.1:1", "--torch-objective", "identity"])
    assert OLD_RESULT_KEYS <= set(config.to_dict())  # newer settings come on top
    assert (config.to_dict()["torch"], config.to_dict()["torch_objective"], config.to_dict()["keras_objective"]) == ("10.0.0.1:1", "identity", "identity")


def test_a_config_toml_from_before_named_workers_means_what_it_meant(tmp_path):
    old = tmp_path / "config.toml"
    old.write_text(OLD_CONFIG.format(worker="# worker is not set", objective="# objective is not set"))
    config = cfg.resolve(cfg.load_config_file(old))
    assert config.addresses() == {"torch": "10.0.0.1:1", "keras": "10.0.0.1:2"}
    assert (config.objective_for("torch"), config.objective_for("keras")) == ("identity", "swap:2,5")
    assert (config.rounds, config.max_train_samples) == (2, 3000)
    # its workers' list, when it had one, named the workers (the default workers' keys were not used) ...
    old.write_text(OLD_CONFIG.format(worker='worker = ["jax=10.0.0.1:3", "torch=10.0.0.1:4"]',
                                     objective='objective = ["torch=swap:3,8"]'))
    config = cfg.resolve(cfg.load_config_file(old))
    assert config.addresses() == {"jax": "10.0.0.1:3", "torch": "10.0.0.1:4"}
    assert (config.objective_for("torch"), config.objective_for("jax")) == ("swap:3,8", "identity")
    assert config.objective == ["torch=swap:3,8"]  # keras' objective: no worker of this run
    # ... and its settings, saved again, read back the same
    saved = tmp_path / "saved.toml"
    saved.write_text(cfg.to_toml(config))
    assert cfg.resolve(cfg.load_config_file(saved)) == config


def test_resume_flags_override_the_saved_workers(tmp_path):
    saved = tmp_path / "config.toml"
    saved.write_text(cfg.to_toml(resolved(["--torch", "10.0.0.1:1", "--keras", "10.0.0.1:2", "--torch-objective", "identity"])))
    args = build_parser().parse_args(["run", "--resume", str(tmp_path), "--torch", "10.0.0.1:9", "--torch-objective", "swap:4,5"])
    config = resolve_run_config(args, cfg.read_layer(saved))
    assert config.addresses() == {"torch": "10.0.0.1:9", "keras": "10.0.0.1:2"} and config.objective_for("torch") == "swap:4,5"


# -- settings no worker would take: refused before anything starts ---------------------------
MODEL_TOO_WIDE = """name = "too-wide"
[[layers]]
kind = "conv2d"
filters = 4
kernel = 40
[[layers]]
kind = "flatten"
[[layers]]
kind = "dense"
units = "classes"
"""


def run_coordinator(argv, capsys) -> tuple[int, str]:
    from coordinator.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("flags, named", [
    (["--lr", "1e30"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--momentum", "1"], "--momentum"),
    (["--epochs", "1001"], "--epochs"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", str(2**64 - 1)], "--seed"),  # a uint64, but the rounds' Train seeds would not be
    (["--objective", "jax=swap:3,8"], "--objective"),  # no worker of this run
    (["--dataset", "cifar10", "--model", "{model}"], "--model"),
    (["--order", "keras,jax"], "--order"),
], ids=["lr", "lr-nan", "momentum", "epochs", "seed", "seed-rounds", "objective-worker", "model", "order"])
def test_settings_no_worker_would_take_exit_2_at_once_naming_the_flag(flags, named, tmp_path, capsys):
    model = tmp_path / "too-wide.toml"
    model.write_text(MODEL_TOO_WIDE)
    out = tmp_path / "runs"
    argv = ["run", *[f.format(model=model) for f in flags], "--torch", "127.0.0.1:1", "--keras", "127.0.0.1:2",
            "--connect-timeout", "1", "--out", str(out), "--quiet"]
    code, err = run_coordinator(argv, capsys)
    assert code == 2, err
    assert named in err and "coordinator run --resume" not in err
    assert not out.exists()  # no run directory: nothing started


@pytest.fixture
def tiny_dataset(monkeypatch):
    """A known data set of three classes (none of the real ones has fewer than ten)."""
    from weightrelay import data

    spec = data.DatasetSpec("tiny", "cifar10-bin", ("a", "b", "c"), (0.5,) * 3, (0.25,) * 3)
    monkeypatch.setitem(data.DATASETS, "tiny", spec)
    return spec


def test_settings_from_a_config_file_are_refused_naming_the_key(tiny_dataset, tmp_path, capsys):
    path = tmp_path / "experiment.toml"
    path.write_text("lr = 1e30\n")
    code, err = run_coordinator(["run", "--config", str(path), "--torch", "127.0.0.1:1", "--out", str(tmp_path / "runs")], capsys)
    assert code == 2 and f"config file {path}: key lr: learning_rate must be" in err and not (tmp_path / "runs").exists()
    path.write_text('[run]\ntorch_objective = "identity"\nkeras-objective = "swap:1,7"\ndataset = "tiny"\n')
    code, err = run_coordinator(["run", "--config", str(path), "--torch", "127.0.0.1:1", "--out", str(tmp_path / "runs")], capsys)
    assert code == 2 and f"key keras-objective of config file {path}" in err


def test_objectives_are_checked_against_the_data_sets_classes(tiny_dataset, tmp_path, capsys):
    base = ["run", "--dataset", "tiny", "--torch", "127.0.0.1:1", "--connect-timeout", "1", "--out", str(tmp_path / "runs")]
    code, err = run_coordinator([*base, "--torch-objective", "swap:0,2", "--keras-objective", "swap:1,7"], capsys)
    assert code == 2 and "--keras-objective: objective 'swap:1,7': label 7 is out of range 0-2 (tiny has 3 classes)" in err
    code, err = run_coordinator(base, capsys)  # torch's default objective swaps 1 and 7
    assert code == 2 and "worker torch's default objective" in err and "label 7 is out of range 0-2" in err
    code, err = run_coordinator(["twin", "--dataset", "tiny", "--objective", "swap:2,3", "--out", str(tmp_path / "runs")], capsys)
    assert code == 2 and "--objective: objective 'swap:2,3': label 3 is out of range 0-2" in err
    assert not (tmp_path / "runs").exists()


def test_local_runs_are_checked_against_the_data_set_on_this_machine(tmp_path, capsys):
    from tests.support import write_idx_dataset

    data = write_idx_dataset(tmp_path / "fashion-mnist", train=100, test=20)
    model = tmp_path / "too-wide.toml"
    model.write_text(MODEL_TOO_WIDE)
    base = ["run", "--local", "--dataset", "fashion-mnist", "--data-dir", str(data), "--out", str(tmp_path / "runs")]
    code, err = run_coordinator([*base, "--model", str(model)], capsys)
    assert code == 2 and "--model" in err and "1x28x28 inputs, 10 classes" in err
    code, err = run_coordinator([*base, "--batch-size", "101"], capsys)
    assert code == 2 and "--batch-size 101 is larger than the 100 training samples of fashion-mnist" in err
    code, err = run_coordinator(["run", "--local", "--dataset", str(tmp_path / "nowhere"), "--out", str(tmp_path / "runs")], capsys)
    assert code == 2 and "--dataset: unknown data set" in err
    code, err = run_coordinator([*base, "--workers", "torch,tensorflow"], capsys)
    assert code == 2 and "--workers" in err and "'tensorflow'" in err
    code, err = run_coordinator(["twin", "--local", "--workers", "torch", "--out", str(tmp_path / "runs")], capsys)
    assert code == 2 and "twin training needs at least two workers" in err
    assert not (tmp_path / "runs").exists()
