"""weightrelay.adapter.ModelThread: model operations on one thread, holding nothing of a call once it returned."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np

from weightrelay.adapter import ModelThread


class _Adapter:
    """The part of an adapter ModelThread calls: one model operation, and thread_free."""

    def thread_free(self, operation: str, *args) -> bool:
        return False

    def read_weights(self, out: dict) -> None:
        out["w"][...] = 7
        out["thread"] = threading.current_thread().name


def test_an_operation_runs_on_the_model_thread_and_its_arguments_are_not_kept():
    """A snapshot's arena lent to read_weights must be freed when the caller lets it go, not when the next
    operation comes (a worker held a whole weight set after every Initialize)."""
    model = ModelThread(_Adapter())
    arena = np.zeros(1000, np.float32)
    alive = weakref.ref(arena)
    given = {"w": arena}
    model.read_weights(given)
    assert float(arena.sum()) == 7000 and given["thread"] == "model"
    del given
    del arena
    gc.collect()
    assert alive() is None
