"""A real 2-round run on MNIST, shared by the end-to-end tests that read its results."""

from __future__ import annotations

import pytest

from coordinator.results import load_results
from tests.e2e.runner import coordinator, results_path


@pytest.fixture(scope="session")
def two_round_run(tmp_path_factory, data_dir):
    """(stdout, results, run_dir) of `coordinator run --local --rounds 2` on real MNIST."""
    out = tmp_path_factory.mktemp("runs")
    done = coordinator("run", "--local", "--rounds", "2", "--data-dir", str(data_dir), "--out", str(out))
    assert done.returncode == 0, done.stderr + done.stdout
    run_dir = results_path(done.stdout).parent
    return done.stdout, load_results(run_dir), run_dir
