import numpy as np

from weightrelay import buffers, codec


def specs():
    return [codec.TensorSpec("a", "float32", (3, 5)), codec.TensorSpec("b", "bfloat16", (7,)), codec.TensorSpec("c", "float64", (2,))]


def test_an_arena_hands_out_aligned_separate_arrays_of_each_spec():
    arena = buffers.Arena(buffers.arena_bytes(specs()))
    arrays = [arena.array(spec) for spec in specs()]
    assert [a.shape for a in arrays] == [(3, 5), (7,), (2,)]
    assert [a.dtype for a in arrays] == [np.dtype("<f4"), np.dtype("<u2"), np.dtype("<f8")]
    assert all(a.ctypes.data % buffers.ALIGNMENT == 0 for a in arrays)
    for i, a in enumerate(arrays):
        a[...] = i + 1
    assert [int(a.flat[0]) for a in arrays] == [1, 2, 3]  # no overlap
    assert not np.shares_memory(arena.array(specs()[0]), arrays[0])  # full: a fresh array


def test_the_spare_is_reused_and_dropped_when_the_model_changes_size():
    spare = buffers.SpareBuffer()
    size = buffers.arena_bytes(specs())
    first = spare.take(size)
    spare.give_back(first)
    assert spare.take(size) is first  # reused: its pages are touched already
    second = spare.take(size)  # the first is lent out: a second move gets its own
    assert second is not first
    spare.give_back(first)
    spare.fit(size)  # the same size: kept
    assert spare.take(size) is first
    spare.fit(size * 2)  # a model of another size: the arena lent now is not kept when it comes back
    spare.give_back(first)
    assert spare.take(size) is not first


def test_glibc_keeps_freed_memory_for_reuse():
    assert buffers.keep_freed_memory()  # these machines run glibc; elsewhere it returns False and changes nothing


def test_freed_stream_memory_is_handed_back_only_once_no_move_has_run_for_a_while(monkeypatch):
    """IdleTrim: a move's end starts the timer, the next move's start stops it; overlapping moves trim
    only after the last one ends."""
    import time

    from weightrelay import store

    trims = []
    monkeypatch.setattr(store, "release_freed_memory", lambda: trims.append(time.monotonic()))
    idle = store.IdleTrim(seconds=0.2)
    idle.started()
    idle.started()
    idle.ended()  # one move still running: no timer
    time.sleep(0.4)
    assert trims == []
    idle.ended()
    idle.started()  # a move starts again before the timer fires
    time.sleep(0.4)
    assert trims == []
    idle.ended()
    time.sleep(0.5)
    assert len(trims) == 1


def test_the_spare_keeps_nothing_larger_than_it_was_fitted_to():
    """A worker that receives its large kernels straight into the framework's layout fits its spare to the rest; the
    full-set arena a snapshot needs now and then is given back to the system, not kept beside the model."""
    spare = buffers.SpareBuffer()
    size = buffers.arena_bytes(specs())
    spare.fit(size)
    small = spare.take(size)
    spare.give_back(small)
    large = spare.take(4 * size)  # the small one is too small: a fresh one
    assert large is not small and large.nbytes >= 4 * size
    spare.give_back(large)
    assert spare.take(size) is not large


def test_recycled_memory_is_reused_only_once_nothing_refers_to_it_and_released_when_free():
    memory = buffers.RecycledMemory()
    first = memory.empty((64, 32), np.float32)
    assert first.ctypes.data % buffers.ALIGNMENT == 0 and first.flags.c_contiguous
    address = first.ctypes.data
    second = memory.empty((64, 32), np.float32)  # the first is in use: other memory
    assert not np.shares_memory(first, second)
    held_elsewhere = first.T  # a framework holding a view of it (as a model holds its kernel)
    del first
    third = memory.empty((64, 32), np.float32)
    assert not np.shares_memory(third, held_elsewhere) and not np.shares_memory(third, second)
    del held_elsewhere, third
    again = memory.empty((64, 32), np.float32)  # free now: the same memory again
    assert again.ctypes.data == address
    assert memory.empty((16, 8), np.float32).shape == (16, 8)  # another size: its own memory
    in_use = memory.release()  # `again` and `second` stay; the free ones go
    assert in_use == 2 * (64 * 32 * 4 + buffers.ALIGNMENT)
    del again, second
    assert memory.release() == 0
