"""`python -m bench.train`: each worker's training epoch against its framework's idiomatic in-memory loop.

Same data (MNIST, 60,000 images, or the first --max-train-samples), the seed's MLP (or --model),
batch 64, SGD lr 0.01 momentum 0.5, one epoch; median of --epochs timed epochs after a warm-up. The worker is timed after a SetWeights and an
Evaluate (as in a relay round), from its Train summary; the idiomatic loop runs in a fresh process
of its own: a plain PyTorch loop, Keras `model.fit` with its defaults, a jitted optax step for JAX.
The two take turns, an epoch each, so that a slow spell of a shared machine (they can last
minutes) falls on both sides alike. Both run where the framework puts them by default (a GPU where
there is one), as the worker's --device auto.

For any --model but the MLP the idiomatic loop trains the network the worker builds (the adapter's
builder: torch.nn modules, a Keras functional model, a Flax module) with the framework's own loop,
so the ratio is the worker's cost around the same network (gRPC, the schedule, progress), not a
difference between two hand-written networks.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import Snippet, Worker, data_dir, median, table, write
from weightrelay import models
from weightrelay.v1 import worker_pb2 as pb

FRAMEWORKS = ("torch", "keras", "jax")
PREAMBLE = f"""
import json, time
import numpy as np
from weightrelay.data import load_mnist
data = load_mnist({data_dir()!r}, download=False)
x, y = data.train.x.reshape(len(data.train.x), -1), data.train.y
"""
#: PyTorch's plain loop over `model` (built before it, on `device`)
TORCH_LOOP = """
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
xs, ys = torch.from_numpy(x).to(device), torch.from_numpy(y).to(device)
def epoch():
    for idx in torch.randperm(len(xs), device=device).split(64):
        opt.zero_grad(); loss = F.cross_entropy(model(xs[idx]), ys[idx]); loss.backward(); opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
"""
IDIOMATIC = {
    "torch": """
import torch, torch.nn.functional as F
from torch import nn
torch.manual_seed(0)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the worker trains too (--device auto)
model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)
""" + TORCH_LOOP,
    "keras": """
import os; os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras
model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
def epoch():
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
""",
    "jax": """
import jax, jax.numpy as jnp, optax, flax.linen as nn
class MLP(nn.Module):
    @nn.compact
    def __call__(self, v):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(nn.relu(nn.Dense(128)(v)))))
