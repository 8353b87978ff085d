"""`--mlflow` and `--tensorboard`: a real MLflow tracking server (SQLite store, 127.0.0.1) and real event
files, read back with MlflowClient and TensorBoard's own reader, after real relay runs on real MNIST."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import types
import urllib.request

import pytest

from tests.e2e.runner import coordinator, results_path
from tests.support import free_port

pytestmark = pytest.mark.e2e
mlflow_client = pytest.importorskip("mlflow.tracking")
ROUNDS = 3
PHASES = ("torch_trained", "keras_from_torch", "keras_trained", "torch_from_keras")


class MlflowServer:
    """`mlflow server` with a SQLite store and its own artifact folder, on a free port of 127.0.0.1."""

    def __init__(self, directory):
        self.uri = f"http://127.0.0.1:{free_port()}"
        port = self.uri.rsplit(":", 1)[1]
        command = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--backend-store-uri", f"sqlite:///{directory}/mlflow.db",
                   "--artifacts-destination", str(directory / "artifacts"), "--host", "127.0.0.1", "--port", port, "--workers", "1"]
        self.log = open(directory / "server.log", "w")
        self.process = subprocess.Popen(command, cwd=directory, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 180
        while not self.healthy():
            assert self.process.poll() is None and time.monotonic() < deadline, (directory / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        self.client = mlflow_client.MlflowClient(self.uri)

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(self.uri + "/health", timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # the server and the workers it started
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    yield server
    server.stop()


def event_accumulator(path):
    """TensorBoard's own reader, kept off TensorFlow (the test process imports no framework): TensorBoard uses
    its stub of TensorFlow where `tensorboard.compat.notf` can be imported."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture
def relay(tmp_path, torch_worker, keras_worker):
    """relay(*flags, rounds=ROUNDS): the arguments of a small relay against the session's torch and keras workers."""

    def arguments(*flags: str, rounds: int = ROUNDS) -> list[str]:
        return ["run", "--torch", torch_worker.address, "--keras", keras_worker.address, "--rounds", str(rounds),
                "--max-train-samples", "1000", "--out", str(tmp_path / "runs"), *flags]

    return arguments


