"""`coordinator run` end to end: real worker processes, real gRPC, real MNIST."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.results import load_results
from coordinator.progress import round_label
from tests.e2e.runner import coordinator
from tests.support import ctrl_c_reaches_it, free_port
from tests.relay_checks import assert_objectives_carried, assert_results_shape
from weightrelay.data import FILES, read_idx_file

pytestmark = pytest.mark.e2e


def test_results_hold_two_rounds_of_four_evaluations(two_round_run):
    _, results, _ = two_round_run
    assert_results_shape(results, rounds=2)
    assert results["config"]["torch_objective"] == "swap:1,7"


def test_each_framework_carries_its_own_objective(two_round_run):
    _, results, _ = two_round_run
    assert_objectives_carried(results)


def test_one_line_per_phase_with_accuracy_and_swap_rate(two_round_run):
    stdout, results, _ = two_round_run
    for item in results["rounds"]:
        for evaluation in item["evaluations"]:
            expected = f"{evaluation['phase']:<22} acc {evaluation['accuracy']:.4f}"
            lines = [l for l in stdout.splitlines() if l.startswith(round_label(item["round"], 2)) and expected in l]
            assert len(lines) == 1 and f"swap 1<->7 {evaluation['swap_rate']:.3f}" in lines[0]


def test_unreachable_worker_is_named_with_its_address(tmp_path):
    port = free_port()
    done = coordinator("run", "--torch", f"127.0.0.1:{port}", "--keras", f"127.0.0.1:{free_port()}",
                       "--connect-timeout", "2", "--out", str(tmp_path))
    assert done.returncode == 3
    assert f"torch worker unreachable at 127.0.0.1:{port}: is it running?" in done.stderr


def test_settings_no_worker_takes_are_refused_at_once_without_connecting(tmp_path):
    started = time.monotonic()
    done = coordinator("run", "--lr", "1e30", "--torch", "127.0.0.1:1", "--connect-timeout", "60", "--out", str(tmp_path / "runs"))
    assert done.returncode == 2 and "argument --lr" in done.stderr and "coordinator run --resume" not in done.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "runs").exists()  # no connection tried, no run directory


def test_workers_with_different_data_are_refused(tmp_path, data_dir, torch_worker, start_worker):
    subset = tmp_path / "mnist-subset"
    subset.mkdir()
    for stem in FILES.values():  # the real files, cut to their first 1000 records
        array, _ = read_idx_file(next(data_dir.glob(f"{stem}*")))
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in (1000, *array.shape[1:]))
        (subset / f"{stem}.gz").write_bytes(gzip.compress(header + array[:1000].tobytes()))
    keras_small = start_worker("keras", subset)
    done = coordinator("run", "--torch", torch_worker.address, "--keras", keras_small.address, "--out", str(tmp_path / "runs"))
    assert done.returncode == 4, done.stderr
    assert "workers hold different data" in done.stderr and str(subset) in done.stderr
    failed = load_results(next((tmp_path / "runs").iterdir()))
    assert failed["status"] == "failed" and "different data" in failed["error"]


def test_ctrl_c_stops_the_run_and_both_local_workers(tmp_path, data_dir):
    process = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "run", "--local", "--rounds", "50", "--data-dir", str(data_dir), "--out", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_reaches_it,
    )
    for line in process.stdout:
        if "torch trained" in line:
            break
    run_dir = next(tmp_path.iterdir())
    pids = [json.loads(p.read_text())["pid"] for p in (run_dir / "logs").glob("*.ready.json")]
    assert len(pids) == 2
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr
    assert load_results(run_dir)["status"] == "interrupted"
    deadline = time.monotonic() + 10
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()]
        time.sleep(0.1)
    assert not alive, f"worker processes {alive} outlived the coordinator"


def test_a_local_worker_that_cannot_start_is_named_with_its_cause(tmp_path):
    empty = tmp_path / "no-mnist-here"
    empty.mkdir()
    done = coordinator("run", "--local", "--rounds", "1", "--data-dir", str(empty), "--out", str(tmp_path / "runs"),
                       env={**os.environ, "WEIGHTRELAY_NO_DOWNLOAD": "1"})
    assert done.returncode == 6, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("coordinator: error: the local torch worker could not start: MNIST data directory")
    assert str(empty) in message and "t10k-images-idx3-ubyte.gz" in message


def test_swapped_addresses_are_refused(tmp_path, torch_worker, keras_worker):
    done = coordinator("run", "--torch", keras_worker.address, "--keras", torch_worker.address, "--out", str(tmp_path))
    assert done.returncode == 4, done.stderr
    assert f"the addresses are swapped: {keras_worker.address} is the keras worker" in done.stderr
