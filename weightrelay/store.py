"""A worker's weight storage: how sets leave the model and enter it, checked and all or nothing.

The WeightStore owns the memory a worker moves sets through (a spare arena reused by every send and
receive, see buffers.py: the set's size, less the tensors the adapter receives straight into its own
layout, see conversion.py), the checksum of what the model holds, and the two ways a set
leaves (a snapshot, or for a large set a read straight from the model's memory) and enters (adopted
as the model's memory where the adapter can, else copied in with a backup) the model. A set read
straight from the model goes to a reader that holds matrices transposed as the model holds them
(GetWeightsRequest.transposed), with the stream's own checksum kept for the next such read.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import grpc

from weightrelay import codec
from weightrelay.adapter import ModelThread
from weightrelay.buffers import Arena, SpareBuffer, arena_bytes, recycled_memory, release_freed_memory
from weightrelay.conversion import BandConversion
from weightrelay.errors import Refused
from weightrelay.gate import ModelGate
from weightrelay.v1 import worker_pb2 as pb

log = logging.getLogger("weightrelay.service")

#: Sets up to this size are backed up before they are applied and read back after, to be compared with
#: what was sent (both into one buffer kept for them); larger ones are applied after the complete check of
#: the stream only, so that a receiver holds about twice the set (its model and the set received)
#: instead of four times.
BACKUP_LIMIT_BYTES = 64 * 1024 * 1024
#: Seconds without a move after which a worker hands its freed stream memory back (IdleTrim).
IDLE_TRIM_SECONDS = 0.5
#: Sets at least this large are streamed straight from the model's memory where the adapter offers it
#: (FrameworkAdapter.weight_views) instead of from a snapshot; see DirectRead.
DIRECT_READ_BYTES = 64 * 1024 * 1024
#: Stream checksums a worker keeps (WeightStore._remember_stream_sum): one per set and choice of transposed matrices.
STREAM_SUMS_KEPT = 4


class IdleTrim:
    """Hands freed stream memory back to the system once no move has run for IDLE_TRIM_SECONDS.

    A worker keeps the memory of freed stream messages for the next message and the next move
    (buffers.keep_freed_memory): moves that follow each other reuse it. Kept after the last move, it
    is up to a quarter of a 1 GiB set for nothing; so each move's end starts a timer, each move's start
    stops it, and only a worker with no move running trims (buffers.release_freed_memory)."""

    def __init__(self, seconds: float = IDLE_TRIM_SECONDS):
        self.seconds = seconds
        self._lock = threading.Lock()
        self._moving = 0
        self._timer: threading.Timer | None = None

    def started(self) -> None:
        with self._lock:
            self._moving += 1
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def ended(self) -> None:
        with self._lock:
            self._moving -= 1
            if self._moving == 0:
                self._timer = threading.Timer(self.seconds, self._trim)
                self._timer.daemon = True
                self._timer.start()

    def _trim(self) -> None:
        with self._lock:
            if self._moving or self._timer is None:
                return
            self._timer = None
        recycled_memory.release()
        release_freed_memory()


class DirectRead:
    """A GetWeights stream read straight from the model's memory, holding the model meanwhile.

    A snapshot (as smaller sets go) copies the whole set before its first byte goes out; read
    directly, a large set needs no copy at all, but the model stays held until the stream ends. So
    that a slow reader cannot keep it, a call that waits for the model `detach`es the read first:
    the set is copied into a snapshot, the stream goes on from the copy, and the model is let go.
    Either way the stream carries the weights as they were when it started.
    """

    def __init__(self, views: codec.WeightSet, let_go: Callable[[], None]):
        self._lock = threading.Lock()  # a message is made, or the reading detached, never both at once
        self.arrays = dict(views)  # what the stream reads: the model's memory, after a detach its copy
        self.arena: Arena | None = None  # the copy's, after a detach
        self._let_go = let_go
        self._holding = True

    def messages(self, encoded: Iterator[bytes]) -> Iterator[bytes]:
        """The messages of `encoded` (made from self.arrays, unpacked: each piece cut as its message is made)."""
        while True:
            with self._lock:
                message = next(encoded, None)
            if message is None:
                return
            yield message

    def detach(self, snapshot: Callable[[], tuple[Arena, codec.WeightSet]]) -> None:
        """Go on from a copy (`snapshot()`: an arena and the model's weights in it) and let the model go."""
        with self._lock:
            if self._holding:
                self.arena, copies = snapshot()
                self.arrays.update(copies)
                self._holding = False
                self._let_go()

    def finish(self) -> None:
        """The stream ended (or was cancelled): let the model go, if not done yet."""
        with self._lock:
            if self._holding:
                self._holding = False
                self._let_go()


@dataclass
class Outgoing:
    """A set on its way out: a snapshot in an arena lent by the store, or the model's memory read directly."""

    weights: codec.WeightSet
    sha256: str
    arena: Arena | None = None
    direct: DirectRead | None = None
    transposed: frozenset[str] = frozenset()  # matrices sent as the model holds them (transposed)
    stream_sha256: str | None = None  # that stream's checksum, where known already


@dataclass
class Received:
    """A complete set that passed every check of its stream, in an arena lent by the store."""

    weights: codec.WeightSet
    sha256: str
    arena: Arena
    #: the adapter's conversion that followed the receive (FrameworkAdapter.conversion), if any
    conversion: BandConversion | None = None
    transposed: frozenset[str] = frozenset()  # matrices that came transposed
    stream_sha256: str = ""  # that stream's checksum, verified


def _reply(weights: codec.WeightSet, sha: str) -> pb.SetWeightsReply:
    return pb.SetWeightsReply(tensor_count=len(weights), total_bytes=sum(w.nbytes for w in weights.values()), sha256=sha)


class WeightStore:
    """The model's weights as they are sent and received. Every method that touches the model expects
    the caller to hold it through the gate, except `apply`, which takes it itself."""

    def __init__(self, adapter: ModelThread, gate: ModelGate):
        self.adapter = adapter
        self.gate = gate
        self.manifest: dict[str, codec.TensorSpec] = {}
        self._converted: frozenset[str] = frozenset()  # tensors the adapter receives into its own layout (conversion)
        self.sha256 = ""  # the checksum of what the model holds, kept current by every change
        self.spare = SpareBuffer()  # a set's worth of memory reused by every send and receive
        self._swap_room = SpareBuffer()  # two sets: the model's before and after a small set is applied
        self._model_arena: Arena | None = None  # the arena of the received set the model adopted last
        self._direct_read: DirectRead | None = None  # a GetWeights reading the model's memory
        self._stream_sums: dict[tuple[str, frozenset[str]], str] = {}  # (set checksum, transposed matrices) -> stream checksum
        self._stream_sums_lock = threading.Lock()  # sends and receives remember theirs from their own threads
        self.idle_trim = IdleTrim()  # freed stream memory handed back once the moves are over
        gate.on_wait = self._detach_direct_read

    @property
    def set_bytes(self) -> int:
        return arena_bytes(self.manifest.values())

    @property
    def receive_bytes(self) -> int:
        """What a received set needs of the spare: the set, less the tensors received into the framework's layout."""
        return arena_bytes(spec for name, spec in self.manifest.items() if name not in self._converted)

    @property
    def receives_transposed(self) -> frozenset[str]:
        """The matrices this worker takes transposed, as it holds them (DescribeReply.receives_transposed)."""
        return self._converted

    def _remember_stream_sum(self, sha: str, transposed: frozenset[str], stream_sha: str) -> None:
        """The checksum of set `sha` streamed with `transposed` sent transposed (computed by a send, or verified by a
        receive): the same set streamed the same way again needs no hashing. Keyed by the set's checksum, so a
        changed model never finds a stale one; only the last STREAM_SUMS_KEPT are kept."""
        with self._stream_sums_lock:
            self._stream_sums.pop((sha, transposed), None)
            self._stream_sums[(sha, transposed)] = stream_sha
            while len(self._stream_sums) > STREAM_SUMS_KEPT:
                self._stream_sums.pop(next(iter(self._stream_sums)))

    def _stream_sum(self, sha: str, transposed: frozenset[str]) -> str | None:
        """The kept checksum of set `sha` streamed with `transposed` sent transposed, if any."""
        with self._stream_sums_lock:
            return self._stream_sums.get((sha, transposed)) if transposed else None

    def reset(self, manifest: dict[str, codec.TensorSpec]) -> None:
        """A new model was built (with storage of its own): fit the buffers to its set (the spare to what a
        receive needs of it: a snapshot larger than that takes memory of its own, given back after), take its
        checksum."""
        self.manifest = manifest
        self._model_arena = None
        conversion = self.adapter.conversion(manifest)
        self._converted = conversion.targets if conversion is not None else frozenset()
        self.spare.fit(self.receive_bytes)
        self._swap_room.fit(2 * self.set_bytes)
        self.sha256 = self.model_sha()

    # -- reading the model --------------------------------------------------------------------------
    def _lend(self, spare: SpareBuffer, sets: int = 1) -> Arena:
        """An arena for `sets` of the model's sets, from `spare`; give it back there."""
        return spare.take(sets * self.set_bytes)

    def _snapshot(self, arena: Arena) -> codec.WeightSet:
        """The model's weights copied into `arena` (the spare buffer: no fresh memory for a large set)."""
        weights = {name: codec.native_view(spec, arena.array(spec)) for name, spec in self.manifest.items()}
        self.adapter.read_weights(weights)
        return weights

    def _lent_snapshot(self) -> tuple[Arena, codec.WeightSet]:
        """The model's weights copied into an arena lent by the spare buffer (give it back there)."""
        arena = self._lend(self.spare)
        try:
            return arena, self._snapshot(arena)
        except BaseException:
            self.spare.give_back(arena)
            raise

    def model_sha(self) -> str:
        """The checksum of what the model holds, read through the spare buffer."""
        arena, weights = self._lent_snapshot()
        try:
            return codec.weights_sha256(weights)
        finally:
            self.spare.give_back(arena)

    def _detach_direct_read(self) -> None:
        reader = self._direct_read
        if reader is not None:
            reader.detach(self._lent_snapshot)

    # -- sending ------------------------------------------------------------------------------------
    def open_send(self, context: grpc.ServicerContext, transposed: Iterable[str] = ()) -> Outgoing:
        """The model's set to send, as it is now.

        Holds the model only to take a snapshot; a large set the adapter can lend (weight_views) is
        read straight from the model's memory instead, holding the model until the stream ends or a
        waiting call detaches it (DirectRead); then the matrices of `transposed` (the reader holds them
        transposed) that the model holds so too go as they are. Hand the result to stream()."""
        self.gate.hold(context)
        direct = None
        try:
            sha = self.sha256
            views = self.adapter.weight_views() if self.set_bytes >= DIRECT_READ_BYTES else None
            if views is not None:
                direct = self._direct_read = DirectRead(views, self.gate.let_go)
                flipped = codec.sends_transposed(views, transposed)
                return Outgoing(direct.arrays, sha, direct=direct, transposed=flipped,
                                stream_sha256=self._stream_sum(sha, flipped))
            arena, weights = self._lent_snapshot()  # the model is free again while the stream goes out
            return Outgoing(weights, sha, arena=arena)
        finally:
            if direct is None:
                self.gate.let_go()

    def stream(self, outgoing: Outgoing, max_chunk_bytes: int, pack: bool) -> Iterator[bytes]:
        """The serialized GetWeights messages of `outgoing`; gives back what it held when the stream ends."""
        chunk = max_chunk_bytes and max(max_chunk_bytes, codec.MIN_CHUNK_BYTES)
        direct, arena = outgoing.direct, outgoing.arena
        self.idle_trim.started()
        try:
            if direct is None:
                yield from codec.encode_weight_chunks(outgoing.weights, chunk, sha256=outgoing.sha256, pack=pack)
            else:  # a large set's pieces fill messages alone: packing would gain nothing
                def hashed(stream_sha: str) -> None:
                    self._remember_stream_sum(outgoing.sha256, outgoing.transposed, stream_sha)
                yield from direct.messages(codec.encode_weight_chunks(outgoing.weights, chunk, sha256=outgoing.sha256, transposed=outgoing.transposed,
                                                                      stream_sha256=outgoing.stream_sha256, hashed=hashed))
        finally:
            if direct is not None:
                direct.finish()
                arena = direct.arena
                if self._direct_read is direct:
                    self._direct_read = None
            if arena is not None:
                self.spare.give_back(arena)
            self.idle_trim.ended()

    # -- receiving ----------------------------------------------------------------------------------
    def receive(self, chunks: Iterable[codec.StreamMessage]) -> Received:
        """A set streamed in, checked against the manifest and its digest, in an arena lent by the spare
        buffer; hand it to apply() or discard(). Raises codec.TensorError for any bad stream."""
        arena = self.spare.take(self.receive_bytes)
        self.idle_trim.started()  # ended by apply() or discard()
        conversion = None
        try:
            conversion = self.adapter.conversion(self.manifest)  # large kernels received straight into the framework's layout
            stream = codec.receive_stream(chunks, self.manifest, allocate=arena.array, sink=conversion.sink if conversion is not None else None)
        except BaseException:
            if conversion is not None:
                conversion.cancel()
            self.spare.give_back(arena)
            self.idle_trim.ended()
            raise
        return Received(stream.weights, stream.sha256, arena, conversion, stream.transposed, stream.stream_sha256)

    def discard(self, received: Received) -> None:
        if received.conversion is not None:
            received.conversion.cancel()
        self.spare.give_back(received.arena)
        self.idle_trim.ended()

    def apply(self, received: Received, context: grpc.ServicerContext, method: str) -> pb.SetWeightsReply:
        """Apply a received set all or nothing (taking the model meanwhile); the spare buffer gets back
        whichever arena is free afterwards: the received one, or the model's previous one where the
        model took the received arena as its own. `method` names the call for the lease's check."""
        free: Arena | None = received.arena
        try:
            self.gate.hold(context, method)
            try:
                reply, free = self._apply(received, context)
            finally:
                self.gate.let_go()
            return reply
        finally:
            if received.conversion is not None:
                received.conversion.cancel()  # used or not, it is done
            if free is not None:
                self.spare.give_back(free)
            self.idle_trim.ended()

    def _check_still_fits(self, weights: codec.WeightSet, context: grpc.ServicerContext) -> None:
        """The set still fits the model (an Initialize may have changed it while the set streamed in), and
        the caller still waits for the answer."""
        if set(weights) != set(self.manifest):
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "the model was re-initialized while the weights arrived; send them again")
        for name, array in weights.items():
            try:
                codec.check_against_manifest(codec.TensorSpec.of(name, array), self.manifest)
            except codec.TensorError as exc:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, f"the model was re-initialized while the weights arrived: {exc}") from None
        if not context.is_active():  # cancelled (or past its deadline) after the digest: the caller was told so, apply nothing
            raise Refused(grpc.StatusCode.CANCELLED, "the call ended before the weights were applied; nothing was applied")

    def _apply(self, received: Received, context: grpc.ServicerContext) -> tuple[pb.SetWeightsReply, Arena | None]:
        """Apply a set while holding the model; also return the arena that is free afterwards.

        Where the adapter can (adopt_weights: a PyTorch model on the CPU), the model takes the set as
        its own memory instead of a copy: the received arena becomes the model's, and the arena the
        model held before (if any) is the one free; nothing needs a backup, nothing can differ from
        what was checked. Otherwise the set is copied in (_copy_in) and the received arena is free again."""
        weights, sha = received.weights, received.sha256
        self._check_still_fits(weights, context)
        try:
            adopted = self.adapter.adopt_weights(weights)
        except Exception as exc:  # adapters adopt all or nothing
            log.exception("adopt_weights failed")
            raise Refused(grpc.StatusCode.INTERNAL, f"applying the weights failed, the previous weights were kept: {exc}") from None
        if received.transposed:
            self._remember_stream_sum(sha, received.transposed, received.stream_sha256)
        if adopted:
            self.sha256 = sha
            free, self._model_arena = self._model_arena, received.arena
            log.info("weights set (adopted): sha256 %s", sha[:12])
            return _reply(weights, sha), free
        self._copy_in(weights, received.conversion.converted(weights) if received.conversion is not None else {})
        self.sha256 = sha
        log.info("weights set: sha256 %s", sha[:12])
        return _reply(weights, sha), received.arena

    def _copy_in(self, weights: codec.WeightSet, converted: dict | None = None) -> None:
        """set_weights, all or nothing: a small set (up to BACKUP_LIMIT_BYTES) with the model's weights
        saved first, restored if that fails, and read back to compare with what was sent. `converted`: some
        of the set's tensors already in the framework's layout (the receive's conversion), for set_weights."""
        small = sum(w.nbytes for w in weights.values()) <= BACKUP_LIMIT_BYTES
        room = self._lend(self._swap_room, sets=2) if small else None
        previous: codec.WeightSet | None = None
        applied: codec.WeightSet = {}

        def swap_in() -> None:  # on the model thread, in one hand-over
            nonlocal previous, applied
            if room is not None:
                previous = self._snapshot(room)  # the arena's first set
            if converted:
                self.adapter.set_weights(weights, converted=converted)
            else:
                self.adapter.set_weights(weights)
            if room is not None:
                applied = self._snapshot(room)  # its second

        try:
            self.adapter.run(swap_in)
            differ = [name for name in sorted(applied) if not codec.same_bytes(applied[name], weights[name])]
            if differ:
                raise RuntimeError(f"the model holds other values than were applied in {', '.join(differ)}")
        except Exception as exc:
            if small and previous is None:  # reading the model's weights failed, before anything was applied
                log.exception("reading the model's weights failed")
                raise Refused(grpc.StatusCode.INTERNAL, f"reading the model's weights failed, nothing was applied: {exc}") from None
            if previous is None:
                self.sha256 = self.model_sha()
                log.exception("set_weights failed on a large set; the model may hold part of it")
                raise Refused(grpc.StatusCode.INTERNAL,
                              f"applying the weights failed: {exc}; the model may hold part of the set, send it again") from None
            self.adapter.set_weights(previous)  # all or nothing
            log.exception("set_weights failed; previous weights restored")
            raise Refused(grpc.StatusCode.INTERNAL, f"applying the weights failed, the previous weights were kept: {exc}") from None
        finally:
            if room is not None:
                self._swap_room.give_back(room)
