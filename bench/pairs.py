"""`python -m bench.transfer --pairs`: one set size moved in each direction between frameworks, both paths,
with each worker's memory beside its set.

For each pair FROM:TO two fresh workers start (the sender seeded 1, the receiver 2, so the weights
differ), each with the seed's MLP: its resident set then is its start-up size. Both build the model
(`--size`, 1 GiB by default), and `coordinator move --repeat N` moves the sender's set into the
receiver N times by pull, then N times forwarded through the coordinator. Reported: GB/s of the
fastest move of each path, the pull's GB/s over the torch -> torch pull of the same run (the
reference, always measured first), and of each worker: its resident set once idle after the moves
(a second after the last, when a worker has handed back its freed stream memory) and its peak during
them (the high-water mark is reset first), each less its start-up size, over the set.
Only one pair of workers lives at a time. `--rounds N` goes through all the directions N times, each
round with fresh workers, and reports each direction's fastest moves and largest memory over the rounds:
on a shared machine a slow spell then falls on every direction, the reference included, instead of on
the directions that happened to run in it. The current figures are in bench/README.md.
"""

from __future__ import annotations

import importlib.util
import itertools
import time
from pathlib import Path

from bench.common import Worker, table, write
from weightrelay.buffers import peak_rss_bytes, rss_bytes
from weightrelay.store import IDLE_TRIM_SECONDS

#: framework -> the modules its worker needs (found without importing them)
FRAMEWORK_MODULES = {"torch": ("torch",), "keras": ("tensorflow", "keras"), "jax": ("jax", "flax")}
REFERENCE = ("torch", "torch")


def installed() -> list[str]:
    return [name for name, modules in FRAMEWORK_MODULES.items() if all(importlib.util.find_spec(m) for m in modules)]


def parse_pairs(text: str, frameworks: list[str]) -> list[tuple[str, str]]:
    """"all" (the reference, then every ordered pair of two installed frameworks) or "a:b,c:d"; the reference
    is put first where missing, so that every run has its own."""
    if text == "all":
        pairs = [REFERENCE, *itertools.permutations(frameworks, 2)]
    else:
        pairs = []
        for item in text.split(","):
            sender, _, receiver = item.strip().partition(":")
            if sender not in FRAMEWORK_MODULES or receiver not in FRAMEWORK_MODULES:
                raise SystemExit(f"--pairs: {item!r} is not FROM:TO of {', '.join(FRAMEWORK_MODULES)}")
            pairs.append((sender, receiver))
    missing = sorted({f for pair in pairs for f in pair} - set(frameworks))
    if missing:
        raise SystemExit(f"--pairs: {', '.join(missing)} not installed here (installed: {', '.join(frameworks) or 'none'})")
    return pairs if REFERENCE in pairs else [REFERENCE, *pairs]


def measure_pair(sender_fw: str, receiver_fw: str, model: str, nbytes: int, repeats: int, device: str) -> dict:
    """Both paths of one direction, and both workers' memory over the set (see the module's docstring)."""
    from bench.transfer import coordinator_move, reset_peak

    workers = {}
    try:
        workers["sender"] = Worker(sender_fw, ["--seed", "1", "--device", device])
        workers["receiver"] = Worker(receiver_fw, ["--seed", "2", "--device", device])
        pids = {role: worker.process.process.pid for role, worker in workers.items()}
        for worker in workers.values():
            worker.client.describe()
        start = {role: rss_bytes(pid) for role, pid in pids.items()}
        workers["sender"].client.initialize(model, seed=1)
        workers["receiver"].client.initialize(model, seed=2)
        for pid in pids.values():
            reset_peak(pid)
        paths = {}
        for path, via in (("pull", False), ("forward", True)):
            best = coordinator_move(workers["sender"].address, workers["receiver"].address, via, repeats)
            assert best["checksum_matches"], best
            paths[path] = best
        peak = {role: peak_rss_bytes(pid) for role, pid in pids.items()}
        time.sleep(2 * IDLE_TRIM_SECONDS)  # idle: the workers hand back freed stream memory once the moves are over
        idle = {role: rss_bytes(pid) for role, pid in pids.items()}
    finally:
        for worker in workers.values():
            worker.stop()
    memory = {f"{role}_{what}_over_set": (values[role] - start[role]) / nbytes
              for role in pids for what, values in (("idle", idle), ("peak", peak))}
    return {"from": sender_fw, "to": receiver_fw, "model": model, "set_bytes": nbytes, "device": device,
            "start_rss_bytes": start, "idle_rss_bytes": idle, "peak_rss_bytes": peak, **memory,
            "pull": paths["pull"], "forward": paths["forward"]}


