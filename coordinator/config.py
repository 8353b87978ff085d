"""The settings of one relay run; saved verbatim in its results so it can be repeated."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class RunConfig:
    rounds: int = 20
    torch: str = "127.0.0.1:50051"
    keras: str = "127.0.0.1:50052"
    local: bool = False
    epochs: int = 1
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.5
    seed: int = 0
    torch_objective: str = "swap:1,7"
    keras_objective: str = "identity"
    data_dir: str | None = None
    out: str = "runs"
    max_train_samples: int = 0
    connect_timeout: float = 15.0

    def train_seed(self, round_index: int) -> int:
        """Each round shuffles differently, reproducibly from --seed."""
        return self.seed * 100_003 + round_index

    def to_dict(self) -> dict:
        return asdict(self)
