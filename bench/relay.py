"""`python -m bench.relay`: a relay round of the system against the seed-style single-process loop.

Both do the same round, same hyperparameters (SGD lr 0.01, momentum 0.5, batch 64, one epoch on
MNIST's 60,000 images) and per-batch update semantics: PyTorch trains (labels 1 and 7 swapped),
its predictions are scored (confusion matrix), the weights go to Keras and are scored there,
Keras trains (true labels), is scored, and the weights go back and are scored. The reference
does it in one process with both frameworks (torch's optimizer created before Keras is imported:
the other way round segfaults), copying weights in memory and calling `model.fit` with its
defaults. The system is `coordinator run --local`. The two take turns, in --blocks blocks of
--rounds rounds each, so that a slow spell of a shared machine (they can last minutes) falls on both
sides alike rather than on one long run. Reported: the median of every block's rounds but its first
(which pays for warm-up), and the ratio system / reference; also each block's own ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import REPO, data_dir, median, run_python, table, write

REFERENCE = """
import json, time
import numpy as np
import torch, torch.nn.functional as F
from torch import nn
from sklearn.metrics import confusion_matrix
from weightrelay.data import load_mnist
data = load_mnist(DATA, download=False)
x, y = data.train.x.reshape(len(data.train.x), -1), data.train.y
xt, yt = data.test.x.reshape(len(data.test.x), -1), data.test.y
swapped = y.copy(); swapped[y == 1] = 7; swapped[y == 7] = 1
torch.manual_seed(0)
tm = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
opt = torch.optim.SGD(tm.parameters(), lr=0.01, momentum=0.5)  # before Keras is imported
import os; os.environ.setdefault("KERAS_BACKEND", "tensorflow")
import keras
km = keras.Sequential([keras.Input((784,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10)])
km.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.5), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
xs, ys = torch.from_numpy(x), torch.from_numpy(swapped)
linears = [m for m in tm if isinstance(m, nn.Linear)]
def torch_to_keras():
    for layer, lin in zip(km.layers, linears):
        layer.set_weights([lin.weight.detach().numpy().T, lin.bias.detach().numpy()])
def keras_to_torch():
    with torch.no_grad():
        for layer, lin in zip(km.layers, linears):
            kernel, bias = layer.get_weights(); lin.weight.copy_(torch.from_numpy(kernel.T)); lin.bias.copy_(torch.from_numpy(bias))
def score_torch():
    with torch.no_grad():
        return confusion_matrix(yt, tm(torch.from_numpy(xt)).argmax(1).numpy(), labels=range(10))
def score_keras():
    return confusion_matrix(yt, km.predict(xt, batch_size=1000, verbose=0).argmax(1), labels=range(10))
times = []
for r in range(ROUNDS):
    started = time.perf_counter()
    for idx in torch.randperm(len(xs)).split(64):
        opt.zero_grad(); F.cross_entropy(tm(xs[idx]), ys[idx]).backward(); opt.step()
    score_torch(); torch_to_keras(); score_keras()
    km.fit(x, y, batch_size=64, epochs=1, verbose=0)
    score_keras(); keras_to_torch(); score_torch()
    times.append(time.perf_counter() - started)
print(json.dumps({"seconds": times}))
"""


def system_rounds(rounds: int) -> list[float]:
    out = Path(tempfile.mkdtemp(prefix="bench-relay-"))
    done = subprocess.run([sys.executable, "-m", "coordinator", "run", "--local", "--rounds", str(rounds), "--data-dir", data_dir(),
                           "--out", str(out), "--no-report", "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    results = json.loads(next(out.iterdir()).joinpath("results.json").read_text())
    return [r["wall_seconds"] for r in results["rounds"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.relay", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="rounds of each per block (default 4: round 0 warms up, the rest count)")
    parser.add_argument("--blocks", type=int, default=3, help="blocks, each the reference then the system (default 3)")
    parser.add_argument("--out", type=Path, default=None, help="directory for relay.json (default bench/results)")
    args = parser.parse_args(argv)
    counted = slice(1, None) if args.rounds > 1 else slice(None)
    system: list[list[float]] = []
    reference: list[list[float]] = []
    rows = []
    for block in range(args.blocks):
        reference.append(run_python(REFERENCE.replace("DATA", repr(data_dir())).replace("ROUNDS", str(args.rounds)))["seconds"])
        system.append(system_rounds(args.rounds))
        rows += [[block, r, system[-1][r], reference[-1][r], system[-1][r] / reference[-1][r]] for r in range(args.rounds)]
        print(f"block {block}: ratio {median(system[-1][counted]) / median(reference[-1][counted]):.3f}", flush=True)
    all_system = [t for times in system for t in times[counted]]
    all_reference = [t for times in reference for t in times[counted]]
    ratio = median(all_system) / median(all_reference)
    print(table(["block", "round", "system s", "single-process s", "ratio"], rows))
    print(f"median of {len(all_system)} rounds (each block's first left out): system {median(all_system):.3f} s, "
          f"single-process {median(all_reference):.3f} s, ratio {ratio:.3f} (goal <= 0.7)")
    block_ratios = [median(s[counted]) / median(r[counted]) for s, r in zip(system, reference)]
    print(f"written: {write('relay', {'rounds': args.rounds, 'blocks': args.blocks, 'system_seconds': system, 'reference_seconds': reference, 'block_ratios': block_ratios, 'ratio': ratio}, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
