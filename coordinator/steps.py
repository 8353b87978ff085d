"""The steps of a relay round over a session's workers, each announced as an event: a worker
trains; its weights move to the next one; both evaluate them, and the receiver's predictions are
compared with the sender's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from coordinator import moves
from coordinator.errors import RoundFailed
from coordinator.records import Agreement, Evaluation, MoveRecord, TrainRecord, message_to_dict, to_json
from coordinator.session import Session, Worker
from weightrelay.v1 import worker_pb2 as pb

#: A Train reports its progress every this many batches (the live view's epoch/batch bar).
PROGRESS_EVERY_BATCHES = 50


class Steps:
    """Use as a context manager: a thread evaluates the sender beside the receiver, and is ended with it."""

    def __init__(self, session: Session, pairs: Sequence[tuple[int, int]]):
        self.session = session
        self.pairs = list(pairs)  # the label pairs whose swap rates every evaluation records
        self._beside = ThreadPoolExecutor(1, thread_name_prefix="evaluate")

    def __enter__(self) -> "Steps":
        return self

    def __exit__(self, *exc) -> None:
        self._beside.shutdown(wait=False)

    def _announce(self, kind: str, round_index: int | None, payload: dict) -> None:
        self.session.on_event(kind, {"round": round_index, **payload})

    def train(self, worker: Worker, round_index: int) -> TrainRecord:
        """`worker` trains one round (its progress streamed as events); Ctrl-C or an error stops the worker's training too."""
        session = self.session
        request = session.train_request(worker, session.config.train_seed(round_index), progress_every_batches=PROGRESS_EVERY_BATCHES)

        def run() -> pb.TrainSummary:
            summary = None
            stream = worker.client.train(request, timeout=session.config.train_deadline())
            try:
                for event in stream:
                    if event.WhichOneof("event") == "summary":
                        summary = event.summary
                    else:
                        self._announce("train_progress", round_index, {"worker": worker.name, **message_to_dict(event.progress)})
            except BaseException:
                stream.cancel()
                raise
            if summary is None:
                raise RoundFailed(f"round {round_index}: the {worker.name} worker's Train stream ended without a summary")
            return summary

        self._announce("step", round_index, {"step": f"{worker.name}: train"})
        record = TrainRecord(worker.name, session.call(worker, f"{worker.name} trains (Train)", round_index, run, settings=True))
        self._announce("train_done", round_index, to_json(record))
        return record

    def score(self, worker: Worker, phase: str, round_index: int | None) -> tuple[Evaluation, pb.EvaluateReply]:
        """`worker`'s Evaluate, with predictions and probabilities (to compare with another's), unannounced."""
        reply = self.session.call(worker, f"{phase} (Evaluate)", round_index, lambda: worker.client.evaluate(True, True))
        return Evaluation.of(worker.name, phase, reply, self.pairs), reply

    def evaluate(self, worker: Worker, phase: str, round_index: int | None) -> tuple[Evaluation, pb.EvaluateReply]:
        self._announce("step", round_index, {"step": f"{worker.name}: evaluate"})
        evaluation, reply = self.score(worker, phase, round_index)
        self._announce("evaluation", round_index, to_json(evaluation))
        return evaluation, reply

    def move(self, sender: Worker, receiver: Worker, round_index: int | None, expected_sha256: str = "") -> moves.Move:
        """The weights sender -> receiver, pulled by the receiver or forwarded (coordinator.moves); never held here."""
        config = self.session.config
        self._announce("step", round_index, {"step": f"move {sender.name} -> {receiver.name}"})
        return self.session.call(receiver, f"move {sender.name}->{receiver.name}", round_index,
                                 lambda: moves.move(sender.client, receiver.client, config.via_coordinator, expected_sha256, config.call_timeout))

    def _compared(self, sender: Worker, receiver: Worker, done: moves.Move, sent: pb.EvaluateReply, received: pb.EvaluateReply,
                  phase: str, round_index: int | None) -> MoveRecord:
        """A move's record with how the receiver's predictions compare with the sender's, announced."""
        record = MoveRecord(sender.name, receiver.name, done.path, done.seconds, done.bytes, done.tensors, done.sha256,
                            Agreement.between(sent, received), phase)
        self._announce("transfer", round_index, to_json(record))
        return record

    def measured_move(self, sender: Worker, receiver: Worker, sent: pb.EvaluateReply, phase: str,
                      round_index: int | None) -> tuple[MoveRecord, Evaluation]:
        """The sender's weights (scored as `sent`) move to `receiver`, which evaluates them as `phase`."""
        done = self.move(sender, receiver, round_index, sent.weights_sha256)
        evaluation, received = self.evaluate(receiver, phase, round_index)
        return self._compared(sender, receiver, done, sent, received, phase, round_index), evaluation

    def hand_on(self, sender: Worker, receiver: Worker, trained_sha256: str, round_index: int) -> tuple[MoveRecord, Evaluation, Evaluation]:
        """After `sender` trained: its weights move to `receiver`, then both evaluate them at once (two
        processes, each its own model), instead of the sender evaluating before the move and the
        receiver after. Returns the move, the sender's evaluation and the receiver's."""
        phase = f"{receiver.name}_from_{sender.name}"
        done = self.move(sender, receiver, round_index, trained_sha256)
        self._announce("step", round_index, {"step": f"{sender.name} and {receiver.name}: evaluate"})
        pending = self._beside.submit(self.score, sender, f"{sender.name}_trained", round_index)
        try:
            received_evaluation, received = self.score(receiver, phase, round_index)
        finally:
            trained_evaluation, sent = pending.result()  # also when the receiver's failed: never leave it running
        for evaluation in (trained_evaluation, received_evaluation):  # events in the order of the round, from this thread
            self._announce("evaluation", round_index, to_json(evaluation))
        return self._compared(sender, receiver, done, sent, received, phase, round_index), trained_evaluation, received_evaluation
