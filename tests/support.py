"""Small helpers shared by the test tiers."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tool(names: tuple[str, ...], install_hint: str) -> str:
    """The first of `names` found on PATH or in .tools/bin. CI must have it (the test fails there);
    elsewhere the test is skipped with the hint."""
    for name in names:
        found = shutil.which(name) or shutil.which(name, path=str(REPO / ".tools" / "bin"))
        if found:
            return found
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide {names[0]} ({install_hint})")
    pytest.skip(f"needs {names[0]}: {install_hint}")
