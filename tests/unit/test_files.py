import json
import os
import stat

import pytest

from weightrelay.files import write_atomic, write_json_atomic


def test_written_files_are_readable_by_others_and_leave_no_temporary(tmp_path):
    umask = os.umask(0o022)
    try:
        write_atomic(tmp_path / "t10k-labels-idx1-ubyte.gz", b"payload")
    finally:
        os.umask(umask)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    assert path.read_bytes() == b"payload"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600: a non-root worker must read it
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_json_replaces_the_old_file_whole(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"round": 0})
    write_json_atomic(path, {"round": 1, "rounds": [1, 2]}, indent=1)
    assert json.loads(path.read_text()) == {"round": 1, "rounds": [1, 2]}


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"ok": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"not json": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]
