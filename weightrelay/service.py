"""The Worker gRPC service: each RPC reads its request, calls a helper, and builds its reply.

What the RPCs share lives in rooms of its own: admission, the model's lock and the training flag in
gate.ModelGate; the weight sets' memory, sends and receives in store.WeightStore; the channels of
pulls in peers.PeerChannels; a Train's thread in training.TrainingRun. A helper that says no raises
errors.Refused, and the RPC ends its call with that status (see `_refusals_answered`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import platform
import queue
import threading
import time
from typing import Callable, Iterator

import grpc

import weightrelay
from weightrelay import codec, defaults, models
from weightrelay.adapter import FrameworkAdapter, ModelThread, TrainingCancelled, TrainProgress, TrainResult
from weightrelay.data import DataError, Dataset, UnknownDataset
from weightrelay.datachannel import DataChannelError, DataChannelServer, asks_for_it
from weightrelay.errors import Refused, abort, abort_refused
from weightrelay.gate import MAX_MODEL_CALLS, ModelGate
from weightrelay.metrics import evaluate_logits
from weightrelay.models import ModelSpec, ResolvedModel, SpecError
from weightrelay.objectives import Objective, parse_objective
from weightrelay.peers import PeerChannels
from weightrelay.store import WeightStore
from weightrelay.training import TrainingDiverged, TrainingEnded, TrainingRun, train_config
from weightrelay.v1 import worker_pb2 as pb
from weightrelay.v1 import worker_pb2_grpc as pb_grpc

__all__ = ["MAX_MODEL_CALLS", "InitializeError", "WorkerServicer", "abort"]

log = logging.getLogger(__name__)

#: A SetWeights stream that sends nothing for this long is ended (DEADLINE_EXCEEDED).
STREAM_IDLE_SECONDS = 30.0
_DONE = object()

DatasetLoader = Callable[[str], Dataset]


class InitializeError(Refused):
    """Initialize refused (also at the worker's start, where the code picks the exit status)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(code, message)


def _remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds left of the caller's deadline, None when it set none (gRPC then reports years, which
    passed on as a timeout would overflow and end the call at once)."""
    left = context.time_remaining()
    return left if left is not None and left < 10 * 365 * 86400 else None


def _refusals_answered(method: Callable) -> Callable:
    """An RPC method whose helpers' Refused ends the call with that status (streaming replies too)."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def streaming(self, request, context):
            try:
                yield from method(self, request, context)
            except Refused as refused:
                abort_refused(context, refused)
        return streaming

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Refused as refused:
            abort_refused(context, refused)
    return unary


def idle_guarded(requests: Iterator, context: grpc.ServicerContext, idle_seconds: float) -> Iterator:
    """The request stream, read on a thread of its own so that a client that stops sending is noticed:
    after `idle_seconds` without a message the call ends with DEADLINE_EXCEEDED."""
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
            item = pieces.get(timeout=idle_seconds)
        except queue.Empty:
            log.warning("a weights stream sent nothing for %g s; ending it", idle_seconds)
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"the weights stream sent nothing for {idle_seconds:g} s; send the whole set without pausing") from None
        if item is _DONE:
            return
        if isinstance(item, codec.TensorError):
            raise item
        if isinstance(item, BaseException):
            raise Refused(grpc.StatusCode.CANCELLED, "the weights stream ended before its digest")
        yield item


def dataset_info(data: Dataset) -> pb.DatasetInfo:
    """What Describe and Initialize say of a data set."""
    return pb.DatasetInfo(
        name=data.name,
        fingerprint=data.fingerprint,
        train_samples=len(data.train.y),
        test_samples=len(data.test.y),
        data_dir=str(data.data_dir),
        class_names=data.class_names,
        input_shape=data.input_shape,
        mean=data.mean,
        std=data.std,
    )