model = MLP(); params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))
tx = optax.sgd(0.01, momentum=0.5); state = tx.init(params)
@jax.jit
def step(params, state, xb, yb):
    loss, grads = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean())(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state
rng = np.random.default_rng(0)
def epoch():
    global params, state
    order = rng.permutation(len(x))
    for start in range(0, len(x), 64):
        idx = order[start:start + 64]
        params, state = step(params, state, x[idx], y[idx].astype(np.int32))
    jax.block_until_ready(params)
""",
}
#: the idiomatic loops over the network a worker builds from a spec (--model other than mlp); x is N, C, H, W
SPEC_PREAMBLE = """
import json, time
import numpy as np
from weightrelay import models
from weightrelay.data import load_mnist
from weightrelay.layouts import to_nhwc
data = load_mnist({data!r}, download=False)
x, y = data.train.x[:{samples}], data.train.y[:{samples}]
resolved = models.resolve(models.load_model({model!r}), x.shape[1:], 10)
"""
SPEC_IDIOMATIC = {
    "torch": """
import torch, torch.nn.functional as F
from torch_service.adapter import SpecModel
torch.manual_seed(0)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model = SpecModel(resolved).to(device).train()
""" + TORCH_LOOP,
    "keras": """
import os; os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras
from keras_service.adapter import build_model
model = build_model(resolved)
model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
xh = to_nhwc(x)
def epoch():
    model.fit(xh, y, batch_size=64, epochs=1, verbose=0)
""",
    "jax": """
import jax, jax.numpy as jnp, optax
from jax_service.adapter import SpecModule
module = SpecModule(resolved)
xh = to_nhwc(x)
variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1,) + xh.shape[1:]), train=False)
params, stats = variables["params"], variables.get("batch_stats", {})
tx = optax.sgd(0.01, momentum=0.5); state = tx.init(params)
@jax.jit
def step(params, stats, state, xb, yb, key):
    def loss_of(p):
        logits, updates = module.apply({"params": p, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"], rngs={"dropout": key})
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean(), updates.get("batch_stats", {})
    (loss, stats), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), stats, state
rng = np.random.default_rng(0)
key = jax.random.PRNGKey(1)
def epoch():
    global params, stats, state
    order = rng.permutation(len(xh))
    for start in range(0, len(xh), 64):
        idx = order[start:start + 64]
        params, stats, state = step(params, stats, state, xh[idx], y[idx].astype(np.int32), jax.random.fold_in(key, start))
    jax.block_until_ready(params)
""",
}
TIMING = """
import sys
epoch()  # warm-up: graph building, compilation
print(json.dumps({"ready": True}), flush=True)
for _ in sys.stdin:  # one timed epoch per line
    started = time.perf_counter(); epoch(); print(json.dumps({"seconds": time.perf_counter() - started}), flush=True)
"""


def idiomatic_code(framework: str, model: str, samples: int) -> str:
    """The idiomatic loop's snippet: the hand-written MLP over all samples, or the worker's network from `model`."""
    if model == "mlp" and not samples:
        return PREAMBLE + IDIOMATIC[framework] + TIMING
    return SPEC_PREAMBLE.format(data=data_dir(), samples=samples or None, model=model) + SPEC_IDIOMATIC[framework] + TIMING


def epochs_taking_turns(framework: str, epochs: int, model: str = "mlp", samples: int = 0) -> tuple[list[float], list[float]]:
    """(worker epochs, idiomatic epochs), an epoch of each in turn."""
    idiomatic = Snippet(idiomatic_code(framework, model, samples))
    worker = Worker(framework)
    try:
        if model != "mlp":
            worker.client.initialize(models.to_proto(models.load_model(model)), seed=1)
        request = pb.TrainRequest(epochs=1, batch_size=64, learning_rate=0.01, momentum=0.5, seed=1, max_samples=samples)
        worker.client.train_to_end(request)  # warm-up: compiles for every batch size of the epoch
        worker.client.set_weights(worker.client.get_weights())  # a relay round moves weights in and evaluates
        worker.client.evaluate(True, True)
        worker_seconds, idiomatic_seconds = [], []
        for _ in range(epochs):
            idiomatic_seconds.append(idiomatic.step()["seconds"])
            worker_seconds.append(worker.client.train_to_end(request).seconds)
        return worker_seconds, idiomatic_seconds
    finally:
        worker.stop()
        idiomatic.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs of each, taking turns (default 5)")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--model", default="mlp", help=f"the network: {models.BUILTIN_HELP} (default mlp)")
    parser.add_argument("--max-train-samples", type=int, default=0, help="an epoch over the first N training images (default 0: all)")
    parser.add_argument("--out", type=Path, default=None, help="directory for train.json (default bench/results; "
                        "train-MODEL.json for another --model)")
    args = parser.parse_args(argv)
    try:
        models.load_model(args.model)
    except models.SpecError as exc:
        parser.error(f"--model: {exc}")
    rows, records = [], {}
    for framework in args.frameworks.split(","):
        worker, idiomatic = epochs_taking_turns(framework, args.epochs, args.model, args.max_train_samples)
        ratio = median(worker) / median(idiomatic)
        records[framework] = {"worker_seconds": worker, "idiomatic_seconds": idiomatic, "ratio": ratio}
        rows.append([framework, median(worker), median(idiomatic), ratio])
        print(f"{framework}: worker {median(worker):.3f} s, idiomatic {median(idiomatic):.3f} s", flush=True)
    print(table(["framework", "worker epoch s", "idiomatic epoch s", "ratio"], rows))
    name = "train" if args.model == "mlp" else f"train-{args.model}"
    payload = {"epochs": args.epochs, "model": args.model, "max_train_samples": args.max_train_samples, "results": records}
    print(f"written: {write(name, payload, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