def test_a_relay_logged_live_to_mlflow_and_tensorboard(tmp_path, relay, mlflow_server):
    done = coordinator(*relay("--mlflow", mlflow_server.uri, "--mlflow-experiment", "e2e", "--tensorboard", str(tmp_path / "tb")))
    assert done.returncode == 0, done.stderr + done.stdout
    run_dir = results_path(done.stdout).parent

    client = mlflow_server.client
    experiment = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    params = run.data.params
    assert params["rounds"] == str(ROUNDS) and params["model"] == "mlp" and params["max_train_samples"] == "1000"
    assert params["mlflow"] == mlflow_server.uri and "lr" in params and "seed" in params
    tags = run.data.tags
    assert tags["worker.torch.framework"].startswith("torch ") and tags["worker.keras.framework"].startswith("keras ")
    assert tags["worker.keras.backend"].startswith("tensorflow") and tags["worker.torch.device"] == "cpu"
    assert tags["model"].startswith("mlp: 1x28x28") and tags["dataset"] == "mnist" and len(tags["dataset.fingerprint"]) == 64
    assert tags["results.schema_version"] == "2"
    for phase in PHASES:
        for metric in ("accuracy", "loss", "swap_1_7"):
            history = client.get_metric_history(run.info.run_id, f"{phase}/{metric}")
            assert sorted(m.step for m in history) == list(range(ROUNDS)), (phase, metric)
    for phase in ("keras_from_torch", "torch_from_keras"):
        moved = client.get_metric_history(run.info.run_id, f"{phase}/differing_predictions")
        assert [m.value for m in moved] == [0.0] * ROUNDS
        assert all(m.value > 0 for m in client.get_metric_history(run.info.run_id, f"{phase}/move_bytes"))
    last = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "torch_trained/accuracy")}
    results = json.loads((run_dir / "results.json").read_text())
    assert last[ROUNDS - 1] == pytest.approx(results["rounds"][-1]["evaluations"][0]["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "config.toml", "report.html", "figures"} <= artifacts
    assert any(a.path.endswith(".png") for a in client.list_artifacts(run.info.run_id, "figures"))

    events = event_accumulator(tmp_path / "tb" / run_dir.name)
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert set(client.get_run(run.info.run_id).data.metrics) == scalars  # the same scalars in both
    for phase in PHASES:
        assert [s.step for s in events.Scalars(f"{phase}/accuracy")] == list(range(ROUNDS))
        assert [i.step for i in events.Images(f"{phase}/confusion_matrix")] == list(range(ROUNDS))
    assert {"torch_initial/confusion_matrix", "keras_initial/confusion_matrix"} <= images
    assert events.Images("torch_trained/confusion_matrix")[0].width == 160  # 10 classes, 16 pixels a cell
    hparams = events.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hparams)
    assert b"max_train_samples" in hparams["_hparams_/session_start_info"]


def test_an_unreachable_tracking_server_stops_the_run_before_it_starts(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    done = coordinator("run", "--local", "--rounds", "1", "--out", str(tmp_path / "runs"), "--mlflow", uri)
    assert done.returncode == 3 and uri in done.stderr and "does not answer" in done.stderr, done.stderr
    assert time.monotonic() - started < 60 and not (tmp_path / "runs").exists()  # no run directory, no worker started


def test_a_sweep_is_a_parent_run_with_a_child_per_experiment(tmp_path, mlflow_server, data_dir):
    """`coordinator sweep --mlflow` of 2 points x 2 seeds: a parent run (the sweep, its intervals as metrics)
    with a child run per experiment, each logged as a run is."""
    (tmp_path / "sweep.toml").write_text("seeds = 2\n[base]\nrounds = 1\nmax_train_samples = 300\n[grid]\nlr = [0.01, 0.05]\n")
    done = coordinator("sweep", str(tmp_path / "sweep.toml"), "--local", "--parallel", "2", "--mlflow", mlflow_server.uri,
                       "--mlflow-experiment", "sweep-e2e", "--no-report", "--out", str(tmp_path / "out"),
                       env={**os.environ, "WEIGHTRELAY_DATA_DIR": str(data_dir)})
    assert done.returncode == 0, done.stderr + done.stdout
    client = mlflow_server.client
    experiment = client.get_experiment_by_name("sweep-e2e")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("weightrelay.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 4 and len(runs) == 5 and parent.info.status == "FINISHED"
    assert {(c.data.params["lr"], c.data.params["seed"]) for c in children} == {("0.01", "0"), ("0.01", "1"), ("0.05", "0"), ("0.05", "1")}
    assert all(c.info.status == "FINISHED" and "torch_trained/accuracy" in c.data.metrics for c in children)
    [sweep_dir] = (tmp_path / "out").iterdir()
    point = json.loads((sweep_dir / "sweep.json").read_text())["points"][0]
    row = next(r for r in point["metrics"] if r["of"] == "torch_trained" and r["metric"] == "accuracy")
    name = f"{point['name']}/{row['kind']}/torch_trained/accuracy"
    assert parent.data.metrics[f"{name}/mean"] == pytest.approx(row["mean"])
    assert [parent.data.metrics[f"{name}/low"], parent.data.metrics[f"{name}/high"]] == pytest.approx(row["ci95"])


def test_a_server_that_goes_away_mid_run_costs_a_warning_not_the_run(tmp_path, relay, mlflow_server):
    """Last in the module: it stops the server."""
    process = subprocess.Popen([sys.executable, "-m", "coordinator", *relay("--mlflow", mlflow_server.uri, rounds=2)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("round   0") and "torch_from_keras" in line:  # round 0 logged: now the server goes
            mlflow_server.stop()
            break
    out, err = process.communicate(timeout=600)
    lines.append(out)
    assert process.returncode == 0, err
    results = json.loads(results_path("".join(lines)).read_text())
    assert results["status"] == "complete" and len(results["rounds"]) == 2
    assert "WARNING MLflow at " + mlflow_server.uri in err and "the run goes on without logging there" in err, err
    assert err.count("WARNING MLflow") == 1
