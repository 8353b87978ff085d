"""The committed stubs match the .proto, and each package imports only what it may."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STUBS = ("worker_pb2.py", "worker_pb2.pyi", "worker_pb2_grpc.py")


def test_generated_stubs_are_current(tmp_path):
    from grpc_tools import protoc

    args = ["protoc", f"-I{REPO / 'proto'}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", str(REPO / "proto/weightrelay/v1/worker.proto")]
    assert protoc.main(args) == 0
    for name in STUBS:
        fresh = (tmp_path / "weightrelay/v1" / name).read_text()
        committed = (REPO / "weightrelay/v1" / name).read_text()
        assert fresh == committed, f"weightrelay/v1/{name} is stale: run `make proto`"


def modules_loaded_by(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return set(out.stdout.split())


def test_coordinator_loads_no_framework():
    loaded = modules_loaded_by("import coordinator.cli, coordinator.relay, coordinator.local")
    assert not loaded & {"torch", "tensorflow", "keras", "jax", "flax", "sklearn"}


@pytest.mark.parametrize(
    "statement, forbidden",
    # Keras itself loads JAX where it is installed (its JAX backend's helpers), as in this dev venv;
    # the keras image has no JAX (tests/containers checks each image's packages).
    [("import torch_service.adapter", {"tensorflow", "keras", "jax", "flax"}), ("import keras_service.adapter", {"torch", "flax"}),
     ("import jax_service.adapter", {"torch", "tensorflow", "keras"})],
)
def test_each_worker_loads_only_its_framework(statement, forbidden):
    assert not modules_loaded_by(statement) & forbidden
