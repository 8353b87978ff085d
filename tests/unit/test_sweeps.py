"""Sweeps without workers: the t intervals, and sweep files refused before anything starts."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

from coordinator.errors import UsageError
from coordinator.stats import summary, t_cdf, t_quantile
from coordinator.sweep_file import compared, read_sweep
from tests.support import REPO

GOOD = """
seeds = 3
[base]
rounds = 2
max_train_samples = 1000
[grid]
torch_objective = ["swap:1,7", "swap:3,8"]
lr = [0.01, 0.05]
"""


@pytest.mark.parametrize("df", [1, 2, 3, 4, 9, 29, 120, 1000])
def test_the_t_quantile_and_distribution_agree_with_scipy(df):
    for p in (0.5, 0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-9, abs=1e-9)
    for t in (-3.0, -0.4, 0.0, 1.1, 6.0):
        assert t_cdf(t, df) == pytest.approx(scipy_stats.t.cdf(t, df), rel=1e-9, abs=1e-12)


def test_summary_is_the_student_t_interval_of_the_mean():
    values = list(np.random.default_rng(0).normal(0.9, 0.02, size=5))
    got = summary(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert got["n"] == 5 and got["mean"] == pytest.approx(np.mean(values)) and got["sd"] == pytest.approx(np.std(values, ddof=1))
    assert got["ci95"] == pytest.approx([low, high])
    assert summary(values[:1]) == {"n": 1, "mean": values[0], "sd": None, "ci95": None}


def test_a_good_file_crosses_the_grid_and_compares_the_trained_phases(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WEIGHTRELAY_DATA_DIR", str(data_dir))
    (tmp_path / "s.toml").write_text(GOOD)
    spec = read_sweep(tmp_path / "s.toml")
    assert [p.values for p in spec.points] == [{"torch_objective": o, "lr": lr} for o in ("swap:1,7", "swap:3,8") for lr in (0.01, 0.05)]
    assert spec.seeds == [0, 1, 2]
    config = spec.settings(spec.points[3], 2).config
    assert (config.seed, config.lr, config.objective_for("torch"), config.rounds, config.local) == (2, 0.05, "swap:3,8", 2, True)
    assert compared(spec, spec.points[0]) == [("torch_trained", "keras_trained")]
    placed = spec.settings(spec.points[0], 0, "ray").config
    assert not placed.local and placed.names() == ["torch", "keras"]


@pytest.mark.parametrize("text, message", [
    ("colour = 1\n" + GOOD, "unknown key 'colour'"),
    (GOOD + "colour = [1]\n", "unknown setting grid.colour"),
    (GOOD.replace("rounds = 2", "roundz = 2"), "unknown setting base.roundz"),
    (GOOD.replace("lr = [0.01, 0.05]", "lr = [0.01, -1]"), "key grid.lr: -1 must be more than 0"),
    (GOOD.replace("lr = [0.01, 0.05]", "lr = []"), "key grid.lr is an empty list"),
    (GOOD.replace('torch_objective = ["swap:1,7", "swap:3,8"]\nlr = [0.01, 0.05]', ""), "the grid is empty"),
    (GOOD.replace("lr = [0.01, 0.05]", "seed = [1, 2]"), "key grid.seed cannot be set in a sweep"),
    (GOOD.replace("rounds = 2", "torch = \"10.0.0.1:50051\""), "key base.torch cannot be set in a sweep"),
    (GOOD.replace('"swap:3,8"', '"swap:3,12"'), "key grid.torch_objective of sweep file"),
    (GOOD.replace("max_train_samples = 1000", "batch_size = 70000"), "key base.batch_size of sweep file"),
    (GOOD.replace("seeds = 3", "seeds = 0"), "key seeds: 0 must be at least 1"),
    (GOOD.replace("seeds = 3", "seeds = []"), "key seeds is an empty list"),
    (GOOD + "[resources]\ntorch = { gpus = 1 }\n", "unknown key resources.torch.gpus"),
    (GOOD.replace("seeds = 3", 'seeds = 3\ndifferences = ["torch_trained - jax_trained"]'), "'jax_trained' is no phase of point p0"),
    (GOOD.replace("rounds = 2", 'mode = "pairs"'), "key base.mode 'pairs'"),
])
def test_a_file_no_run_would_accept_is_refused_naming_the_key(tmp_path, data_dir, monkeypatch, text, message):
    monkeypatch.setenv("WEIGHTRELAY_DATA_DIR", str(data_dir))
    (tmp_path / "s.toml").write_text(text)
    with pytest.raises(UsageError) as refused:
        read_sweep(tmp_path / "s.toml")
    assert message in str(refused.value)


def coordinator_without_ray(*args: str) -> subprocess.CompletedProcess:
    """`coordinator ARGS` in a process where `import ray` fails, as without the extra."""
    code = "import sys; sys.modules['ray'] = None; from coordinator.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_the_command_refuses_before_anything_starts(tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("WEIGHTRELAY_DATA_DIR", str(data_dir))
    (tmp_path / "bad.toml").write_text(GOOD.replace("lr = [0.01, 0.05]", "lr = [0.01, 500]"))
    (tmp_path / "good.toml").write_text(GOOD)
    bad = coordinator_without_ray("sweep", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "out"))
    assert bad.returncode == 2 and "key grid.lr" in bad.stderr
    no_ray = coordinator_without_ray("sweep", str(tmp_path / "good.toml"), "--ray", "local", "--out", str(tmp_path / "out"))
    assert no_ray.returncode == 2 and "pip install 'weightrelay[ray]'" in no_ray.stderr
    assert not (tmp_path / "out").exists()
