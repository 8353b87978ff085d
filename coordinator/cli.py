"""`coordinator`: the command line of the relay experiment."""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from coordinator.config import RunConfig
from coordinator.errors import CoordinatorError, UsageError
from coordinator.local import LocalWorkers
from coordinator.relay import Relay
from weightrelay.objectives import parse_objective

EXIT_INTERRUPTED = 130


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def _objective(text: str) -> str:
    try:
        return parse_objective(text).name
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    defaults = RunConfig()
    parser = argparse.ArgumentParser(prog="coordinator", description="Relay weights between the PyTorch and Keras workers and record both frameworks' confusion matrices.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the relay experiment", description="Run the relay for N rounds and write RUN_DIR/results.json.")
    run.add_argument("--rounds", type=_positive, default=defaults.rounds, help=f"rounds to run (default {defaults.rounds})")
    run.add_argument("--torch", type=_address, default=defaults.torch, help=f"PyTorch worker HOST:PORT (default {defaults.torch})")
    run.add_argument("--keras", type=_address, default=defaults.keras, help=f"Keras worker HOST:PORT (default {defaults.keras})")
    run.add_argument("--local", action="store_true", help="start both workers as child processes on free ports, and stop them at the end")
    run.add_argument("--epochs", type=_positive, default=defaults.epochs, help=f"epochs per Train (default {defaults.epochs})")
    run.add_argument("--batch-size", type=_positive, default=defaults.batch_size, help=f"(default {defaults.batch_size})")
    run.add_argument("--lr", type=float, default=defaults.lr, help=f"SGD learning rate (default {defaults.lr})")
    run.add_argument("--momentum", type=float, default=defaults.momentum, help=f"SGD momentum (default {defaults.momentum})")
    run.add_argument("--seed", type=int, default=defaults.seed, help="seeds the local workers' initial weights and every round's shuffling (default 0)")
    run.add_argument("--torch-objective", type=_objective, default=defaults.torch_objective, help=f"labels PyTorch trains on (default {defaults.torch_objective})")
    run.add_argument("--keras-objective", type=_objective, default=defaults.keras_objective, help=f"labels Keras trains on (default {defaults.keras_objective})")
    run.add_argument("--data-dir", default=None, help="MNIST directory for --local workers (default $WEIGHTRELAY_DATA_DIR, else ~/.cache/weightrelay/mnist)")
    run.add_argument("--out", default=defaults.out, help=f"directory that receives the run directory (default {defaults.out}/)")
    run.add_argument("--max-train-samples", type=int, default=0, help="train on the first N training samples only (default 0: all)")
    run.add_argument("--connect-timeout", type=float, default=defaults.connect_timeout, help=f"seconds to wait for each worker (default {defaults.connect_timeout:g})")
    return parser


def _new_run_dir(out: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for suffix in [""] + [f"-{i}" for i in range(2, 1000)]:
        candidate = out / f"{stamp}{suffix}"
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise CoordinatorError(f"cannot make a new run directory under {out}")


class LinePrinter:
    """One plain line per phase, for terminals and logs alike."""

    def __init__(self, rounds: int):
        self.rounds = rounds

    def __call__(self, kind: str, event: dict[str, Any]) -> None:
        r = event.get("round")
        where = "initial    " if r is None else f"round {r + 1:>3}/{self.rounds}"
        if kind == "start":
            workers = event["workers"]
            for name, info in workers.items():
                print(f"{name:<5} worker {info['address']}: {info['framework']} {info['framework_version']} on {info['device']}", flush=True)
            print(f"run directory: {event['run_dir']}", flush=True)
        elif kind == "train_done":
            print(f"{where}  {event['worker']:<5} trained          loss {event['loss']:.4f}  train-acc {event['accuracy']:.4f}  ({event['seconds']:.1f} s, objective {event['objective']})", flush=True)
        elif kind == "evaluation":
            print(f"{where}  {event['phase']:<22} acc {event['accuracy']:.4f}  loss {event['loss']:.4f}  swap 1<->7 {event['swap_rate']:.3f}", flush=True)
        elif kind == "transfer":
            print(
                f"{where}  moved {event['from']}->{event['to']} {event['bytes']} B in {event['seconds'] * 1000:.0f} ms: "
                f"{event['differing_predictions']} predictions differ, max |dp| {event['max_abs_probability_diff']:.2e}",
                flush=True,
            )
        elif kind == "done":
            print(f"results: {event['results']}", flush=True)


def command_run(args: argparse.Namespace) -> int:
    config = RunConfig(**{key: value for key, value in vars(args).items() if key != "command"})
    run_dir = _new_run_dir(Path(config.out))
    relay = Relay(config, run_dir, LinePrinter(config.rounds))
    if config.local:
        with LocalWorkers(run_dir / "logs", config.seed, config.data_dir) as addresses:
            relay.run(addresses)
    else:
        relay.run({"torch": config.torch, "keras": config.keras})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            return command_run(args)
        raise UsageError(f"unknown command {args.command}")
    except CoordinatorError as exc:
        print(f"coordinator: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("coordinator: interrupted; workers stopped, results so far kept", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
