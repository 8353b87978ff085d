"""Runs that meet trouble: a stopped worker, a killed worker and --resume, SIGTERM, TLS with a token.
Real worker processes, real gRPC, real MNIST."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coordinator.results import load_results
from tests.e2e.runner import coordinator, results_path
from tests.support import REPO

pytestmark = pytest.mark.e2e


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()]


def start_run(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "coordinator", "run", "--no-report", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_line(process: subprocess.Popen, text: str) -> None:
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"the run ended before printing {text!r}: {process.stderr.read()}")


def test_a_stopped_worker_fails_the_round_within_its_deadline(start_worker, tmp_path):
    frozen, keras = start_worker("torch"), start_worker("keras")
    process = start_run("--torch", frozen.address, "--keras", keras.address, "--rounds", "2", "--train-timeout", "5",
                        "--out", str(tmp_path))
    try:
        wait_for_line(process, "moved torch->keras")  # round 0's Train starts next
        time.sleep(0.5)
        frozen.process.process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = process.communicate(timeout=60)
        took = time.monotonic() - stopped
    finally:
        frozen.process.process.send_signal(signal.SIGCONT)
        if process.poll() is None:
            process.kill()
    assert process.returncode == 5, stderr
    assert "round 0, torch trains (Train): the torch worker at " + frozen.address in stderr
    assert "did not finish within its deadline" in stderr and "--resume" in stderr
    assert took < 5 + 5
    assert load_results(next(tmp_path.iterdir()))["status"] == "failed"


def test_a_killed_worker_and_resume_give_the_uninterrupted_run(tmp_path, data_dir):
    flags = ["--local", "--rounds", "4", "--max-train-samples", "3000", "--data-dir", str(data_dir)]
    whole = coordinator("run", "--no-report", *flags, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    uninterrupted = load_results(results_path(whole.stdout).parent)

    process = start_run(*flags, "--out", str(tmp_path / "broken"))
    wait_for_line(process, "round   2 (3/4)")  # round 2 has begun
    run_dir = next((tmp_path / "broken").iterdir())
    torch_pid = json.loads((run_dir / "logs" / "torch-worker.ready.json").read_text())["pid"]
    subprocess.run(["kill", "-9", str(torch_pid)], check=True)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode in (3, 5), stderr
    assert "torch worker" in stderr and "round 2" in stderr and "rounds 0-1 are kept" in stderr
    assert f"coordinator run --resume {run_dir}" in stderr
    broken = load_results(run_dir)
    assert broken["status"] == "failed" and [r["round"] for r in broken["rounds"]] == [0, 1]

    resumed = coordinator("run", "--no-report", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    results = load_results(run_dir)
    assert results["status"] == "complete" and [r["round"] for r in results["rounds"]] == [0, 1, 2, 3]
    assert results["resumed"][0]["from_round"] == 2
    checksums = [[e["weights_sha256"] for r in res["rounds"] for e in r["evaluations"]] for res in (uninterrupted, results)]
    assert checksums[0] == checksums[1]
    assert sorted(p.name for p in (run_dir / "weights").iterdir()) == ["round-003-keras.safetensors", "round-003-torch.safetensors"]


def test_resume_refuses_a_complete_run(tmp_path):
    run_dir = tmp_path / "done"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps({"schema_version": 1, "status": "complete", "rounds": []}))
    (run_dir / "config.toml").write_text("[run]\nrounds = 1\n")
    done = coordinator("run", "--resume", str(run_dir))
    assert done.returncode == 2 and "that run is complete" in done.stderr


def test_sigterm_stops_the_run_and_both_local_workers(tmp_path, data_dir):
    process = start_run("--local", "--rounds", "50", "--data-dir", str(data_dir), "--out", str(tmp_path))
    wait_for_line(process, "torch trained")
    run_dir = next(tmp_path.iterdir())
    pids = [json.loads(p.read_text())["pid"] for p in (run_dir / "logs").glob("*.ready.json")]
    assert len(pids) == 2
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 143 and "terminated" in stderr
    assert load_results(run_dir)["status"] == "interrupted"
    deadline = time.monotonic() + 10
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pids), f"worker processes {alive(pids)} outlived the coordinator"


def test_a_run_over_mutual_tls_with_a_token(start_worker, tmp_path):
    certs = tmp_path / "certs"
    subprocess.run([str(REPO / "docker" / "make-certs.sh"), str(certs)], check=True, capture_output=True)
    (certs / "token").write_text("relay-token")
    server = ["--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
              "--tls-client-ca", str(certs / "ca.crt"), "--token-file", str(certs / "token")]
    torch, keras = start_worker("torch", extra=server), start_worker("keras", extra=server)
    client = ["--tls-ca", str(certs / "ca.crt"), "--tls-cert", str(certs / "client.crt"), "--tls-key", str(certs / "client.key")]
    addresses = ["--torch", torch.address, "--keras", keras.address, "--rounds", "2", "--max-train-samples", "3000", "--out", str(tmp_path / "runs")]
    refused = coordinator("run", "--no-report", *addresses, *client)  # no token
    assert refused.returncode == 5 and "UNAUTHENTICATED" in refused.stderr
    done = coordinator("run", "--no-report", *addresses, *client, "--token-file", str(certs / "token"))
    assert done.returncode == 0, done.stderr
    results = load_results(results_path(done.stdout).parent)
    assert results["status"] == "complete" and len(results["rounds"]) == 2
    # Worker to worker, over mutual TLS with the token: the pulling worker's certificate is good for clients too.
    assert {move["path"] for round_ in results["rounds"] for move in round_["moves"]} == {"pull"}
    for worker in (torch, keras):  # on the data channel, over TLS: no pull fell back to gRPC
        log = worker.process.log_path.read_text()
        assert ": on its data channel" in log and "over gRPC instead" not in log
    assert results["config"]["token_file"] == str(certs / "token")
    assert "relay-token" not in (results_path(done.stdout).parent / "config.toml").read_text()
