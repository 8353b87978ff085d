"""The Worker gRPC service: thin translation between messages and a FrameworkAdapter."""

from __future__ import annotations

import dataclasses
import logging
import math
import platform
import queue
import threading
import time
from typing import Callable, Iterator

import grpc
import numpy as np

import weightrelay
from weightrelay import codec, models
from weightrelay.buffers import Arena, SpareBuffer, arena_bytes
from weightrelay.adapter import FrameworkAdapter, ModelThread, NonFiniteLoss, ProgressTracker, TrainConfig, TrainingCancelled, TrainResult
from weightrelay.data import DataError, Dataset, UnknownDataset
from weightrelay.metrics import evaluate_logits
from weightrelay.models import ModelSpec, ResolvedModel, SpecError
from weightrelay.objectives import Objective, parse_objective
from weightrelay.client import CHANNEL_OPTIONS, decoded_get_weights
from weightrelay.security import ClientSecurity
from weightrelay.v1 import worker_pb2 as pb
from weightrelay.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_EVAL_BATCH = 1000
MAX_EPOCHS = 1000
MAX_LEARNING_RATE = 100.0
#: Model calls (Initialize, Train, Evaluate, GetWeights, SetWeights) running or waiting for the
#: model at once; more get RESOURCE_EXHAUSTED at once, so they never take the threads that
#: health checks and Describe need.
MAX_MODEL_CALLS = 8
#: A SetWeights stream that sends nothing for this long is ended (DEADLINE_EXCEEDED).
STREAM_IDLE_SECONDS = 30.0
#: Error details longer than this are cut: they may quote what a client sent.
MAX_DETAILS = 1024
#: Sets up to this size are backed up before they are applied and read back after, to be compared with
#: what was sent (both into one buffer kept for them); larger ones are applied after the complete check of
#: the stream only, so that a receiver holds about twice the set (its model and the set received)
#: instead of four times.
BACKUP_LIMIT_BYTES = 64 * 1024 * 1024
#: A pull's channel to its peer, without the client's retries: a sender killed as the pull began left
#: the retried GetWeights waiting until the caller's deadline; now the pull fails at once, UNAVAILABLE,
#: and the coordinator reports the sender unreachable (or forwards, which meets the same end).
PEER_OPTIONS = [option for option in CHANNEL_OPTIONS if option[0] not in ("grpc.service_config", "grpc.enable_retries")] + [("grpc.enable_retries", 0)]
#: Open channels to peers kept by PullWeights (the least recently used is closed first).
MAX_PEERS = 8
#: Sets at least this large are streamed straight from the model's memory where the adapter offers it
#: (FrameworkAdapter.weight_views) instead of from a snapshot; see DirectRead.
DIRECT_READ_BYTES = 64 * 1024 * 1024
_DONE = object()


def _remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left of the caller's deadline, None when it set none (gRPC then reports years, which
    passed on as a timeout would overflow and end the call at once)."""
    left = context.time_remaining()
    return left if left is not None and left < 10 * 365 * 86400 else None


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """context.abort with the message cut to MAX_DETAILS characters (a default client refuses metadata past 16 KiB)."""
    if len(message) > MAX_DETAILS:
        message = message[: MAX_DETAILS - 40] + f"... ({len(message)} characters in all)"
    context.abort(code, message)


DatasetLoader = Callable[[str], Dataset]


class TrainingDiverged(Exception):
    """Training left non-finite weights; the weights from before the Train were put back."""

    def __init__(self, what: str, config: TrainConfig):
        super().__init__(
            f"training diverged: {what} held NaN or Inf (learning_rate {config.learning_rate:g}, "
            f"momentum {config.momentum:g}); the weights from before this Train were restored; lower learning_rate or momentum"
        )


class InitializeError(Exception):
    """Initialize refused; carries the gRPC status code to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclasses.dataclass(frozen=True)
class _Peer:
    """A kept channel to a peer, with its GetWeights call built once (client.decoded_get_weights)."""

    channel: grpc.Channel
    get_weights: grpc.UnaryStreamMultiCallable


