"""Install weightrelay's dependencies for one extra into /opt/venv, pinned by constraints.txt.

Runs in an image build, in a layer of its own before the source is copied, so editing the code
never reinstalls the frameworks. Local-only knobs come from build arguments and are off by default:
FRAMEWORK_REQUIREMENT replaces the extra's framework requirement (e.g. a CPU-only torch wheel put in
docker/build/wheels/, or "tensorflow[and-cuda]==2.21.0" for GPUs); PIP_CA_BUNDLE names a CA bundle
in docker/build/ for pip (for networks that re-sign TLS).
"""

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

BUILD = Path("/build")


def name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def main(extra: str) -> None:
    project = tomllib.loads((BUILD / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"]) + [
        r for r in project["optional-dependencies"][extra] if name(r) != "weightrelay"
    ]
    constraints = [line for line in (BUILD / "constraints.txt").read_text().splitlines() if line and not line.startswith("#")]
    override = os.environ.get("FRAMEWORK_REQUIREMENT", "").strip()
    if override:
        replaced = name(override)
        requirements = [r for r in requirements if name(r) != replaced] + [override]
        constraints = [c for c in constraints if name(c) != replaced]
    Path("/tmp/requirements.txt").write_text("\n".join(requirements) + "\n")
    Path("/tmp/constraints.txt").write_text("\n".join(constraints) + "\n")
    command = ["/opt/venv/bin/pip", "install", "--no-cache-dir", "--disable-pip-version-check",
               "--find-links", str(BUILD / "wheels"), "-r", "/tmp/requirements.txt", "-c", "/tmp/constraints.txt"]
    ca_bundle = os.environ.get("PIP_CA_BUNDLE", "").strip()
    if ca_bundle:
        command += ["--cert", str(BUILD / ca_bundle)]
    print("installing:", ", ".join(requirements), flush=True)
    subprocess.run(command, check=True)


if __name__ == "__main__":
    main(sys.argv[1])
