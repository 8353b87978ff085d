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

import weightrelay
from weightrelay import codec, models
from weightrelay.adapter import FrameworkAdapter, ProgressTracker, TrainConfig, TrainingCancelled, TrainResult
from weightrelay.data import DataError, Dataset, UnknownDataset
from weightrelay.metrics import evaluate_logits
from weightrelay.models import ModelSpec, ResolvedModel, SpecError
from weightrelay.objectives import Objective, parse_objective
from weightrelay.v1 import worker_pb2 as pb
from weightrelay.v1 import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

DEFAULT_EVAL_BATCH = 1000
MAX_EPOCHS = 1000
_DONE = object()


DatasetLoader = Callable[[str], Dataset]


class InitializeError(Exception):
    """Initialize refused; carries the gRPC status code to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class WorkerServicer(pb_grpc.WorkerServicer):
    """Serves one adapter's model. One model operation runs at a time; Train holds the model
    for its whole run, and other model calls meanwhile get FAILED_PRECONDITION instead of
    waiting. Describe never touches the model, so it answers even during training.

    `initialize` (the Initialize RPC, and the worker's start) builds the model from a spec,
    so a worker is never without one."""

    def __init__(self, adapter: FrameworkAdapter, data: Dataset, load_data: DatasetLoader, default_objective: str = "identity",
                 dataset_key: str = ""):
        self.adapter = adapter
        self.data = data
        self.load_data = load_data
        self.default_objective = default_objective
        self.objective: Objective = parse_objective(default_objective, data.num_classes)
        self.model: ResolvedModel | None = None
        self.manifest: dict[str, codec.TensorSpec] = {}
        self._dataset_key = dataset_key or data.name
        self._model_lock = threading.Lock()
        self._training = False
        self._weights_sha = ""  # kept current by Initialize, Train and SetWeights

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
        self._dataset_key = dataset or self._dataset_key
        self._weights_sha = codec.weights_sha256(self.adapter.get_weights())
        log.info("initialized %s, seed %d, data %s, objective %s: sha256 %s", resolved.describe(), seed, data.name,
                 new_objective.name, self._weights_sha[:12])
        return resolved

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
    def _hold_model(self, context: grpc.ServicerContext) -> None:
        """Take the model for a short call: wait while another short call holds it, refuse while training."""
        while not self._model_lock.acquire(timeout=0.05):
            if self._training:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the worker is training; call again when its Train stream has ended")

    def _train_config(self, request: pb.TrainRequest, context: grpc.ServicerContext) -> tuple[TrainConfig, Objective]:
        problems = []
        if request.epochs > MAX_EPOCHS:
            problems.append(f"epochs {request.epochs} is more than {MAX_EPOCHS}")
        if request.learning_rate < 0 or not math.isfinite(request.learning_rate):
            problems.append(f"learning_rate must be a positive number, got {request.learning_rate}")
        if not 0 <= request.momentum < 1:
            problems.append(f"momentum must be in [0, 1), got {request.momentum}")
        if request.batch_size > len(self.data.train.x):
            problems.append(f"batch_size {request.batch_size} is larger than the {len(self.data.train.x)} training samples")
        try:
            objective = parse_objective(request.objective, self.data.num_classes) if request.objective else self.objective
        except ValueError as exc:
            problems.append(str(exc))
            objective = self.objective
        if problems:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "; ".join(problems))
        config = TrainConfig(
            epochs=request.epochs or 1,
            batch_size=request.batch_size or 64,
            learning_rate=request.learning_rate or 0.01,
            momentum=request.momentum,
            seed=request.seed,
            progress_every_batches=request.progress_every_batches,
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
        )

    def Initialize(self, request: pb.InitializeRequest, context: grpc.ServicerContext) -> pb.InitializeReply:
        if self._training:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the worker is training; call Initialize when its Train stream has ended")
        try:
            spec = models.from_proto(request.model)
        except SpecError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"model: {exc}")
        self._hold_model(context)
        try:
            resolved = self.initialize(spec, request.seed, request.dataset, request.objective)
        except InitializeError as exc:
            context.abort(exc.code, str(exc))
        finally:
            self._model_lock.release()
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
        config, objective = self._train_config(request, context)
        limit = request.max_samples or len(self.data.train.y)
        x, y = self.data.train.x[:limit], objective.apply(self.data.train.y[:limit])
        self._hold_model(context)
        self._training = True
        self.objective = objective
        events: queue.Queue = queue.Queue()
        cancelled = threading.Event()
        context.add_callback(cancelled.set)

        def run() -> None:
            started = time.perf_counter()
            outcome: object
            try:
                tracker = ProgressTracker(config, len(x), events.put, cancelled)
                self.adapter.train(x, y, config, tracker)
                outcome = tracker.result()
            except BaseException as exc:  # handed to the RPC thread, which reports it
                outcome = exc
            finally:
                # Finished or not, training moved the weights.
                self._weights_sha = codec.weights_sha256(self.adapter.get_weights())
                self._training = False
                self._model_lock.release()
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
            events.put(outcome)
            events.put(_DONE)

        log.info("train: %s, objective %s, %d samples", config, objective.name, len(x))
        threading.Thread(target=run, name="train", daemon=True).start()
        while (item := events.get()) is not _DONE:
            if isinstance(item, TrainingCancelled):
                log.warning("train cancelled by the client")
            elif isinstance(item, BaseException):
                log.error("training failed", exc_info=item)
                context.abort(grpc.StatusCode.INTERNAL, f"training failed: {type(item).__name__}: {item}")
            elif isinstance(item, pb.TrainSummary):
                log.info("train done: loss %.4f accuracy %.4f in %.1fs", item.loss, item.accuracy, item.seconds)
                yield pb.TrainEvent(summary=item)
            else:
                yield pb.TrainEvent(progress=pb.TrainProgress(**dataclasses.asdict(item)))

    def Evaluate(self, request: pb.EvaluateRequest, context: grpc.ServicerContext) -> pb.EvaluateReply:
        started = time.perf_counter()
        self._hold_model(context)
        try:
            logits = self.adapter.predict_logits(self.data.test.x, request.batch_size or DEFAULT_EVAL_BATCH)
            weights_sha = self._weights_sha
        finally:
            self._model_lock.release()
        result = evaluate_logits(logits, self.data.test.y, self.data.num_classes)
        reply = pb.EvaluateReply(
            loss=result.loss,
            accuracy=result.accuracy,
            samples=len(self.data.test.y),
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
        self._hold_model(context)
        try:
            weights = self.adapter.get_weights()
        finally:
            self._model_lock.release()
        yield from codec.iter_weight_chunks(weights, request.max_chunk_bytes)

    def SetWeights(self, request_iterator: Iterator[pb.WeightsChunk], context: grpc.ServicerContext) -> pb.SetWeightsReply:
        try:
            weights, expected_sha = codec.receive_weights(request_iterator, self.manifest)
        except codec.TensorError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        self._hold_model(context)
        try:
            if set(weights) != set(self.manifest):  # an Initialize changed the model while the set streamed in
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the model was re-initialized while the weights arrived; send them again")
            for name, array in weights.items():
                try:
                    codec.check_against_manifest(codec.TensorSpec.of(name, array), self.manifest)
                except codec.TensorError as exc:
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"the model was re-initialized while the weights arrived: {exc}")
            previous = self.adapter.get_weights()
            try:
                self.adapter.set_weights(weights)
                applied_sha = codec.weights_sha256(self.adapter.get_weights())
                if applied_sha != expected_sha:
                    raise RuntimeError(f"the model holds sha256 {applied_sha} after applying {expected_sha}")
                self._weights_sha = applied_sha
            except Exception as exc:
                self.adapter.set_weights(previous)  # all or nothing
                log.exception("set_weights failed; previous weights restored")
                context.abort(grpc.StatusCode.INTERNAL, f"applying the weights failed, the previous weights were kept: {exc}")
        finally:
            self._model_lock.release()
        log.info("weights set: sha256 %s", expected_sha[:12])
        return pb.SetWeightsReply(
            tensor_count=len(weights), total_bytes=sum(w.nbytes for w in weights.values()), sha256=expected_sha
        )
