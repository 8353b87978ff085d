"""`python -m bench.transfer`: moving weight sets of 1 MiB to 3 GiB between two workers, both paths.

For each size a model `mlp:W1,W2,...` of about that size is built on two PyTorch workers (different
seeds, so the weights differ), and `coordinator move --repeat N` moves the sender's set into the
receiver N times in one process: by pull (worker to worker, the default) and forwarded through the
coordinator. Reported, of the fastest move: GB/s from the move's start to the receiver's weights
applied and verified; the median move's seconds; and over all N: the coordinator's peak RSS, and the
receiving worker's peak RSS during the moves (its high-water mark is reset first) as a multiple of
the set. Sets under 64 MiB move 50 times, larger ones 5: a small move is so short that on a shared
machine the fastest of a few is mostly luck, so the median is reported beside the fastest. Beside
them, the same arrays go through Flower's parameter codec (`ndarrays_to_parameters`, one unary gRPC
message, `parameters_to_ndarrays`: bench/flower_peer.py), run in a virtual environment of its own
because flwr pins an older protobuf than this project's. The current figures are in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import REPO, Worker, table, write
from weightrelay import models
from weightrelay.buffers import peak_rss_bytes

#: name -> model whose canonical weights are about that size (float32)
SIZES = {"1MiB": "mlp:256,256", "64MiB": "mlp:4096,3328", "1GiB": "mlp:16384,16384", "3GiB": "mlp:16384,16384,16384,16384"}
#: Moves per size and path (ours and Flower's alike) unless --repeats says otherwise: many of the small, few of the large.
SMALL_SET_REPEATS, LARGE_SET_REPEATS, SMALL_SET_BYTES = 50, 5, 64 * 2**20


def set_bytes(model: str) -> int:
    return models.resolve(models.builtin(model), (1, 28, 28), 10).parameter_count * 4


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM (needs the same user or root)


def coordinator_move(sender: str, receiver: str, via: bool, repeat: int) -> dict:
    command = [sys.executable, "-m", "coordinator", "move", "--from", sender, "--to", receiver, "--repeat", str(repeat), "--json"]
    command += ["--via-coordinator"] if via else []
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout)


FLOWER_VENV = REPO / "bench" / ".flower-venv"
#: What the Flower environment installs (flwr 1.42 needs protobuf < 7; this project uses 7).
FLOWER_REQUIREMENTS = ["flwr==1.42.0", "numpy"]


def flower_python(given: str | None) -> str:
    """An interpreter with flwr: --flower-python, else bench/.flower-venv, made on first use."""
    if given:
        return given
    python = FLOWER_VENV / "bin" / "python"
    if not python.exists():
        print(f"making {FLOWER_VENV} with {' '.join(FLOWER_REQUIREMENTS)} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *FLOWER_REQUIREMENTS], check=True)
    return str(python)


def flower_move(python: str, sender: Worker, repeats: int) -> dict:
    """Flower's codec and one unary message on the sender's set (bench/flower_peer.py), in its own environment."""
    with tempfile.TemporaryDirectory(prefix="bench-flower-") as directory:
        for name, array in sender.client.get_weights().items():  # the same arrays as our moves
            np.save(Path(directory) / f"{name}.npy", array)
        sender.client.initialize("mlp", seed=1)  # the workers let go of the large set while Flower runs
        done = subprocess.run([python, str(REPO / "bench" / "flower_peer.py"), directory, str(repeats)],
                              capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        cause = "killed (out of memory?)" if done.returncode in (-9, 137) else f"exit {done.returncode}: {done.stderr.strip()[-300:]}"
        return {"error": cause}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.transfer", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of {', '.join(SIZES)} (default all)")
    parser.add_argument("--repeats", type=int, default=None, help="moves per size and path, in one coordinator process as Flower's run "
                        f"in one; the fastest and the median are reported (default {SMALL_SET_REPEATS} for sets under 64 MiB, "
                        f"{LARGE_SET_REPEATS} for larger)")
    parser.add_argument("--no-flower", action="store_true", help="leave out Flower's codec")
    parser.add_argument("--flower-python", default=None, help=f"an interpreter with flwr (default {FLOWER_VENV.relative_to(REPO)}, made on first use)")
    parser.add_argument("--out", type=Path, default=None, help="directory for transfer.json (default bench/results)")
    parser.add_argument("--pairs", nargs="?", const="all", default=None, metavar="FROM:TO,...",
                        help="instead: one size (--size) in each direction between frameworks, with each worker's memory "
                        "(bench/pairs.py); alone, every ordered pair of the installed frameworks and torch:torch")
    parser.add_argument("--size", default="1GiB", choices=sorted(SIZES), help="--pairs: the set's size (default 1GiB)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="--pairs: the workers' --device (default cpu)")
    parser.add_argument("--rounds", type=int, default=1, help="--pairs: times every direction is measured, in turns with fresh workers; "
                        "the fastest moves and the largest memory are reported (default 1)")
    args = parser.parse_args(argv)
    if args.pairs is not None:
        from bench import pairs

        if args.rounds < 1:
            parser.error(f"--rounds must be at least 1, got {args.rounds}")
        return pairs.run(args.pairs, args.size, args.repeats or LARGE_SET_REPEATS, args.device, args.out, args.rounds)
    python = None if args.no_flower else flower_python(args.flower_python)
    sender, receiver = Worker("torch", ["--seed", "1"]), Worker("torch", ["--seed", "2"])
    rows, records, flower = [], [], {}
    try:
        for size in args.sizes.split(","):
            model = SIZES[size]
            nbytes = set_bytes(model)
            repeats = args.repeats or (SMALL_SET_REPEATS if nbytes < SMALL_SET_BYTES else LARGE_SET_REPEATS)
            sender.client.initialize(model, seed=1)
            for path, via in (("pull", False), ("forward", True)):
                receiver.client.initialize(model, seed=2)  # other weights than the sender's
                reset_peak(receiver.process.process.pid)
                best = coordinator_move(sender.address, receiver.address, via, repeats)  # the fastest of the repeats, and their median
                best["receiver_peak_rss_bytes"] = peak_rss_bytes(receiver.process.process.pid)
                assert best["checksum_matches"], best
                records.append({"size": size, "model": model, "set_bytes": nbytes, **best,
                                "receiver_peak_over_set": best["receiver_peak_rss_bytes"] / nbytes})
                print(f"{size} {path}: {best['gb_per_second']:.2f} GB/s", flush=True)
            receiver.client.initialize("mlp", seed=2)
            if python:
                flower[size] = {"set_bytes": nbytes, **flower_move(python, sender, repeats)}
                print(f"{size} flower: {flower[size].get('gb_per_second', 0):.2f} GB/s {flower[size].get('error', '')}", flush=True)
    finally:
        sender.stop()
        receiver.stop()
    for record in records:
        theirs = flower.get(record["size"], {})
        # Speed ratios: Flower's time over ours, of the fastest moves and of the medians.
        record["vs_flower"] = (theirs["seconds"] / record["seconds"]) if "seconds" in theirs else None
        record["vs_flower_median"] = (theirs["median_seconds"] / record["median_seconds"]) if "median_seconds" in theirs else None
        versus = "-" if not theirs else ("Flower failed" if record["vs_flower"] is None else
                                         f"{record['vs_flower']:.1f}x / {record['vs_flower_median']:.1f}x")
        rows.append([record["size"], record["path"], record["repeats"], record["gb_per_second"], record["seconds"] * 1e3, record["median_seconds"] * 1e3,
                     record["coordinator_peak_rss_bytes"] / 2**20, record["receiver_peak_over_set"], versus])
    for size, theirs in flower.items():
        if "error" in theirs:
            rows.append([size, "flower", "-", "failed", theirs["error"][:60], "-", "-", "-", "-"])
        else:
            rows.append([size, "flower", theirs["repeats"], theirs["gb_per_second"], theirs["seconds"] * 1e3, theirs["median_seconds"] * 1e3, "-",
                         theirs["receiver_peak_rss_bytes"] / theirs["set_bytes"], "-"])
    print(table(["size", "path", "moves", "GB/s", "fastest ms", "median ms", "coordinator peak MiB", "receiver peak / set",
                 "ours / Flower (fastest / median)"], rows))
    moves_per_path = args.repeats or {"under_64MiB": SMALL_SET_REPEATS, "from_64MiB": LARGE_SET_REPEATS}
    print(f"written: {write('transfer', {'repeats': moves_per_path, 'moves': records, 'flower': flower}, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
