"""The MLP in PyTorch. Its state_dict already is the canonical layout ([out, in] weights)."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weightrelay.adapter import FrameworkAdapter, ProgressTracker, TrainConfig
from weightrelay.architecture import LAYERS
from weightrelay.codec import WeightSet


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for layer in LAYERS:
            self.add_module(layer.name, nn.Linear(layer.in_features, layer.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in LAYERS:
            x = getattr(self, layer.name)(x)
            if layer.relu:
                x = F.relu(x)
        return x


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


class TorchAdapter(FrameworkAdapter):
    framework = "torch"

    def __init__(self, device: str = "auto", seed: int = 0) -> None:
        self._device = resolve_device(device)
        torch.manual_seed(seed)
        self.model = MLP().to(self._device)

    def versions(self) -> tuple[str, str]:
        return torch.__version__, f"cuda {torch.version.cuda}" if self._device.type == "cuda" else "cpu"

    def device(self) -> str:
        return str(next(self.model.parameters()).device)

    def get_weights(self) -> WeightSet:
        return {name: tensor.detach().cpu().numpy().copy() for name, tensor in self.model.state_dict().items()}

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, tensor in self.model.state_dict().items():
                tensor.copy_(torch.from_numpy(np.ascontiguousarray(weights[name])))

    def train(self, x: np.ndarray, y: np.ndarray, config: TrainConfig, tracker: ProgressTracker) -> None:
        xs = torch.from_numpy(x).to(self._device)
        ys = torch.from_numpy(y).to(self._device)
        shuffle = torch.Generator().manual_seed(config.seed)
        optimizer = torch.optim.SGD(self.model.parameters(), lr=config.learning_rate, momentum=config.momentum)
        self.model.train()
        for epoch in range(1, config.epochs + 1):
            tracker.start_epoch()
            order = torch.randperm(len(xs), generator=shuffle).to(self._device)
            loss_sum = torch.zeros((), device=self._device)
            correct = torch.zeros((), dtype=torch.int64, device=self._device)
            for batch, start in enumerate(range(0, len(xs), config.batch_size), start=1):
                index = order[start : start + config.batch_size]
                inputs, targets = xs[index], ys[index]
                optimizer.zero_grad(set_to_none=True)
                log_probs = F.log_softmax(self.model(inputs), dim=1)
                loss = F.nll_loss(log_probs, targets)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(index)
                correct += (log_probs.argmax(dim=1) == targets).sum()
                if tracker.wants(batch):
                    seen = min(start + config.batch_size, len(xs))
                    tracker.batch_done(epoch, batch, loss_sum.item() / seen, correct.item() / seen)

    def predict_logits(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        self.model.eval()
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                inputs = torch.from_numpy(x[start : start + batch_size]).to(self._device)
                outputs.append(self.model(inputs).cpu())
        return torch.cat(outputs).numpy()
