"""A typed client of one worker, used by the coordinator, the tests and users' own scripts.

    from weightrelay.client import WorkerClient
    with WorkerClient("127.0.0.1:50051") as torch_worker:
        print(torch_worker.describe().framework)
        weights = torch_worker.get_weights()      # {name: numpy array}, canonical layout
"""

from __future__ import annotations

from typing import Iterator, Mapping

import grpc
import numpy as np

from weightrelay import codec
from weightrelay.v1 import worker_pb2 as pb
from weightrelay.v1 import worker_pb2_grpc as pb_grpc


class WorkerClient:
    def __init__(self, address: str, timeout: float | None = None):
        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.WorkerStub(self.channel)

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float) -> None:
        """Block until the channel connects; raises grpc.FutureTimeoutError."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def describe(self) -> pb.DescribeReply:
        return self.stub.Describe(pb.DescribeRequest(), timeout=self.timeout)

    def initialize(self, model: pb.ModelSpec | str = "mlp", seed: int = 0, dataset: str = "", objective: str = "") -> pb.InitializeReply:
        """Rebuild the worker's model with fresh weights from `seed` (a built-in name or a full spec)."""
        spec = pb.ModelSpec(name=model) if isinstance(model, str) else model
        request = pb.InitializeRequest(model=spec, seed=seed, dataset=dataset, objective=objective)
        return self.stub.Initialize(request, timeout=self.timeout)

    def train(self, request: pb.TrainRequest) -> Iterator[pb.TrainEvent]:
        """The Train stream; cancel it by calling .cancel() on the returned iterator."""
        return self.stub.Train(request)

    def train_to_end(self, request: pb.TrainRequest) -> pb.TrainSummary:
        summary = None
        for event in self.train(request):
            if event.WhichOneof("event") == "summary":
                summary = event.summary
        if summary is None:
            raise RuntimeError(f"worker {self.address}: the Train stream ended without a summary")
        return summary

    def evaluate(self, include_predictions: bool = False, include_probabilities: bool = False) -> pb.EvaluateReply:
        request = pb.EvaluateRequest(include_predictions=include_predictions, include_probabilities=include_probabilities)
        return self.stub.Evaluate(request, timeout=self.timeout)

    def get_weights(self, max_chunk_bytes: int = 0) -> codec.WeightSet:
        """The worker's weights, checked against the stream's digest."""
        return codec.assemble_weights(self.stub.GetWeights(pb.GetWeightsRequest(max_chunk_bytes=max_chunk_bytes), timeout=self.timeout))

    def set_weights(self, weights: Mapping[str, np.ndarray], max_chunk_bytes: int = 0) -> pb.SetWeightsReply:
        return self.stub.SetWeights(codec.iter_weight_chunks(weights, max_chunk_bytes), timeout=self.timeout)

    def set_weights_stream(self, chunks: Iterator[pb.WeightsChunk]) -> pb.SetWeightsReply:
        """Send a raw weights stream (for tools and tests that build their own)."""
        return self.stub.SetWeights(chunks, timeout=self.timeout)