class DirectRead:
    """A GetWeights stream read straight from the model's memory, holding the model meanwhile.

    A snapshot first (as smaller sets go) copies the whole set before its first byte goes out: 70 ms
    and a third of the sender's CPU time in a 1.1 s move of 1 GiB here. Read directly, the model stays
    held until the stream ends; so that a slow reader cannot keep it, a call that waits for the model
    `detach`es the read first: the set is copied into a snapshot, the stream goes on from the copy,
    and the model is let go. Either way the stream carries the weights as they were when it started.
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


class WorkerServicer(pb_grpc.WorkerServicer):
    """Serves one adapter's model. One model operation runs at a time; Train holds the model
    for its whole run, and other model calls meanwhile get FAILED_PRECONDITION instead of
    waiting. Describe never touches the model, so it answers even during training.

    `initialize` (the Initialize RPC, and the worker's start) builds the model from a spec,
    so a worker is never without one."""

    def __init__(self, adapter: FrameworkAdapter, data: Dataset, load_data: DatasetLoader, default_objective: str = "identity",
                 dataset_key: str = ""):
        self.adapter = ModelThread(adapter)
        self.data = data
        self.load_data = load_data
        self.default_objective = default_objective
        self.objective: Objective = parse_objective(default_objective, data.num_classes)
        self.model: ResolvedModel | None = None
        self.manifest: dict[str, codec.TensorSpec] = {}
        self._dataset_key = dataset_key or data.name
        self._model_lock = threading.Lock()
        self._admission = threading.BoundedSemaphore(MAX_MODEL_CALLS)
        self.peer_security: ClientSecurity = ClientSecurity()  # how PullWeights reaches a peer
        self._peers: dict[str, _Peer] = {}  # open channels to the peers pulled from (see _peer)
        self._peers_lock = threading.Lock()
        self.stream_idle_seconds = STREAM_IDLE_SECONDS
        self._training = False
        self._weights_sha = ""  # kept current by Initialize, Train and SetWeights
        self.spare = SpareBuffer()  # a set's worth of memory reused by every send and receive
        self._model_arena: Arena | None = None  # the arena of the received set the model adopted last (see _apply)
        self._direct_read: DirectRead | None = None  # a GetWeights reading the model's memory (see _hold_model)
        self._swap_room = SpareBuffer()  # two sets: the model's before and after a small set is applied (see _apply)

    def initialize(self, spec: ModelSpec, seed: int, dataset: str = "", objective: str = "") -> ResolvedModel:
        """Build `spec` with fresh weights from `seed`, optionally on another data set, and reset the
        default objective. Raises InitializeError; on any error the worker keeps what it had."""
        data = self.data
        if dataset and dataset != self._dataset_key:
            try:
                data = self.load_data(dataset)
            except UnknownDataset as exc:
                raise InitializeError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            except DataError as exc:  # missing or damaged files
                raise InitializeError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None
        try:
            resolved = models.resolve(spec, data.input_shape, data.num_classes)
            new_objective = parse_objective(objective or self.default_objective, data.num_classes)
        except (SpecError, ValueError) as exc:
            raise InitializeError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        try:
            self.adapter.build(resolved, seed)
        except Exception as exc:  # e.g. out of memory for a very wide model
            log.exception("building %s failed", resolved.spec.name)
            raise InitializeError(grpc.StatusCode.INTERNAL, f"building model {resolved.spec.name!r} failed, the previous model was kept: "
                                  f"{type(exc).__name__}: {exc}") from None
        self.model, self.manifest, self.data, self.objective = resolved, resolved.manifest, data, new_objective
        self._model_arena = None  # the new model has storage of its own
        set_bytes = arena_bytes(resolved.manifest.values())
        self.spare.fit(set_bytes)
        self._swap_room.fit(2 * set_bytes)
        self._dataset_key = dataset or self._dataset_key
        self._weights_sha = self._model_sha()
        log.info("initialized %s, seed %d, data %s, objective %s: sha256 %s", resolved.describe(), seed, data.name,
                 new_objective.name, self._weights_sha[:12])
        return resolved

    def _lend(self, spare: SpareBuffer, sets: int = 1) -> Arena:
        """An arena for `sets` of the model's sets, from `spare`; give it back there."""
        return spare.take(sets * arena_bytes(self.manifest.values()))

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

    def _model_sha(self) -> str:
        """The checksum of what the model holds, read through the spare buffer."""
        arena, weights = self._lent_snapshot()
        try:
            return codec.weights_sha256(weights)
        finally:
            self.spare.give_back(arena)

    def _dataset_info(self) -> pb.DatasetInfo:
        return pb.DatasetInfo(
            name=self.data.name,
            fingerprint=self.data.fingerprint,
            train_samples=len(self.data.train.y),
            test_samples=len(self.data.test.y),
            data_dir=str(self.data.data_dir),
            class_names=self.data.class_names,
            input_shape=self.data.input_shape,
            mean=self.data.mean,
            std=self.data.std,
        )

    # -- helpers --------------------------------------------------------------------------
    def _admit(self, context: grpc.ServicerContext, method: str) -> None:
        """Count a model call in; refuse it at once when MAX_MODEL_CALLS are already in. Release with _leave."""
        if not self._admission.acquire(blocking=False):
            abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  f"{method}: the worker already has {MAX_MODEL_CALLS} model calls running or waiting; call again later")

    def _leave(self) -> None:
        self._admission.release()

    def _hold_model(self, context: grpc.ServicerContext) -> None:
        """Take the model for a short call: wait while another short call holds it, refuse while training,
        and give up when the caller has gone (cancelled, deadline passed). A GetWeights that reads the
        model's memory directly is detached from it first (DirectRead)."""
        while not self._model_lock.acquire(blocking=False):
            reader = self._direct_read
            if reader is not None:
                reader.detach(self._lent_snapshot)
            if self._model_lock.acquire(timeout=0.05):
                return
            if self._training:
                abort(context, grpc.StatusCode.FAILED_PRECONDITION, "the worker is training; call again when its Train stream has ended")
            if not context.is_active():
                abort(context, grpc.StatusCode.CANCELLED, "the call ended while it waited for the model")

    def _idle_guarded(self, requests: Iterator, context: grpc.ServicerContext) -> Iterator:
        """The request stream, read on a thread of its own so that a client that stops sending is noticed:
        after `stream_idle_seconds` without a message the call ends with DEADLINE_EXCEEDED."""
        pieces: queue.Queue = queue.Queue(maxsize=2)

        def read() -> None:
            try:
                for message in requests:
                    pieces.put(message)
                pieces.put(_DONE)
            except BaseException as exc:  # the call ended (cancelled, aborted) or a message was undecodable
                pieces.put(exc)

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        while True:
            try:
                item = pieces.get(timeout=self.stream_idle_seconds)
            except queue.Empty:
                log.warning("a weights stream sent nothing for %g s; ending it", self.stream_idle_seconds)
                abort(context, grpc.StatusCode.DEADLINE_EXCEEDED,
                      f"the weights stream sent nothing for {self.stream_idle_seconds:g} s; send the whole set without pausing")
            if item is _DONE:
                return
            if isinstance(item, codec.TensorError):
                raise item
            if isinstance(item, BaseException):
                abort(context, grpc.StatusCode.CANCELLED, "the weights stream ended before its digest")
            yield item

    def _train_config(self, request: pb.TrainRequest, context: grpc.ServicerContext) -> tuple[TrainConfig, Objective]:
        problems = []
        if request.epochs > MAX_EPOCHS:
            problems.append(f"epochs {request.epochs} is more than {MAX_EPOCHS}")
        if not (0 <= request.learning_rate <= MAX_LEARNING_RATE) or not math.isfinite(request.learning_rate):
            problems.append(f"learning_rate must be a number in (0, {MAX_LEARNING_RATE:g}] (0 means 0.01), got {request.learning_rate}")
        if not 0 <= request.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {request.momentum}")
        if request.batch_size > len(self.data.train.x):
            problems.append(f"batch_size {request.batch_size} is larger than the {len(self.data.train.x)} training samples")
        samples = min(request.max_samples or len(self.data.train.y), len(self.data.train.y))
        total_steps = (request.epochs or 1) * -(-samples // (request.batch_size or 64)) if request.batch_size <= samples else 0
        if request.start_step and request.start_step >= total_steps:
            problems.append(f"start_step {request.start_step} is past the schedule's {total_steps} steps")
        try:
            objective = parse_objective(request.objective, self.data.num_classes) if request.objective else self.objective
        except ValueError as exc:
            problems.append(str(exc))
            objective = self.objective
        if problems:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        config = TrainConfig(
            epochs=request.epochs or 1,
            batch_size=request.batch_size or 64,
            learning_rate=request.learning_rate or 0.01,
            momentum=request.momentum,
            seed=request.seed,
            progress_every_batches=request.progress_every_batches,
            start_step=request.start_step,
            max_steps=request.max_steps,
            keep_optimizer=request.keep_optimizer,
        )
        return config, objective

    # -- RPCs -----------------------------------------------------------------------------
    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeReply:
        version, backend = self.adapter.versions()
        return pb.DescribeReply(
            framework=self.adapter.framework,
            framework_version=version,
            backend=backend,
            device=self.adapter.device(),
            architecture=self.model.describe(),
            parameters=[codec.spec_to_proto(spec) for spec in self.manifest.values()],
            dataset=self._dataset_info(),
            objective=self.objective.name,
            weights_sha256="" if self._training else self._weights_sha,
            worker_version=weightrelay.__version__,
            python_version=platform.python_version(),
            model=models.to_proto(self.model.spec),
            accepts_packed_pieces=True,
        )

    def Initialize(self, request: pb.InitializeRequest, context: grpc.ServicerContext) -> pb.InitializeReply:
        if self._training:
            abort(context, grpc.StatusCode.FAILED_PRECONDITION, "the worker is training; call Initialize when its Train stream has ended")
        try:
            spec = models.from_proto(request.model)
        except SpecError as exc:
            abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"model: {exc}")
        self._admit(context, "Initialize")
        try:
            self._hold_model(context)
            try:
                resolved = self.initialize(spec, request.seed, request.dataset, request.objective)
            except InitializeError as exc:
                abort(context, exc.code, str(exc))
            finally:
                self._model_lock.release()
        finally:
            self._leave()
        return pb.InitializeReply(
            parameters=[codec.spec_to_proto(spec) for spec in self.manifest.values()],
            weights_sha256=self._weights_sha,
            model=models.to_proto(resolved.spec),
            architecture=resolved.describe(),
            dataset=self._dataset_info(),
            parameter_count=resolved.parameter_count,
            objective=self.objective.name,
        )

    def Train(self, request: pb.TrainRequest, context: grpc.ServicerContext) -> Iterator[pb.TrainEvent]:
        # Listen for the caller leaving before anything else: a cancel or deadline while this call waits
        # for the model must still stop the training it would start (add_callback is False once the call ended).
        cancelled = threading.Event()
        if not context.add_callback(cancelled.set):
            return
        config, objective = self._train_config(request, context)
        limit = request.max_samples or len(self.data.train.y)
        x, y = self.data.train.x[:limit], objective.apply(self.data.train.y[:limit])
        self._admit(context, "Train")
        try:
            if self._training:
                abort(context, grpc.StatusCode.FAILED_PRECONDITION, "the worker is training already; one Train at a time")
            self._hold_model(context)
        except BaseException:
            self._leave()
            raise
        if cancelled.is_set():  # the caller left while this call waited
            self._model_lock.release()
            self._leave()
            return
        self._training = True
        previous_objective, self.objective = self.objective, objective
        start_weights = self.adapter.get_weights()  # put back if training diverges
        events: queue.Queue = queue.Queue()

        def run() -> None:
            started = time.perf_counter()
            outcome: object
            try:
                tracker = ProgressTracker(config, len(x), events.put, cancelled)
                self.adapter.train(x, y, config, tracker)
                outcome = tracker.result()
            except BaseException as exc:  # handed to the RPC thread, which reports it
                outcome = exc
            try:
                # Finished or not, training moved the weights; non-finite weights are never kept.
                weights = self.adapter.get_weights()
                broken = next((f"tensor {name}" for name, array in weights.items() if not np.isfinite(array).all()), None)
                if broken is None and isinstance(outcome, NonFiniteLoss):
                    broken = "the loss"
                if broken is not None:
                    self.adapter.set_weights(start_weights)
                    weights = start_weights
                    self.objective = previous_objective
                    outcome = TrainingDiverged(broken, config)
                self._weights_sha = codec.weights_sha256(weights)
            except Exception as exc:
                outcome = exc
            finally:
                self._training = False
                self._model_lock.release()
                self._leave()
            try:
                if isinstance(outcome, TrainResult):
                    outcome = pb.TrainSummary(
                        epochs=outcome.epochs,
                        samples_seen=outcome.samples_seen,
                        loss=outcome.loss,
                        accuracy=outcome.accuracy,
                        seconds=time.perf_counter() - started,
                        objective=objective.name,
                        weights_sha256=self._weights_sha,
                    )
            except Exception as exc:  # whatever happens, the call ends with an answer
                outcome = exc
            finally:
                events.put(outcome)
                events.put(_DONE)

        log.info("train: %s, objective %s, %d samples", config, objective.name, len(x))
        threading.Thread(target=run, name="train", daemon=True).start()
        while (item := events.get()) is not _DONE:
            if isinstance(item, TrainingCancelled):
                log.warning("train stopped: the caller went away")
            elif isinstance(item, TrainingDiverged):
                log.warning("%s", item)
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(item))
            elif isinstance(item, BaseException):
                log.error("training failed: %s: %s", type(item).__name__, item)
                abort(context, grpc.StatusCode.INTERNAL, f"training failed: {type(item).__name__}: {item}")
            elif isinstance(item, pb.TrainSummary):
                log.info("train done: loss %.4f accuracy %.4f in %.1fs", item.loss, item.accuracy, item.seconds)
                yield pb.TrainEvent(summary=item)
            else:
                yield pb.TrainEvent(progress=pb.TrainProgress(**dataclasses.asdict(item)))

    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateReply:
        started = time.perf_counter()
        self._admit(context, "Evaluate")
        try:
            self._hold_model(context)
            try:
                logits = self.adapter.predict_logits(self.data.test.x, request.batch_size or DEFAULT_EVAL_BATCH)
                weights_sha = self._weights_sha
                data = self.data
            finally:
                self._model_lock.release()
        finally:
            self._leave()
        result = evaluate_logits(logits, data.test.y, data.num_classes)
        reply = pb.EvaluateReply(
            loss=result.loss,
            accuracy=result.accuracy,
            samples=len(data.test.y),
            confusion_matrix=[pb.ConfusionRow(counts=row.tolist()) for row in result.confusion_matrix],
            per_class=[
                pb.ClassMetrics(label=i, precision=p, recall=r, f1=f, support=int(s))
                for i, (p, r, f, s) in enumerate(zip(result.precision, result.recall, result.f1, result.support, strict=True))
            ],
            weights_sha256=weights_sha,
        )
        if request.include_predictions:
            reply.predictions.extend(result.predictions.tolist())
        if request.include_probabilities:
            reply.probabilities.CopyFrom(codec.to_proto("probabilities", result.probabilities))
        reply.seconds = time.perf_counter() - started
        return reply

    def GetWeights(self, request: pb.GetWeightsRequest, context: grpc.ServicerContext) -> Iterator[pb.WeightsChunk]:
        self._admit(context, "GetWeights")
        arena = direct = None
        try:
            self._hold_model(context)
            try:
                sha = self._weights_sha
                views = self.adapter.weight_views() if arena_bytes(self.manifest.values()) >= DIRECT_READ_BYTES else None
                if views is not None:
                    direct = self._direct_read = DirectRead(views, self._model_lock.release)
                    weights = direct.arrays
                else:  # a snapshot into the spare buffer: the model is free again while the stream goes out
                    arena, weights = self._lent_snapshot()
            finally:
                if direct is None:
                    self._model_lock.release()
        finally:
            self._leave()
        chunk = request.max_chunk_bytes and max(request.max_chunk_bytes, codec.MIN_CHUNK_BYTES)
        try:  # serialized already (see server.py)
            if direct is None:
                yield from codec.encode_weight_chunks(weights, chunk, sha256=sha, pack=request.pack_pieces)
            else:  # a large set's pieces fill messages alone: packing would gain nothing
                yield from direct.messages(codec.encode_weight_chunks(weights, chunk, sha256=sha))
        finally:
            if direct is not None:
                direct.finish()
                arena = direct.arena
                if self._direct_read is direct:
                    self._direct_read = None
            if arena is not None:
                self.spare.give_back(arena)

    def _receive(self, chunks: Iterator[codec.StreamMessage]) -> tuple[codec.WeightSet, str, Arena]:
        """A checked set received into an arena lent by the spare buffer; hand it to _apply_received."""
        arena = self._lend(self.spare)
        try:
            weights, sha = codec.receive_weights(chunks, self.manifest, allocate=arena.array)
        except BaseException:
            self.spare.give_back(arena)
            raise
        return weights, sha, arena

    def _apply_received(self, weights: codec.WeightSet, sha: str, context: grpc.ServicerContext, received: Arena) -> pb.SetWeightsReply:
        """_apply, then give the spare buffer the arena that is free: the received one, or the model's
        previous one where the model took the received arena as its own (see _apply)."""
        free: Arena | None = received
        try:
            reply, free = self._apply(weights, sha, context, received)
            return reply
        finally:
            if free is not None:
                self.spare.give_back(free)

    def SetWeights(self, request_iterator: Iterator[codec.StreamMessage], context: grpc.ServicerContext) -> pb.SetWeightsReply:
        self._admit(context, "SetWeights")
        try:
            try:
                weights, expected_sha, received = self._receive(self._idle_guarded(request_iterator, context))
            except codec.TensorError as exc:
                abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            return self._apply_received(weights, expected_sha, context, received)
        finally:
            self._leave()

    def PullWeights(self, request: pb.PullWeightsRequest, context: grpc.ServicerContext) -> pb.SetWeightsReply:
        """Stream a peer's GetWeights straight into this model: one hop, checked like a SetWeights."""
        self._admit(context, "PullWeights")
        try:
            if self._training:
                abort(context, grpc.StatusCode.FAILED_PRECONDITION, "the worker is training; call again when its Train stream has ended")
            chunk = request.max_chunk_bytes and max(request.max_chunk_bytes, codec.MIN_CHUNK_BYTES)
            try:
                get_weights = self._peer(request.address).get_weights
                stream = get_weights(pb.GetWeightsRequest(max_chunk_bytes=chunk, pack_pieces=True), timeout=_remaining(context))
                try:
                    weights, sha, received = self._receive(codec.until_digest(stream))
                finally:
                    stream.cancel()  # the digest was the last message: nothing of the stream is left but its end
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    self._drop_peer(request.address)
                code = exc.code() if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) else grpc.StatusCode.FAILED_PRECONDITION
                abort(context, code, f"pulling from {request.address}: {exc.code().name}: {exc.details()}")
            except codec.TensorError as exc:
                abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"the weights of {request.address} do not fit this model: {exc}")
            if request.expected_sha256 and sha != request.expected_sha256.lower():
                self.spare.give_back(received)
                abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                      f"{request.address} sent sha256 {sha[:12]}..., expected {request.expected_sha256[:12]}...: is that the right worker?")
            return self._apply_received(weights, sha, context, received)
        finally:
            self._leave()

    def _peer(self, address: str) -> _Peer:
        """The channel to a peer, kept open between pulls: a relay pulls from the same few peers every round,
        and a new channel costs a connection and starts again from gRPC's smallest flow-control window,
        which its BDP probing widens as data comes. At most MAX_PEERS are kept."""
        with self._peers_lock:
            peer = self._peers.pop(address, None)
            if peer is None:
                channel = self.peer_security.channel(address, PEER_OPTIONS)
                peer = _Peer(channel, decoded_get_weights(channel))
            self._peers[address] = peer  # the most recently used last
            while len(self._peers) > MAX_PEERS:
                self._peers.pop(next(iter(self._peers))).channel.close()
            return peer

    def _drop_peer(self, address: str) -> None:
        with self._peers_lock:
            peer = self._peers.pop(address, None)
        if peer is not None:
            peer.channel.close()

    def close(self) -> None:
        """Close the channels to peers (the server has stopped)."""
        with self._peers_lock:
            peers, self._peers = list(self._peers.values()), {}
        for peer in peers:
            peer.channel.close()

    def _apply(self, weights: codec.WeightSet, expected_sha: str, context: grpc.ServicerContext,
               received: Arena) -> tuple[pb.SetWeightsReply, Arena | None]:
        """Apply a complete, checked set all or nothing; also return the arena that is free afterwards.

        Where the adapter can (adopt_weights: a PyTorch model on the CPU), the model takes the set as
        its own memory instead of a copy: `received` becomes the model's, and the arena the model held
        before (if any) is the one free; nothing needs a backup, nothing can differ from what was
        checked. Otherwise the set is copied in (set_weights), and `received` is free again: a small
        set (up to BACKUP_LIMIT_BYTES) with the model's weights saved first, restored if that fails,
        and read back to compare."""
        self._hold_model(context)
        try:
            if set(weights) != set(self.manifest):  # an Initialize changed the model while the set streamed in
                abort(context, grpc.StatusCode.FAILED_PRECONDITION, "the model was re-initialized while the weights arrived; send them again")
            for name, array in weights.items():
                try:
                    codec.check_against_manifest(codec.TensorSpec.of(name, array), self.manifest)
                except codec.TensorError as exc:
                    abort(context, grpc.StatusCode.FAILED_PRECONDITION, f"the model was re-initialized while the weights arrived: {exc}")
            if not context.is_active():  # cancelled (or past its deadline) after the digest: the caller was told so, apply nothing
                abort(context, grpc.StatusCode.CANCELLED, "the call ended before the weights were applied; nothing was applied")
            try:
                adopted = self.adapter.adopt_weights(weights)
            except Exception as exc:  # adapters adopt all or nothing
                log.exception("adopt_weights failed")
                abort(context, grpc.StatusCode.INTERNAL, f"applying the weights failed, the previous weights were kept: {exc}")
            if adopted:
                self._weights_sha = expected_sha
                free, self._model_arena = self._model_arena, received
                log.info("weights set (adopted): sha256 %s", expected_sha[:12])
                return self._reply(weights, expected_sha), free
            small = sum(w.nbytes for w in weights.values()) <= BACKUP_LIMIT_BYTES
            room = self._lend(self._swap_room, sets=2) if small else None
            previous: codec.WeightSet | None = None
            applied: codec.WeightSet = {}

            def swap_in() -> None:  # on the model thread, in one hand-over
                nonlocal previous, applied
                if room is not None:
                    previous = self._snapshot(room)  # the arena's first set
                self.adapter.set_weights(weights)
                if room is not None:
                    applied = self._snapshot(room)  # its second

            try:
                self.adapter.run(swap_in)
                differ = [name for name in sorted(applied) if not codec.same_bytes(applied[name], weights[name])]
                if differ:
                    raise RuntimeError(f"the model holds other values than were applied in {', '.join(differ)}")
                self._weights_sha = expected_sha
            except Exception as exc:
                if small and previous is None:  # reading the model's weights failed, before anything was applied
                    log.exception("reading the model's weights failed")
                    abort(context, grpc.StatusCode.INTERNAL, f"reading the model's weights failed, nothing was applied: {exc}")
                if previous is None:
                    self._weights_sha = self._model_sha()
                    log.exception("set_weights failed on a large set; the model may hold part of it")
                    abort(context, grpc.StatusCode.INTERNAL, f"applying the weights failed: {exc}; the model may hold part of the set, send it again")
                self.adapter.set_weights(previous)  # all or nothing
                log.exception("set_weights failed; previous weights restored")
                abort(context, grpc.StatusCode.INTERNAL, f"applying the weights failed, the previous weights were kept: {exc}")
            finally:
                if room is not None:
                    self._swap_room.give_back(room)
        finally:
            self._model_lock.release()
        log.info("weights set: sha256 %s", expected_sha[:12])
        return self._reply(weights, expected_sha), received

    @staticmethod
    def _reply(weights: codec.WeightSet, sha: str) -> pb.SetWeightsReply:
        return pb.SetWeightsReply(tensor_count=len(weights), total_bytes=sum(w.nbytes for w in weights.values()), sha256=sha)
