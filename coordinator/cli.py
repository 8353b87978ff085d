"""`coordinator`: run the relay experiment, and look at its results."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from coordinator import config as cfg
from coordinator import export as exporting
from coordinator import tracking
from coordinator import validators
from coordinator.checks import check_settings
from coordinator.errors import CoordinatorError, UsageError, WorkerUnreachable
from coordinator.local import LocalWorkers
from coordinator.progress import make_printer
from coordinator.relay import Relay
from coordinator.results import RESULTS_FILE, load_results
from coordinator.sweep_cli import add_sweep_parser, command_sweep
from coordinator.twin import Twin
from weightrelay import models
from weightrelay.buffers import keep_freed_memory, peak_rss_bytes
from weightrelay.data import DATASETS
from weightrelay.security import add_client_flags

EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled like Ctrl-C (results marked interrupted, local workers stopped), exit 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()
CONFIG_FILE = "config.toml"


def _flag_type(validator: Callable[[Any], Any]) -> Callable[[str], Any]:
    """argparse shows an ArgumentTypeError's own message; a plain ValueError it replaces."""

    def convert(text: str) -> Any:
        try:
            return validator(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = validator.__name__
    return convert


def _add_shared_flags(parser: argparse.ArgumentParser, what: str) -> None:
    """The flags `run` and `twin` share: where the workers are, the model, the data, training, deadlines, security, output."""
    d = cfg.RunConfig()
    t = {key: _flag_type(validator) for key, validator in cfg.VALIDATORS.items()}
    item = {key: _flag_type(validator) for key, validator in cfg.ITEM_VALIDATORS.items()}
    parser.add_argument("--config", type=Path, help="TOML file with any of the settings below (keys named like the flags)")
    parser.add_argument("--local", action="store_const", const=True,
                        help="start the workers as child processes on free ports, and stop them at the end")
    parser.add_argument("--worker", action="append", type=item["worker"], metavar="NAME=HOST:PORT",
                        help=f"a worker to {what}, repeatable, in the order given (default {' '.join(d.worker)})")
    parser.add_argument("--workers", type=t["workers"], metavar="NAMES",
                        help=f"with --local: the workers to start, e.g. torch,keras,jax or torch,torch-b (default {','.join(d.local_names())})")
    parser.add_argument("--epochs", type=t["epochs"], help=f"epochs per Train (default {d.epochs})")
    parser.add_argument("--batch-size", type=t["batch_size"], help=f"(default {d.batch_size})")
    parser.add_argument("--lr", type=t["lr"], help=f"SGD learning rate (default {d.lr})")
    parser.add_argument("--momentum", type=t["momentum"], help=f"SGD momentum (default {d.momentum})")
    parser.add_argument("--seed", type=t["seed"],
                        help=f"seeds the initial weights (every worker is initialized first) and the batch order (default {d.seed})")
    parser.add_argument("--model", type=t["model"], help=f"model every worker builds: {models.BUILTIN_HELP} (default {d.model})")
    parser.add_argument("--dataset", type=t["dataset"], help=f"data set: {', '.join(DATASETS)}, or a directory on the workers (default {d.dataset})")
    parser.add_argument("--data-dir", type=t["data_dir"], help="directory of the --dataset for --local workers (default $WEIGHTRELAY_DATA_DIR for mnist, "
                                                               "else $WEIGHTRELAY_DATA_ROOT/NAME, else ~/.cache/weightrelay/NAME)")
    parser.add_argument("--out", type=t["out"], help=f"directory that receives the run directory (default {d.out}/)")
    parser.add_argument("--max-train-samples", type=t["max_train_samples"], help="train on the first N training samples only (default 0: all)")
    parser.add_argument("--connect-timeout", type=t["connect_timeout"], help=f"seconds to wait for each worker (default {d.connect_timeout:g})")
    parser.add_argument("--call-timeout", type=t["call_timeout"],
                        help=f"deadline in seconds of each Describe, Initialize, Evaluate and weights move (default {d.call_timeout:g})")
    parser.add_argument("--train-timeout", type=t["train_timeout"],
                        help=f"deadline in seconds per epoch of each Train (default {d.train_timeout:g})")
    parser.add_argument("--lease-seconds", type=t["lease_seconds"],
                        help=f"each worker's lease: renewed every third of it while the run lives, it expires this long after a "
                             f"coordinator vanished (default {d.lease_seconds})")
    security = parser.add_argument_group("security (see the README's Reliability and Security section)")
    add_client_flags(security, defaults=False)
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--quiet", action="store_true", default=False, help="print only where the results and the report are")
    output.add_argument("--json", action="store_true", default=False, help="print one JSON object per event on stdout")
    parser.add_argument("--no-report", action="store_true", default=False, help="skip writing report.html at the end")
    trackers = parser.add_argument_group("tracking (optional extras: weightrelay[mlflow], weightrelay[tensorboard])")
    trackers.add_argument("--mlflow", type=t["mlflow"], metavar="URI", help="log the run live to this MLflow tracking server or store")
    trackers.add_argument("--mlflow-experiment", type=t["mlflow_experiment"], metavar="NAME", help=f"MLflow experiment (default {d.mlflow_experiment})")
    trackers.add_argument("--tensorboard", type=t["tensorboard"], metavar="DIR", help="write TensorBoard event files to DIR/<run name>/")


def _add_run_parser(commands) -> None:
    d = cfg.RunConfig()
    run = commands.add_parser(
        "run", help="run the relay experiment", argument_default=argparse.SUPPRESS,
        description="Relay the weights for N rounds; write RUN_DIR/results.json, RUN_DIR/config.toml and RUN_DIR/report.html. "
                    "Settings come from the defaults, then --config FILE, then these flags.",
    )
    t = {key: _flag_type(validator) for key, validator in cfg.VALIDATORS.items()}
    item = {key: _flag_type(validator) for key, validator in cfg.ITEM_VALIDATORS.items()}
    _add_shared_flags(run, "relay between")
    run.add_argument("--rounds", type=t["rounds"], help=f"rounds to run (default {d.rounds})")
    run.add_argument("--order", type=t["order"], metavar="NAMES", help="the relay ring, e.g. jax,torch,keras (default: the order given)")
    run.add_argument("--objective", action="append", type=item["objective"], metavar="NAME=OBJECTIVE",
                     help="labels worker NAME trains on, repeatable (default: " + ", ".join(f"{n} {o}" for n, o in cfg.DEFAULT_OBJECTIVES.items())
                          + f", any other {cfg.FALLBACK_OBJECTIVE})")
    for alias in cfg.ALIASES.values():  # the default workers' own flags, kept from when they were the only two
        if alias.setting == "worker":
            run.add_argument(alias.flag, type=t[alias.key], metavar="HOST:PORT",
                             help=f"the {alias.worker} worker's address: its entry of --worker (default {d.addresses()[alias.worker]})")
        else:
            run.add_argument(alias.flag, type=t[alias.key], metavar="OBJECTIVE",
                             help=f"labels the {alias.worker} worker trains on: its entry of --objective (default {d.objective_for(alias.worker)})")
    run.add_argument("--via-coordinator", action="store_const", const=True,
                     help="move the weights through the coordinator (streamed as they arrive) instead of worker to worker")
    run.add_argument("--resume", type=Path, metavar="RUN_DIR",
                     help="continue a failed or interrupted run from its first unfinished round, with its saved settings "
                          "(flags given here override them, e.g. new worker addresses)")


def _add_twin_parser(commands) -> None:
    d = cfg.RunConfig()
    twin = commands.add_parser(
        "twin", help="train every worker on the same batches from the same weights, and measure their drift",
        argument_default=argparse.SUPPRESS,
        description="Twin training: every worker starts from the first one's initial weights and trains the same batches in the same "
                    "order with the same objective and hyperparameters; after the first step, every --every-steps steps and each "
                    "epoch the coordinator pulls all weights and records, per pair, the relative L2 distance, max |dw| and "
                    "prediction disagreement. Writes RUN_DIR/results.json (kind twin) and RUN_DIR/report.html with the drift curves.",
    )
    t = {key: _flag_type(validator) for key, validator in cfg.VALIDATORS.items()}
    _add_shared_flags(twin, "train")
    twin.add_argument("--every-steps", type=t["every_steps"], metavar="K",
                      help=f"also measure every K steps (default {d.every_steps}: after the first step and each epoch only)")
    twin.add_argument("--objective", dest="twin_objective", type=t["twin_objective"],
                      help=f"labels every worker trains on (default {d.twin_objective})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coordinator", description="Relay weights between named workers of different frameworks, "
                                                                     "or train them side by side, and record their confusion matrices.")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(commands)
    _add_twin_parser(commands)

    report = commands.add_parser("report", help="write RUN_DIR/report.html with heatmaps and curves")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    report.add_argument("--rounds", default="default", help="rounds that get heatmaps: default (first, middle, last), all, or e.g. 0,5,19")

    show = commands.add_parser("show", help="print confusion matrices and per-class scores of a run")
    show.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    show.add_argument("--round", type=int, default=None, help="round to show (default: the last completed)")
    show.add_argument("--phase", default=None, help="one phase, e.g. torch_trained (default: all of the round's)")

    move = commands.add_parser("move", help="move the weights once between two running workers and measure it")
    move.add_argument("--from", dest="sender", required=True, type=_flag_type(validators.address), metavar="HOST:PORT", help="the worker whose weights move")
    move.add_argument("--to", dest="receiver", required=True, type=_flag_type(validators.address), metavar="HOST:PORT", help="the worker that receives them")
    move.add_argument("--via-coordinator", action="store_true", help="stream through this coordinator instead of the receiver pulling from the sender")
    move.add_argument("--timeout", type=float, default=3600.0, help="deadline in seconds (default 3600)")
    move.add_argument("--repeat", type=_flag_type(validators.positive_int), default=1, metavar="N",
                      help="move N times in this process and report the fastest, with the median (default 1; the first "
                           "move of a process also pays for warming it up)")
    move.add_argument("--json", action="store_true", help="print one JSON object")
    add_client_flags(move)

    release = commands.add_parser(
        "release", help="break the lease another run holds on a worker (an operator's release of a stale lease)",
        description="End whatever lease the worker at ADDRESS holds (worker.proto, Leases), so that another run can use it. "
                    "The run that held it is refused from then on (LEASE_LOST). A lease also ends by itself when its run "
                    "stops renewing it for its duration (--lease-seconds).")
    release.add_argument("address", type=_flag_type(validators.address), metavar="ADDRESS", help="the worker, HOST:PORT")
    add_client_flags(release)

    compare = commands.add_parser("compare", help="accuracy and swap-rate differences of two runs, per phase")
    compare.add_argument("run_a", type=Path, metavar="RUN_A")
    compare.add_argument("run_b", type=Path, metavar="RUN_B")
    compare.add_argument("--round", type=int, default=None, help="round to compare (default: each run's last completed)")
    exporting.add_parser(commands)
    add_sweep_parser(commands)
    return parser


def _new_run_dir(out: Path, prefix: str = "") -> Path:
    stamp = prefix + datetime.now().strftime("%Y%m%d-%H%M%S")
    for suffix in [""] + [f"-{i}" for i in range(2, 1000)]:
        candidate = out / f"{stamp}{suffix}"
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
        except OSError as exc:
            raise UsageError(f"cannot create the run directory {candidate}: {exc.strerror}; choose another --out"
                             " (in a container, set WEIGHTRELAY_UID/WEIGHTRELAY_GID to the owner of the mounted runs/)") from None
    raise CoordinatorError(f"cannot make a new run directory under {out}")


def _flag_layer(args: argparse.Namespace) -> cfg.Layer:
    """The settings given as flags, each named as the command spells it (twin's --objective is twin_objective)."""
    flags = {key: value for key, value in vars(args).items() if key in cfg.VALIDATORS}
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    spelled = {a.dest: a.option_strings[0] for a in commands[args.command]._actions if a.option_strings}
    return cfg.Layer(flags, {key: spelled[key] for key in flags if key in spelled})


def resolve_settings(args: argparse.Namespace, saved: cfg.Layer | None = None) -> cfg.Settings:
    """Defaults < a resumed run's saved settings < --config FILE < flags, and where each was given."""
    from_file = [cfg.read_layer(args.config)] if getattr(args, "config", None) else []
    return cfg.settle(*([saved] if saved else []), *from_file, _flag_layer(args))


def resolve_run_config(args: argparse.Namespace, saved: cfg.Layer | None = None) -> cfg.RunConfig:
    """The resolved settings (see resolve_settings)."""
    return resolve_settings(args, saved).config


def _resumable(run_dir: Path) -> tuple[cfg.Layer, dict[str, Any]]:
    """(saved settings, results) of a run that `--resume` can continue."""
    if not (run_dir / RESULTS_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise UsageError(f"--resume {run_dir}: no {RESULTS_FILE} and {CONFIG_FILE} there; pass a run directory made by 'coordinator run'")
    results = load_results(run_dir)
    if results.get("status") == "complete":
        raise UsageError(f"--resume {run_dir}: that run is complete; start a new one")
    if results["rounds"] and "checkpoint" not in results:
        raise UsageError(f"--resume {run_dir}: the run kept no weights to resume from (it was made by an older coordinator)")
    return cfg.read_layer(run_dir / CONFIG_FILE), results


def command_run(args: argparse.Namespace) -> int:
    resume: Path | None = getattr(args, "resume", None)
    previous = saved = None
    if resume:
        saved, previous = _resumable(resume)
    settings = resolve_settings(args, saved)
    check_settings(settings, "relay")
    trackers = tracking.connect(settings.config)  # an unreachable tracking server stops the run here
    run_dir = resume or _new_run_dir(Path(settings.config.out))
    _run_with_workers(Relay, settings.config, run_dir, args, previous, trackers)
    return 0


def _run_with_workers(kind: type[Relay] | type[Twin], config: cfg.RunConfig, run_dir: Path, args: argparse.Namespace,
                      previous: dict[str, Any] | None = None, trackers: tracking.Tracking | None = None) -> None:
    """Save the settings, run `kind` (Relay or Twin) against the given or --local workers, write the report;
    the trackers see it all as it goes, and get the run directory at the end."""
    (run_dir / CONFIG_FILE).write_text(cfg.to_toml(config))
    trackers = trackers or tracking.Tracking(config, [])
    printer = trackers.watching(make_printer(config.rounds, quiet=args.quiet, as_json=args.json), run_dir, "relay" if kind is Relay else "twin")
    try:
        runner = kind(config, run_dir, printer)
        if config.local:
            printer("step", {"round": None, "step": "starting local workers"})
            with LocalWorkers(run_dir / "logs", config.seed, config.data_dir, config.dataset, config.model,
                              names=config.local_names()) as addresses:
                runner.run(addresses, previous)
        else:
            runner.run(config.addresses(), previous)
        if not args.no_report:
            printer("step", {"round": None, "step": "writing the report"})
            from coordinator.report import write_report

            printer("report", {"path": str(write_report(run_dir))})
    finally:
        printer.close()
        trackers.finish(run_dir)


def command_twin(args: argparse.Namespace) -> int:
    settings = resolve_settings(args)
    check_settings(settings, "twin")
    trackers = tracking.connect(settings.config)
    _run_with_workers(Twin, settings.config, _new_run_dir(Path(settings.config.out)), args, trackers=trackers)
    return 0


def command_move(args: argparse.Namespace) -> int:
    import json
    import statistics

    import grpc

    from coordinator.errors import RoundFailed
    from coordinator.moves import SenderFailed, move
    from weightrelay.client import WorkerClient
    from weightrelay.security import ClientSecurity, SecurityError, resolve_token

    try:
        security = ClientSecurity(args.tls_ca, args.tls_cert, args.tls_key, resolve_token(args.token_file), args.tls_server_name)
    except SecurityError as exc:
        raise UsageError(str(exc)) from None
    with WorkerClient(args.sender, timeout=60, security=security) as sender, WorkerClient(args.receiver, timeout=60, security=security) as receiver:
        try:
            expected = sender.describe().weights_sha256
            receiver.describe()  # both channels connected before the clock starts
            moves = [move(sender, receiver, args.via_coordinator, expected, args.timeout) for _ in range(args.repeat)]
            received = receiver.describe().weights_sha256
        except SenderFailed as exc:
            raise RoundFailed(f"move {args.sender} -> {args.receiver} failed on the sender: {exc}") from None
        except grpc.RpcError as exc:
            raise RoundFailed(f"move {args.sender} -> {args.receiver} failed: {exc.code().name}: {exc.details()}") from None
    done = min(moves, key=lambda m: m.seconds)
    median = statistics.median(m.seconds for m in moves)
    record = {"from": args.sender, "to": args.receiver, **done.to_dict(), "repeats": args.repeat, "median_seconds": median, "expected_sha256": expected,
              "receiver_sha256": received, "checksum_matches": received == expected == done.sha256,
              "coordinator_peak_rss_bytes": peak_rss_bytes()}
    if args.json:
        print(json.dumps(record))
    else:
        times = f" (fastest of {args.repeat}, median {median:.3f} s)" if args.repeat > 1 else ""
        print(f"moved {done.bytes} bytes ({done.tensors} tensors) {args.sender} -> {args.receiver} by {done.path} in {done.seconds:.3f} s{times}: "
              f"{done.gb_per_second:.2f} GB/s; receiver checksum {'matches' if record['checksum_matches'] else 'DIFFERS'} "
              f"({received[:12]}); coordinator peak RSS {record['coordinator_peak_rss_bytes'] / 2**20:.0f} MiB"
              + (f"; forwarded because {done.why_forward}" if done.why_forward else ""))
    return 0 if record["checksum_matches"] else 5


def command_release(args: argparse.Namespace) -> int:
    import grpc

    from coordinator.errors import RoundFailed
    from weightrelay.client import WorkerClient
    from weightrelay.security import ClientSecurity, SecurityError, resolve_token

    try:
        security = ClientSecurity(args.tls_ca, args.tls_cert, args.tls_key, resolve_token(args.token_file), args.tls_server_name)
    except SecurityError as exc:
        raise UsageError(str(exc)) from None
    with WorkerClient(args.address, timeout=30, security=security) as worker:
        try:
            reply = worker.release_lease(force=True)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise WorkerUnreachable("the", args.address, exc.details() or "") from None
            raise RoundFailed(f"release {args.address}: {exc.code().name}: {exc.details()}") from None
    if reply.released:
        print(f"released the lease of run {reply.lease.run_id!r} ({reply.lease.holder}) on {args.address}")
    else:
        print(f"{args.address} held no lease")
    return 0


def _results(run_dir: Path) -> dict[str, Any]:
    if not (run_dir / RESULTS_FILE).is_file():
        raise UsageError(f"{run_dir} holds no {RESULTS_FILE}; pass a run directory made by 'coordinator run'")
    return load_results(run_dir)


def command_report(args: argparse.Namespace) -> int:
    from coordinator.report import write_report

    _results(args.run_dir)
    try:
        print(f"report: {write_report(args.run_dir, args.rounds)}")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return 0


def command_show(args: argparse.Namespace) -> int:
    from coordinator.views import show

    show(_results(args.run_dir), str(args.run_dir), args.round, args.phase)
    return 0


def command_compare(args: argparse.Namespace) -> int:
    from coordinator.views import compare

    compare(_results(args.run_a), _results(args.run_b), (str(args.run_a), str(args.run_b)), args.round)
    return 0


COMMANDS = {"run": command_run, "twin": command_twin, "move": command_move, "release": command_release, "report": command_report,
            "show": command_show, "compare": command_compare, "export": exporting.command, "sweep": command_sweep}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    keep_freed_memory()  # forwarded weight streams reuse their message memory
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return COMMANDS[args.command](args)
    except CoordinatorError as exc:
        print(f"coordinator: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("coordinator: terminated (SIGTERM); workers stopped, results so far kept", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("coordinator: interrupted; workers stopped, results so far kept", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ModuleNotFoundError as exc:
        if exc.name not in ("rich", "matplotlib"):
            raise
        print(f"coordinator: error: {exc.name} is missing; install the coordinator's extra: pip install 'weightrelay[coordinator]'", file=sys.stderr)
        return UsageError.exit_code


if __name__ == "__main__":
    sys.exit(main())