class WorkerServicer(pb_grpc.WorkerServicer):
    """Serves one adapter's model. One model operation runs at a time; Train holds the model for its
    whole run, and other model calls meanwhile get FAILED_PRECONDITION instead of waiting. Describe
    never touches the model, so it answers even during training.

    `initialize` (the Initialize RPC, and the worker's start) builds the model from a spec, so a
    worker is never without one."""

    def __init__(self, adapter: FrameworkAdapter, data: Dataset, load_data: DatasetLoader, default_objective: str = "identity",
                 dataset_key: str = ""):
        self.adapter = ModelThread(adapter)
        self.data = data
        self.load_data = load_data
        self.default_objective = default_objective
        self.objective: Objective = parse_objective(default_objective, data.num_classes)
        self.model: ResolvedModel | None = None
        self._dataset_key = dataset_key or data.name
        self.gate = ModelGate()
        self.store = WeightStore(self.adapter, self.gate)
        self.peers = PeerChannels()
        self.stream_idle_seconds = STREAM_IDLE_SECONDS
        self.data_channel: DataChannelServer | None = None  # where GetWeights and SetWeights move streams for callers that ask (set by the server)

    # -- settings the server sets -------------------------------------------------------------------
    @property
    def peer_security(self):
        return self.peers.security

    @peer_security.setter
    def peer_security(self, security) -> None:
        self.peers.security = security

    @property
    def manifest(self) -> dict[str, codec.TensorSpec]:
        return self.store.manifest

    def close(self) -> None:
        """Close the channels to peers (the server has stopped)."""
        self.peers.close()

    # -- helpers ------------------------------------------------------------------------------------
    def initialize(self, spec: ModelSpec, seed: int, dataset: str = "", objective: str = "") -> ResolvedModel:
        """Build `spec` with fresh weights from `seed`, optionally on another data set, and reset the
        default objective. Raises InitializeError; on any error the worker keeps what it had."""
        data = self._dataset(dataset)
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
        self.model, self.data, self.objective = resolved, data, new_objective
        self._dataset_key = dataset or self._dataset_key
        self.store.reset(resolved.manifest)
        log.info("initialized %s, seed %d, data %s, objective %s: sha256 %s", resolved.describe(), seed, data.name,
                 new_objective.name, self.store.sha256[:12])
        return resolved

    def _dataset(self, key: str) -> Dataset:
        """The data set named `key` ('' or the current one's key: the current one)."""
        if not key or key == self._dataset_key:
            return self.data
        try:
            return self.load_data(key)
        except UnknownDataset as exc:
            raise InitializeError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except DataError as exc:  # missing or damaged files
            raise InitializeError(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from None

    def _train_summary(self, ended: TrainingEnded, objective: Objective) -> pb.TrainEvent:
        """The Train's last event, or its refusal: how it ended, as the contract says."""
        outcome = ended.outcome
        if isinstance(outcome, TrainingDiverged):
            log.warning("%s", outcome)
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(outcome))
        if not isinstance(outcome, TrainResult):
            log.error("training failed: %s: %s", type(outcome).__name__, outcome)
            raise Refused(grpc.StatusCode.INTERNAL, f"training failed: {type(outcome).__name__}: {outcome}")
        log.info("train done: loss %.4f accuracy %.4f in %.1fs", outcome.loss, outcome.accuracy, ended.seconds)
        return pb.TrainEvent(summary=pb.TrainSummary(
            epochs=outcome.epochs,
            samples_seen=outcome.samples_seen,
            loss=outcome.loss,
            accuracy=outcome.accuracy,
            seconds=ended.seconds,
            objective=objective.name,
            weights_sha256=ended.weights_sha256,
        ))

    def _training_finished(self, previous_objective: Objective) -> Callable[[TrainingEnded], None]:
        """What the training thread does once the model holds its final weights: record them, put the
        objective back where training diverged, and let the model go."""
        def finished(ended: TrainingEnded) -> None:
            try:
                if ended.weights_sha256:
                    self.store.sha256 = ended.weights_sha256
                if isinstance(ended.outcome, TrainingDiverged):
                    self.objective = previous_objective
            finally:
                self.gate.end_training()
        return finished

    # -- RPCs ---------------------------------------------------------------------------------------
    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeReply:
        version, backend = self.adapter.versions()
        return pb.DescribeReply(
            framework=self.adapter.framework,
            framework_version=version,
            backend=backend,
            device=self.adapter.device(),
            architecture=self.model.describe(),
            parameters=[codec.spec_to_proto(spec) for spec in self.manifest.values()],
            dataset=dataset_info(self.data),
            objective=self.objective.name,
            weights_sha256="" if self.gate.training else self.store.sha256,
            worker_version=weightrelay.__version__,
            python_version=platform.python_version(),
            model=models.to_proto(self.model.spec),
            accepts_packed_pieces=True,
            accepts_data_channel=self.data_channel is not None,
            receives_transposed=sorted(self.store.receives_transposed),
            lease=lease.to_proto() if (lease := self.gate.leases.current()) is not None else None,
        )

    @_refusals_answered
    def Initialize(self, request: pb.InitializeRequest, context: grpc.ServicerContext) -> pb.InitializeReply:
        lease_request = request.lease if request.HasField("lease") else None
        self.gate.check_lease(context, "Initialize", taking=lease_request is not None)
        self.gate.refuse_while_training("call Initialize when its Train stream has ended")
        try:
            spec = models.from_proto(request.model)
        except SpecError as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"model: {exc}") from None
        if lease_request is not None:
            self.gate.leases.validate(lease_request)
        with self.gate.model_call(context, "Initialize", changes=True, taking=lease_request is not None):
            resolved = self.initialize(spec, request.seed, request.dataset, request.objective)
            lease = self.gate.leases.grant(context, lease_request) if lease_request is not None else None
        return pb.InitializeReply(
            parameters=[codec.spec_to_proto(spec) for spec in self.manifest.values()],
            weights_sha256=self.store.sha256,
            model=models.to_proto(resolved.spec),
            architecture=resolved.describe(),
            dataset=dataset_info(self.data),
            parameter_count=resolved.parameter_count,
            objective=self.objective.name,
            lease=lease.to_proto(with_id=True) if lease is not None else None,
        )

    @_refusals_answered
    def Train(self, request: pb.TrainRequest, context: grpc.ServicerContext) -> Iterator[pb.TrainEvent]:
        # Listen for the caller leaving before anything else: a cancel or deadline while this call waits
        # for the model must still stop the training it would start (add_callback is False once the call ended).
        cancelled = threading.Event()
        if not context.add_callback(cancelled.set):
            return
        self.gate.check_lease(context, "Train")
        config, objective = train_config(request, self.data, self.objective)
        limit = request.max_samples or len(self.data.train.y)
        x, y = self.data.train.x[:limit], objective.apply(self.data.train.y[:limit])
        self.gate.start_training(context)
        if cancelled.is_set():  # the caller left while this call waited
            self.gate.end_training()
            return
        previous_objective, self.objective = self.objective, objective
        run = TrainingRun(self.adapter, x, y, config, cancelled, self._training_finished(previous_objective))
        try:
            run.start()
        except BaseException:
            self.objective = previous_objective
            self.gate.end_training()
            raise
        log.info("train: %s, objective %s, %d samples", config, objective.name, len(x))
        for event in run.events():
            if isinstance(event, TrainProgress):
                yield pb.TrainEvent(progress=pb.TrainProgress(**dataclasses.asdict(event)))
            elif isinstance(event.outcome, TrainingCancelled):
                log.warning("train stopped: the caller went away")
            else:
                yield self._train_summary(event, objective)

    @_refusals_answered
    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateReply:
        started = time.perf_counter()
        with self.gate.model_call(context, "Evaluate"):
            logits = self.adapter.predict_logits(self.data.test.x, request.batch_size or defaults.EVAL_BATCH)
            weights_sha, data = self.store.sha256, self.data
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

    @_refusals_answered
    def GetWeights(self, request: pb.GetWeightsRequest, context: grpc.ServicerContext) -> Iterator[bytes]:
        with self.gate.admitted("GetWeights"):
            outgoing = self.store.open_send(context, request.transposed)
        messages = self.store.stream(outgoing, request.max_chunk_bytes, request.pack_pieces)  # serialized already (see server.py)
        if request.data_channel and self.data_channel is not None:
            messages = self.data_channel.send(messages, context.is_active)  # the offer; the stream goes on the data channel
        yield from messages

    @_refusals_answered
    def SetWeights(self, request_iterator: Iterator[codec.StreamMessage], context: grpc.ServicerContext) -> pb.SetWeightsReply:
        self.gate.check_lease(context, "SetWeights")
        with self.gate.admitted("SetWeights"):
            if self.data_channel is not None and asks_for_it(context.invocation_metadata()):
                messages = self.data_channel.receive(context)  # the offer; the stream comes on the data channel
            else:
                messages = idle_guarded(request_iterator, context, self.stream_idle_seconds)
            try:
                with contextlib.closing(messages):  # a refused stream's data channel closes at once
                    received = self.store.receive(messages)
            except codec.TensorError as exc:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            except DataChannelError as exc:
                raise Refused(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            return self.store.apply(received, context, "SetWeights")

    @_refusals_answered
    def PullWeights(self, request: pb.PullWeightsRequest, context: grpc.ServicerContext) -> pb.SetWeightsReply:
        """Stream a peer's GetWeights straight into this model: one hop, checked like a SetWeights."""
        self.gate.check_lease(context, "PullWeights")
        with self.gate.admitted("PullWeights"):
            self.gate.refuse_while_training()
            received = self.peers.pull(request, _remaining(context), self.store)
            return self.store.apply(received, context, "PullWeights")

    @_refusals_answered
    def RenewLease(self, request: pb.RenewLeaseRequest, context: grpc.ServicerContext) -> pb.Lease:
        return self.gate.leases.renew(request.lease_id, request.seconds).to_proto(with_id=True)

    @_refusals_answered
    def ReleaseLease(self, request: pb.ReleaseLeaseRequest, context: grpc.ServicerContext) -> pb.ReleaseLeaseReply:
        ended = self.gate.leases.release(request.lease_id, request.force)
        return pb.ReleaseLeaseReply(released=ended is not None, lease=ended.to_proto() if ended is not None else None)
