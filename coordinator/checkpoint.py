"""The weights of every worker after each completed round, kept in the run directory for `--resume`.

Safetensors files (a JSON header and raw little-endian tensors: nothing is unpickled or run on
loading), one per worker and round, written atomically; the previous round's files are removed
only after results.json names the new ones, so a crash at any point leaves a usable pair.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from coordinator.errors import UsageError
from coordinator.records import Checkpoint
from coordinator.session import Session
from weightrelay import codec
from weightrelay.files import write_atomic

WEIGHTS_DIR = "weights"


def checkpoint_path(run_dir: Path, round_index: int, worker: str) -> Path:
    return run_dir / WEIGHTS_DIR / f"round-{round_index:03d}-{worker}.safetensors"


def save(run_dir: Path, round_index: int, worker: str, weights: codec.WeightSet) -> str:
    """Write one worker's canonical weights after round `round_index`; return the path relative to run_dir."""
    path = checkpoint_path(run_dir, round_index, worker)
    path.parent.mkdir(exist_ok=True)
    metadata = {"round": str(round_index), "worker": worker, "sha256": codec.weights_sha256(weights)}
    write_atomic(path, save_safetensors({name: np.ascontiguousarray(array) for name, array in weights.items()}, metadata=metadata))
    return str(path.relative_to(run_dir))


def load(run_dir: Path, relative: str, expected_sha256: str) -> codec.WeightSet:
    """A saved weight set, checked against the checksum results.json recorded for it."""
    path = run_dir / relative
    try:
        weights = dict(load_safetensors(path.read_bytes()))
    except OSError as exc:
        raise ValueError(f"cannot read the checkpoint {path}: {exc.strerror}") from None
    except Exception as exc:  # safetensors raises its own error type for a damaged file
        raise ValueError(f"the checkpoint {path} is damaged: {exc}") from None
    actual = codec.weights_sha256(weights)
    if actual != expected_sha256:
        raise ValueError(f"the checkpoint {path} holds sha256 {actual[:12]}..., results.json recorded {expected_sha256[:12]}...")
    return weights


def remove_round(run_dir: Path, round_index: int, workers: list[str]) -> None:
    for worker in workers:
        checkpoint_path(run_dir, round_index, worker).unlink(missing_ok=True)


def take(session: Session, round_index: int) -> Checkpoint:
    """Save every worker's weights after a completed round."""
    files, sums = {}, {}
    for name, worker in session.workers.items():
        weights = session.call(worker, f"checkpoint {name} (GetWeights)", round_index, worker.client.get_weights)
        files[name] = save(session.run_dir, round_index, name, weights)
        sums[name] = codec.weights_sha256(weights)
    return Checkpoint(round_index, files, sums)


def restore(session: Session, saved: Checkpoint) -> None:
    """Put the weights of the last completed round back into every worker."""
    for name, worker in session.workers.items():
        try:
            weights = load(session.run_dir, saved.files[name], saved.sha256[name])
        except (KeyError, ValueError) as exc:
            raise UsageError(f"cannot resume {session.run_dir}: {exc}") from None
        session.on_event("step", {"round": None, "step": f"restore {name} from round {saved.round}"})
        session.call(worker, f"restore {name} (SetWeights)", None, lambda w=worker, ws=weights: w.client.set_weights(ws))
