"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: bytes, private: bool = False) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`.

    The file gets the usual mode for new files (0666 less the umask), not mkstemp's 0600: results
    and data are meant to be read by others, e.g. a worker container running as another user;
    a `private` file (a secret) keeps 0600 from its first byte.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if not private:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, content: Any, indent: int | None = None, private: bool = False) -> None:
    write_atomic(path, json.dumps(content, indent=indent).encode(), private)