def over_rounds(rounds: list[dict]) -> dict:
    """One direction's records of several rounds as one: each path's fastest move, each worker's largest resident
    sizes and memory over the set (the worst), and every round's GB/s under "rounds"."""
    merged = dict(rounds[0])
    for path in ("pull", "forward"):
        merged[path] = max((r[path] for r in rounds), key=lambda move: move["gb_per_second"])
    for key in ("start_rss_bytes", "idle_rss_bytes", "peak_rss_bytes"):
        merged[key] = {role: max(r[key][role] for r in rounds) for role in rounds[0][key]}
    for key in [k for k in rounds[0] if k.endswith("_over_set")]:
        merged[key] = max(r[key] for r in rounds)
    merged["rounds"] = [{"pull_gb_per_second": r["pull"]["gb_per_second"], "forward_gb_per_second": r["forward"]["gb_per_second"]}
                        for r in rounds]
    return merged


def run(pairs_text: str, size: str, repeats: int, device: str, out: Path | None, rounds: int = 1) -> int:
    from bench.transfer import SIZES, set_bytes

    pairs = parse_pairs(pairs_text, installed())
    model = SIZES[size]
    nbytes = set_bytes(model)
    measured: dict[tuple[str, str], list[dict]] = {pair: [] for pair in pairs}
    for round_ in range(1, rounds + 1):
        for sender_fw, receiver_fw in pairs:
            record = measure_pair(sender_fw, receiver_fw, model, nbytes, repeats, device)
            measured[sender_fw, receiver_fw].append(record)
            print(f"{f'round {round_}/{rounds}: ' if rounds > 1 else ''}{sender_fw} -> {receiver_fw}: pull {record['pull']['gb_per_second']:.2f} GB/s, "
                  f"forward {record['forward']['gb_per_second']:.2f} GB/s", flush=True)
    records = [over_rounds(measured[pair]) for pair in pairs]
    reference = next(r for r in records if (r["from"], r["to"]) == REFERENCE)["pull"]["gb_per_second"]
    rows = []
    for r in records:
        r["pull_over_reference"] = r["pull"]["gb_per_second"] / reference
        r["forward_over_reference"] = r["forward"]["gb_per_second"] / reference
        rows.append([f"{r['from']} -> {r['to']}", r["pull"]["gb_per_second"], r["pull_over_reference"], r["forward"]["gb_per_second"],
                     r["forward_over_reference"], f"{r['sender_idle_over_set']:.2f} / {r['sender_peak_over_set']:.2f}",
                     f"{r['receiver_idle_over_set']:.2f} / {r['receiver_peak_over_set']:.2f}"])
    over = (f" in each of {rounds} rounds", " (the largest of the rounds)") if rounds > 1 else ("", "")
    print(f"{size} ({model}, {nbytes / 1e9:.2f} GB) on {device}, fastest of {repeats} moves per path{over[0]}; memory{over[1]}: above "
          "the worker's start-up size with the seed's MLP, over the set")
    print(table(["direction", "pull GB/s", "/ torch->torch pull", "forward GB/s", "/ torch->torch pull",
                 "sender idle / peak", "receiver idle / peak"], rows))
    name = "transfer-pairs" if device == "cpu" else f"transfer-pairs-{device}"
    print(f"written: {write(name, {'size': size, 'repeats': repeats, 'rounds': rounds, 'device': device, 'pairs': records}, out)}")
    return 0
