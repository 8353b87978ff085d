"""Running the coordinator CLI as a user would: a subprocess, stdout not a terminal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def coordinator(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`coordinator ARGS` in a subprocess (stdout is not a terminal: plain lines)."""
    return subprocess.run([sys.executable, "-m", "coordinator", *args], capture_output=True, text=True, timeout=600, **kwargs)


def results_path(stdout: str) -> Path:
    line = next(l for l in stdout.splitlines() if l.startswith("results: "))
    return Path(line.removeprefix("results: "))
