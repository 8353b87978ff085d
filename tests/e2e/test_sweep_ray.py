"""`coordinator sweep --ray` on a Ray cluster of three nodes on 127.0.0.1 in this machine: a node
removed while runs are on it loses nothing (every run's weights equal an undisturbed sweep's).
Skipped without the ray extra (pip install 'weightrelay[ray]')."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.e2e

#: 6 tiny runs of two torch workers each (torch starts fastest): 2 learning rates x 3 seeds.
SWEEP = """
seeds = 3
[base]
workers = "torch,torch-b"
rounds = 2
max_train_samples = 2000
[grid]
lr = [0.01, 0.05]
"""
#: Ray reads loopback addresses as this machine's outward one unless told it has no cluster beyond it.
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
#: Ray's own override of how long a node waits for its GCS server to start (30 s by default): a loaded two-core
#: CI machine once took longer, and the test failed before it began.
RAY_STARTUP = {"RAY_gcs_server_port_wait_time_s": "120"}


@pytest.fixture
def cluster(monkeypatch):
    """A head node (no CPUs: the drivers only) and two nodes of 4 CPUs, every process on 127.0.0.1; a lost
    node is known dead after about 1.5 s (Ray's default waits longer: the sweep then tries it again once more)."""
    for key, value in {**LOOPBACK_ONLY, **RAY_STARTUP}.items():
        monkeypatch.setenv(key, value)
    pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'weightrelay[ray]')")
    from ray.cluster_utils import Cluster

    loopback = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
    quick = {"health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": quick, **loopback})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=4, **loopback)
        yield cluster
    finally:
        cluster.shutdown()


def sweep(cluster, out, on_start=None) -> dict:
    """`coordinator sweep --ray` of SWEEP, 2 runs at a time; `on_start(event)` sees each run_started event."""
    (out / "sweep.toml").write_text(SWEEP)
    process = subprocess.Popen([sys.executable, "-m", "coordinator", "sweep", str(out / "sweep.toml"), "--ray", cluster.address,
                                "--parallel", "2", "--json", "--no-report", "--out", str(out)], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **LOOPBACK_ONLY})
    try:
        for line in process.stdout:
            event = json.loads(line)
            if event["event"] == "run_started" and on_start:
                on_start(event)
        assert process.wait(300) == 0, process.stderr.read()
    finally:
        process.kill()
        process.wait()
    [sweep_dir] = [d for d in out.iterdir() if d.is_dir()]
    return json.loads((sweep_dir / "sweep.json").read_text())


def weights(result: dict) -> dict[str, dict[str, str]]:
    return {run["run_dir"]: run["weights_sha256"] for point in result["points"] for run in point["runs"]}


def test_a_sweep_that_loses_a_node_gives_the_weights_of_one_that_did_not(cluster, tmp_path):
    (tmp_path / "calm").mkdir()
    calm = sweep(cluster, tmp_path / "calm")
    assert calm["status"] == "complete" and calm["counts"]["complete"] == 6
    assert all(run["attempts"] == 1 for point in calm["points"] for run in point["runs"])
    used = {node for point in calm["points"] for run in point["runs"] for node in run["nodes"].values()}
    assert len(used) == 2  # spread over both nodes with CPUs

    removed = []

    def remove_a_node_under_a_run(event):
        if removed:
            return
        node = next(n for n in cluster.worker_nodes if n.node_id in event["nodes"].values())
        cluster.remove_node(node, allow_graceful=False)
        removed.append((event["run"], node.node_id))

    (tmp_path / "lost").mkdir()
    lost = sweep(cluster, tmp_path / "lost", remove_a_node_under_a_run)
    [(run, node)] = removed
    assert lost["status"] == "complete" and lost["counts"]["complete"] == 6
    record = next(r for p in lost["points"] for r in p["runs"] if r["run_dir"].endswith(run))
    assert record["attempts"] >= 2 and record["errors"], record
    assert node not in record["nodes"].values()  # started again on the node that is left
    assert weights(lost) == weights(calm)
    assert all(all(sha) for sha in weights(lost).values())
