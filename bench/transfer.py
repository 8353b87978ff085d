"""`python -m bench.transfer`: moving weight sets of 1 MiB to 3 GiB between two workers, both paths.

For each size a model `mlp:W1,W2,...` of about that size is built on two PyTorch workers (different
seeds, so the weights differ), and `coordinator move` moves the sender's set into the receiver:
by pull (worker to worker, the default) and forwarded through the coordinator. Reported per move:
GB/s from the move's start to the receiver's weights applied and verified, the coordinator's peak
RSS, and the receiving worker's peak RSS during the move (its high-water mark is reset first) as a
multiple of the set. With --flower, the same arrays also go through Flower's parameter codec
(`ndarrays_to_parameters`, one unary gRPC message, `parameters_to_ndarrays`), run in a separate
virtual environment because flwr pins an older protobuf than this project's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench.common import REPO, Worker, table, write
from weightrelay import models

#: name -> model whose canonical weights are about that size (float32)
SIZES = {"1MiB": "mlp:256,256", "64MiB": "mlp:4096,3328", "1GiB": "mlp:16384,16384", "3GiB": "mlp:16384,16384,16384,16384"}


def set_bytes(model: str) -> int:
    return models.resolve(models.builtin(model), (1, 28, 28), 10).parameter_count * 4


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (needs the same user or root)


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def coordinator_move(sender: str, receiver: str, via: bool) -> dict:
    command = [sys.executable, "-m", "coordinator", "move", "--from", sender, "--to", receiver, "--json"] + (["--via-coordinator"] if via else [])
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {', '.join(SIZES)} (default all)")
    parser.add_argument("--repeats", type=int, default=2, help="moves per size and path; the best is reported (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="directory for transfer.json (default bench/results)")
    args = parser.parse_args(argv)
    sender, receiver = Worker("torch", ["--seed", "1"]), Worker("torch", ["--seed", "2"])
    rows, records = [], []
    try:
        for size in args.sizes.split(","):
            model = SIZES[size]
            nbytes = set_bytes(model)
            sender.client.initialize(model, seed=1)
            for path, via in (("pull", False), ("forward", True)):
                best = None
                for _ in range(args.repeats):
                    receiver.client.initialize(model, seed=2)
                    reset_peak(receiver.process.process.pid)
                    moved = coordinator_move(sender.address, receiver.address, via)
                    moved["receiver_peak_rss_bytes"] = peak_rss(receiver.process.process.pid)
                    assert moved["checksum_matches"], moved
                    if best is None or moved["seconds"] < best["seconds"]:
                        best = moved
                record = {"size": size, "model": model, "set_bytes": nbytes, **best,
                          "receiver_peak_over_set": best["receiver_peak_rss_bytes"] / nbytes}
                records.append(record)
                rows.append([size, path, best["gb_per_second"], best["seconds"], best["coordinator_peak_rss_bytes"] / 2**20,
                             record["receiver_peak_over_set"]])
                print(f"{size} {path}: {best['gb_per_second']:.2f} GB/s", flush=True)
    finally:
        sender.stop()
        receiver.stop()
    print(table(["size", "path", "GB/s", "seconds", "coordinator peak MiB", "receiver peak / set"], rows))
    print(f"written: {write('transfer', {'moves': records}, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
