"""Shared pieces of the benchmarks: starting workers, the machine's description, writing results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from coordinator.local import LocalWorker
from weightrelay.client import WorkerClient
from weightrelay.data import default_data_dir

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"


def machine() -> dict[str, Any]:
    """Where the numbers came from."""
    gpu = ""
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        pass
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "gpu": gpu or None}


def data_dir() -> str:
    shared = REPO.parent / "shared" / "data" / "mnist"
    return os.environ.get("WEIGHTRELAY_DATA_DIR") or (str(shared) if shared.is_dir() else str(default_data_dir()))


class Worker:
    """A real worker process on a free port, for the benchmarks."""

    def __init__(self, framework: str, extra: list[str] | None = None):
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"bench-{framework}-"))
        self.process = LocalWorker(framework, self.log_dir, ["--data-dir", data_dir(), *(extra or [])])
        import time

        self.address = self.process.wait_ready(time.monotonic() + 300)
        self.client = WorkerClient(self.address, timeout=3600)

    def stop(self) -> None:
        self.client.close()
        self.process.stop()


def _interpreter(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _snippet_env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}


def run_python(code: str, timeout: float = 3600) -> dict[str, Any]:
    """Run a snippet in a fresh interpreter (one framework per process); it prints one JSON line last."""
    done = subprocess.run(_interpreter(code), capture_output=True, text=True, timeout=timeout, cwd=REPO, env=_snippet_env())
    if done.returncode != 0:
        raise RuntimeError(f"benchmark snippet failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


class Snippet:
    """A snippet in a fresh interpreter that runs one timed step per line it reads, printing a JSON line for each:
    the benchmarks take turns between it and a worker, so that a slow spell of the machine falls on both."""

    def __init__(self, code: str):
        self.process = subprocess.Popen(_interpreter(code), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                        env=_snippet_env())
        self._read()  # its warm-up

    def _read(self) -> Any:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark snippet failed ({self.process.wait()}); its error is above")
        return json.loads(line)

    def step(self) -> Any:
        self.process.stdin.write("\n")
        self.process.stdin.flush()
        return self._read()

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    target = (out or RESULTS_DIR) / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    return target


def table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
