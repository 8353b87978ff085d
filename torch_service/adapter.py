"""Model specs in PyTorch. Its state_dict already is the canonical layout (OIHW, [out, in], N, C, H, W); on the
CPU a large dense weight is held in [in, out] memory and seen as [out, in] (TorchAdapter.held)."""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from weightrelay.adapter import FrameworkAdapter, ProgressTracker, TrainConfig, schedule
from weightrelay.codec import TensorSpec, WeightSet
from weightrelay.conversion import BandConversion
from weightrelay.layouts import dense_from_in_out, transposed_kernels
from weightrelay.models import INPUT, ResolvedLayer, ResolvedModel
from weightrelay.transpose import TILED_TRANSPOSE_BYTES, transpose_into

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "none": nn.Identity, "relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "gelu": lambda: nn.GELU(approximate="none"), "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}


class Add(nn.Module):
    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return total


class Tokens(nn.Module):
    """N, C, H, W -> N, H*W, C (row-major over H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class TokenMean(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1)


class PositionEmbedding(nn.Module):
    """A learned table `weight` [tokens, features] added to every sample's tokens (torch.nn has no such layer)."""

    def __init__(self, tokens: int, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(tokens, features))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight


class SelfAttention(nn.MultiheadAttention):
    """torch.nn's attention over the tokens as query, key and value; its tensors are the canonical ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, x, x, need_weights=False)[0]


# -- one builder per kind: the layer as a module whose parameters keep the canonical names ----------
def build_dense(r: ResolvedLayer) -> nn.Module:
    return nn.Linear(r.input_shape[-1], r.output_shape[-1])  # on flat features, or on each token


def build_conv2d(r: ResolvedLayer) -> nn.Module:
    """Symmetric padding in the module; SpecModel pads an asymmetric one (TensorFlow's SAME) before it."""
    top, bottom, left, right = r.padding
    symmetric = top == bottom and left == right
    return nn.Conv2d(r.input_shape[0], r.layer.filters, r.layer.kernel, r.layer.stride, padding=(top, left) if symmetric else 0)


def build_maxpool2d(r: ResolvedLayer) -> nn.Module:
    return nn.MaxPool2d(r.layer.size, r.layer.step)


def build_flatten(r: ResolvedLayer) -> nn.Module:
    return nn.Flatten()  # C, H, W order: the canonical one


def build_batchnorm(r: ResolvedLayer) -> nn.Module:
    norm = nn.BatchNorm2d if len(r.input_shape) == 3 else nn.BatchNorm1d
    return norm(r.input_shape[0], eps=r.layer.eps, momentum=r.layer.momentum)


def build_dropout(r: ResolvedLayer) -> nn.Module:
    return nn.Dropout(r.layer.rate)


def build_avgpool2d(r: ResolvedLayer) -> nn.Module:
    return nn.AvgPool2d(r.layer.size, r.layer.step)


def build_global_avgpool2d(r: ResolvedLayer) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())


def build_layernorm(r: ResolvedLayer) -> nn.Module:
    return nn.LayerNorm(r.input_shape[-1], eps=r.layer.eps)


def build_position_embedding(r: ResolvedLayer) -> nn.Module:
    return PositionEmbedding(*r.input_shape)


def build_multihead_attention(r: ResolvedLayer) -> nn.Module:
    return SelfAttention(r.input_shape[-1], r.layer.heads, dropout=0.0, bias=True, batch_first=True)


#: kind -> its builder (every kind of weightrelay.layers.KINDS; tests/unit/test_models.py checks)
BUILDERS: dict[str, Callable[[ResolvedLayer], nn.Module]] = {
    "dense": build_dense,
    "conv2d": build_conv2d,
    "maxpool2d": build_maxpool2d,
    "flatten": build_flatten,
    "batchnorm": build_batchnorm,
    "dropout": build_dropout,
    "add": lambda r: Add(),
    "avgpool2d": build_avgpool2d,
    "global_avgpool2d": build_global_avgpool2d,
    "layernorm": build_layernorm,
    "tokens": lambda r: Tokens(),
    "position_embedding": build_position_embedding,
    "multihead_attention": build_multihead_attention,
    "token_mean": lambda r: TokenMean(),
}


