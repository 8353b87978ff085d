"""The compiled transposes `python -m bench.transpose --compiled` compares with numpy's (bench/transpose_c.c):
each gives numpy's transpose bit for bit, edges and strided views included, or the benchmark's table means nothing."""

import shutil

import numpy as np
import pytest

from bench.transpose import COMPILED, c_compiler, compiled_transposes

pytestmark = pytest.mark.skipif(shutil.which(c_compiler()) is None, reason="needs a C compiler ($CC or cc)")


@pytest.fixture(scope="module")
def transposes(tmp_path_factory):
    return compiled_transposes(tmp_path_factory.mktemp("transpose_c"))


def test_every_compiled_transpose_this_cpu_runs_is_built(transposes):
    assert "wr_scalar_blocked" in transposes
    assert set(transposes) <= set(COMPILED)


@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 64), (257, 1030), (1024, 24), (600, 1100)])
def test_compiled_transposes_match_numpy(transposes, shape):
    rng = np.random.default_rng(sum(shape))
    # views whose rows lie further apart than their length, as a band of a larger matrix
    source = rng.standard_normal((shape[0], shape[1] + 5), dtype=np.float32)[:, 2 : 2 + shape[1]]
    expected = source.T.copy()
    for name, run in transposes.items():
        target = np.full((shape[1], shape[0] + 3), np.nan, np.float32)
        run(source, target[:, : shape[0]])
        assert np.array_equal(target[:, : shape[0]], expected), name
        assert np.isnan(target[:, shape[0] :]).all(), f"{name} wrote outside the view"