class SpecModel(nn.Module):
    """The spec's layers in order, each over the outputs of the layers it takes, after its padding where PyTorch's
    own cannot express it (TensorFlow-style SAME with an odd pad pixel) and followed by its activation. An output
    is let go after the last layer that takes it."""

    def __init__(self, model: ResolvedModel) -> None:
        super().__init__()
        last_use = {source: index for index, r in enumerate(model.layers) for source in r.sources}
        self.steps: list[tuple[str, tuple[str, ...], nn.Module | None, nn.Module, nn.Module, tuple[str, ...]]] = []
        for index, r in enumerate(model.layers):
            module = BUILDERS[r.kind](r)
            self.add_module(r.name, module)  # parameters named <layer>.weight etc.
            top, bottom, left, right = r.padding
            pad = None if top == bottom and left == right else nn.ZeroPad2d((left, right, top, bottom))
            done = tuple(source for source in dict.fromkeys(r.sources) if last_use[source] == index)
            self.steps.append((r.name, r.sources, pad, module, ACTIVATIONS[r.layer.activation](), done))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = {INPUT: x}
        for name, sources, pad, module, activation, done in self.steps:
            inputs = [outputs[source] for source in sources]
            for source in done:
                del outputs[source]
            if pad is not None:
                inputs = [pad(inputs[0])]
            x = outputs[name] = activation(module(*inputs))
        return x


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


#: Tensors below this size are copied in and out by numpy on the model thread (see set_weights); larger
#: ones by torch, whose copy runs on all its threads, which pays off only for large tensors.
NUMPY_COPY_BYTES = 16 * 1024 * 1024


def _numpy_copies(tensor: torch.Tensor) -> bool:
    """Whether numpy copies into and out of this tensor's memory (see NUMPY_COPY_BYTES)."""
    return tensor.is_cpu and tensor.dtype != torch.bfloat16 and tensor.numel() * tensor.element_size() < NUMPY_COPY_BYTES


def _hold_transposed(model: SpecModel, name: str) -> None:
    """Dense weight `name` ([out, in]) moved into [in, out] memory, the same values seen as [out, in] (strides 1, out).

    Keras and JAX hold a large dense kernel [in, out] (layouts.transposed_kernels names which). Held so here too,
    every move of it between workers (PyTorch's own included) sends its memory as it is (Tensor.transposed) and
    receives it straight into the model's memory: neither side transposes. nn.Linear computes x @ weight.T,
    which for this memory is a plain matrix product; autograd gives the gradient the parameter's strides."""
    layer, attribute = name.rsplit(".", 1)
    module = model.get_submodule(layer)
    held = getattr(module, attribute).detach().t().contiguous().t()
    setattr(module, attribute, nn.Parameter(held))


#: numpy dtypes whose arrays torch.from_numpy shares, and the torch dtype they become
_ADOPTABLE = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64, np.dtype(np.float16): torch.float16,
              np.dtype(np.int32): torch.int32, np.dtype(np.int64): torch.int64, np.dtype(np.int8): torch.int8,
              np.dtype(np.uint8): torch.uint8, np.dtype(np.bool_): torch.bool}


class TorchAdapter(FrameworkAdapter):
    framework = "torch"

    def __init__(self, device: str = "auto") -> None:
        self._device = resolve_device(device)
        self.model: SpecModel | None = None
        self.names: tuple[str, ...] = ()
        self._optimizer: torch.optim.SGD | None = None
        #: the dense weights held in [in, out] memory (_hold_transposed): on the CPU, those Keras and JAX hold so
        self.held: frozenset[str] = frozenset()

    def build(self, model: ResolvedModel, seed: int) -> None:
        torch.manual_seed(seed)
        built = SpecModel(model).to(self._device)
        held = frozenset(transposed_kernels(model, TILED_TRANSPOSE_BYTES)) if self._device.type == "cpu" else frozenset()
        for name in held:
            _hold_transposed(built, name)
        self.model, self.names, self._optimizer, self.held = built, tuple(model.manifest), None, held

    def versions(self) -> tuple[str, str]:
        return torch.__version__, f"cuda {torch.version.cuda}" if self._device.type == "cuda" else "cpu"

    def device(self) -> str:
        return str(self._device)

    def get_weights(self) -> WeightSet:
        """Fresh C-contiguous host arrays, filled by read_weights."""
        state = self.model.state_dict()  # also holds num_batches_tracked, which is not canonical
        weights = {name: torch.empty(tuple(state[name].shape), dtype=state[name].dtype).numpy() for name in self.names}
        self.read_weights(weights)
        return weights

    def read_weights(self, out: WeightSet) -> None:
        state = self.model.state_dict()
        with torch.no_grad():
            for name in self.names:
                if name in self.held:  # by tiles (transpose_into): numpy's element-wise copy across the layouts is 8x slower
                    dense_from_in_out(state[name].numpy().T, out=out[name])
                elif _numpy_copies(state[name]):
                    np.copyto(out[name], state[name].numpy())  # numpy's copy: see set_weights
                else:
                    torch.from_numpy(out[name]).copy_(state[name])

    def set_weights(self, weights: Mapping[str, np.ndarray], converted: Mapping[str, np.ndarray] | None = None) -> None:
        """Copied into the model's memory, which keeps its layout (held: [in, out]). `converted` needs nothing of its
        own: its arrays are the memory `weights` shows those tensors in, read as they are."""
        state = self.model.state_dict()
        with torch.no_grad():
            for name in self.names:
                if name in self.held:  # into its [in, out] memory by tiles
                    transpose_into(weights[name], state[name].numpy().T)
                elif _numpy_copies(state[name]):
                    # numpy copies on this thread; torch's copy_ would wake its OpenMP threads, which then
                    # busy-wait for more work, taking CPU from the gRPC threads that move small sets.
                    np.copyto(state[name].numpy(), weights[name])
                else:
                    state[name].copy_(torch.from_numpy(np.ascontiguousarray(weights[name])))

    def conversion(self, manifest: Mapping[str, TensorSpec]) -> BandConversion | None:
        """The weights held [in, out] (held), received straight into [in, out] memory the model then takes
        (adopt_weights): sent as they are held by Keras, JAX or PyTorch, their bytes as they come; else band by band."""
        targets = self.held & set(manifest)
        return BandConversion(targets) if targets else None

    def thread_free(self, operation: str, *args) -> bool:
        """Pointer swaps, and copies numpy makes (small tensors on the CPU): no OpenMP team is woken."""
        if operation in ("adopt_weights", "weight_views"):
            return True
        if operation in ("read_weights", "set_weights") and self.model is not None:
            state = self.model.state_dict()
            return all(_numpy_copies(state[name]) for name in self.names)
        return False

    def weight_views(self) -> WeightSet | None:
        """numpy views of the parameters and buffers (the canonical layout is PyTorch's; a held weight [in, out]
        memory seen as [out, in], sent as it is or band by band), on the CPU."""
        if self._device.type != "cpu":
            return None
        state = self.model.state_dict()
        tensors = [state[name] for name in self.names]
        if any(t.dtype == torch.bfloat16 or not (t.is_contiguous() or name in self.held) for name, t in zip(self.names, tensors)):
            return None
        return {name: tensor.numpy() for name, tensor in zip(self.names, tensors)}

    def adopt_weights(self, weights: WeightSet) -> bool:
        """The arrays become the parameters' and buffers' storage (torch.from_numpy shares their memory);
        only on the CPU, and only where every array already has its tensor's dtype, shape and layout (a held
        weight's [in, out] memory, as the receive's conversion gives it; every other one C-contiguous)."""
        if self._device.type != "cpu":
            return False
        owned = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}  # the tensors themselves, not state_dict's aliases
        tensors = {name: owned[name] for name in self.names}
        for name, tensor in tensors.items():
            array = weights[name]
            memory = array.T if name in self.held else array
            if (array.dtype not in _ADOPTABLE or not array.dtype.isnative or not memory.flags.c_contiguous or not array.flags.writeable
                    or array.shape != tuple(tensor.shape) or _ADOPTABLE[array.dtype] != tensor.dtype):
                return False
        with torch.no_grad():
            for name, tensor in tensors.items():
                tensor.data = torch.from_numpy(weights[name])  # strides as the array's: a held weight stays [in, out]
        return True

    def train(self, x: np.ndarray, y: np.ndarray, config: TrainConfig, tracker: ProgressTracker) -> None:
        xs = torch.from_numpy(x).to(self._device)
        ys = torch.from_numpy(y).to(self._device)
        torch.manual_seed((config.seed + config.start_step) % 2**64)  # dropout
        if self._optimizer is None or not config.keep_optimizer:
            self._optimizer = torch.optim.SGD(self.model.parameters(), lr=config.learning_rate, momentum=config.momentum)
        optimizer = self._optimizer
        self.model.train()
        for steps in schedule(config, len(xs)):
            tracker.start_epoch()
            loss_sum = torch.zeros((), device=self._device)
            correct = torch.zeros((), dtype=torch.int64, device=self._device)
            # The epoch's batch indices go to the device in one copy, not one a step (each copy from pageable
            # host memory is a synchronous transfer).
            indices = torch.from_numpy(np.concatenate([step.indices for step in steps])).to(self._device)
            offset = 0
            for step in steps:
                index = indices[offset : offset + len(step.indices)]
                offset += len(step.indices)
                inputs, targets = xs[index], ys[index]
                optimizer.zero_grad(set_to_none=True)
                log_probs = F.log_softmax(self.model(inputs), dim=1)
                loss = F.nll_loss(log_probs, targets)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(index)
                correct += (log_probs.argmax(dim=1) == targets).sum()
                if tracker.wants(step.batch):
                    seen = tracker.epoch_samples
                    tracker.batch_done(step.epoch, step.batch, loss_sum.item() / seen, correct.item() / seen)

    def predict_logits(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        self.model.eval()
        outputs = []
        with torch.inference_mode():
            for start in range(0, len(x), batch_size):
                inputs = torch.from_numpy(x[start : start + batch_size]).to(self._device)
                outputs.append(self.model(inputs).cpu())
        return torch.cat(outputs).numpy()
