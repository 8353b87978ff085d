"""`coordinator export RUN_DIR`: a worker's kept weights as a file other tools load.

A relay keeps every worker's weights after its last completed round (coordinator.checkpoint), in
the canonical layout, with the spec each worker built (its Describe, in results.json). From those:

- `onnx`: an ONNX model, graph and weights (coordinator.onnx_graph), checked by onnx's checker;
- `safetensors`: the canonical tensors as they are, with the model and run in the metadata;
- `torch`: a PyTorch state_dict for torch_service.adapter.SpecModel, written by torch_service.export;
- `keras`: a Keras `.weights.h5` for keras_service.adapter.build_model, written by keras_service.export.

The torch and keras files are written by the worker packages in a subprocess each: the coordinator
imports no deep-learning framework (and never two in one process). onnx is imported only here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from google.protobuf import json_format

from coordinator import checkpoint
from coordinator.errors import CoordinatorError, UsageError
from coordinator.results import RESULTS_FILE, load_results
from weightrelay import codec, handoff, models
from weightrelay.files import write_atomic
from weightrelay.v1 import worker_pb2 as pb

EXPORT_DIR = "export"
#: format -> the file name's ending
SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors", "torch": ".pt", "keras": ".weights.h5"}
#: format -> (module whose package must be installed, its exporter module, the extra that installs it)
FRAMEWORK_EXPORTERS = {"torch": ("torch", "torch_service.export", "torch"), "keras": ("keras", "keras_service.export", "keras")}


@dataclass(frozen=True)
class Kept:
    """One worker's weights kept after a round, and the model they belong to."""

    run_dir: Path
    worker: str
    round: int
    model: models.ResolvedModel
    weights: codec.WeightSet
    sha256: str
    class_names: tuple[str, ...]

    def metadata(self) -> dict[str, str]:
        """What the exported file says about where it came from."""
        return {"weightrelay.run": str(self.run_dir.resolve()), "weightrelay.worker": self.worker, "weightrelay.round": str(self.round),
                "weightrelay.weights_sha256": self.sha256, "weightrelay.model": json.dumps(models.spec_to_dict(self.model.spec)),
                "weightrelay.input_shape": json.dumps(list(self.model.input_shape)), "weightrelay.class_names": json.dumps(list(self.class_names))}


def _spec_of(results: dict[str, Any], worker: str) -> models.ModelSpec:
    """The spec the worker built (its Describe); results without one name it in their settings."""
    described = results["workers"][worker].get("model")
    if described:
        return models.from_proto(json_format.ParseDict(described, pb.ModelSpec(), ignore_unknown_fields=True))
    return models.load_model(results["config"]["model"])


def load_kept(run_dir: Path, worker: str | None, round_index: int | None) -> Kept:
    """The weights `worker` (default: the ring's first) kept after round `round_index` (default: the last kept);
    UsageError naming what is there where the run has no such weights."""
    if not (run_dir / RESULTS_FILE).is_file():
        raise UsageError(f"{run_dir} holds no {RESULTS_FILE}; pass a run directory made by 'coordinator run'")
    results = load_results(run_dir)
    saved = results.get("checkpoint")
    if not saved:
        what = "a twin run" if results.get("kind") == "twin" else "the run finished no round, or was made by an older coordinator"
        raise UsageError(f"{run_dir} keeps no weights to export ({what}); export from a relay run with a completed round")
    names = list(saved["files"])
    worker = worker or (results.get("order") or names)[0]
    if worker not in saved["files"]:
        raise UsageError(f"--worker {worker}: {run_dir} kept the weights of {', '.join(names)}; name one of them")
    if round_index is not None and round_index != saved["round"]:
        raise UsageError(f"--round {round_index}: {run_dir} keeps the weights of round {saved['round']} only "
                         f"(each completed round's weights replace the previous round's); use --round {saved['round']}")
    try:
        weights = checkpoint.load(run_dir, saved["files"][worker], saved["sha256"][worker])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    dataset = results["workers"][worker].get("dataset", {})
    class_names = tuple(dataset.get("class_names") or ())
    try:
        model = models.resolve(_spec_of(results, worker), tuple(dataset["input_shape"]), len(class_names))
    except (KeyError, models.SpecError) as exc:
        raise UsageError(f"{run_dir}: cannot rebuild the {worker} worker's model from {RESULTS_FILE}: {exc}") from None
    for name, spec in model.manifest.items():
        if name not in weights or tuple(weights[name].shape) != spec.shape:
            got = list(weights[name].shape) if name in weights else "nothing"
            raise UsageError(f"{run_dir}: tensor {name}: the model expects {list(spec.shape)}, the kept weights hold {got}")
    return Kept(run_dir, worker, saved["round"], model, weights, saved["sha256"][worker], class_names)


# -- one writer per format ----------------------------------------------------------------------
def write_onnx(kept: Kept, out: Path) -> None:
    try:
        from coordinator import onnx_graph
    except ModuleNotFoundError as exc:
        raise UsageError(f"--format onnx needs the package {exc.name}: pip install 'weightrelay[onnx]'") from None
    try:
        proto = onnx_graph.build(kept.model, kept.weights, kept.metadata())
    except onnx_graph.UnsupportedKind as exc:
        raise UsageError(f"{kept.run_dir}: {exc}") from None
    write_atomic(out, proto.SerializeToString())


def write_safetensors(kept: Kept, out: Path) -> None:
    from safetensors.numpy import save

    tensors = {name: np.ascontiguousarray(kept.weights[name]) for name in kept.model.manifest}
    write_atomic(out, save(tensors, metadata=kept.metadata()))


def _framework_writer(fmt: str) -> Callable[[Kept, Path], None]:
    package, module, extra = FRAMEWORK_EXPORTERS[fmt]

    def write(kept: Kept, out: Path) -> None:
        if importlib.util.find_spec(package) is None:
            raise UsageError(f"--format {fmt} is written by the {package} worker's package, and {package} is not installed here: "
                             f"pip install 'weightrelay[{extra}]' (or export --format onnx or safetensors)")
        with tempfile.TemporaryDirectory(prefix="weightrelay-export-") as scratch:
            request = handoff.write(Path(scratch) / "request", kept.model, kept.weights)
            done = subprocess.run([sys.executable, "-m", module, str(request), str(out)], capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise CoordinatorError(f"{module} could not write {out} (exit {done.returncode}): {tail}")

    return write


WRITERS: dict[str, Callable[[Kept, Path], None]] = {
    "onnx": write_onnx,
    "safetensors": write_safetensors,
    "torch": _framework_writer("torch"),
    "keras": _framework_writer("keras"),
}


def export(run_dir: Path, fmt: str, worker: str | None = None, round_index: int | None = None, out: Path | None = None) -> tuple[Kept, Path]:
    """Write the kept weights as `fmt` to `out` (default RUN_DIR/export/WORKER-round-NNN.SUFFIX); return them and the path."""
    kept = load_kept(run_dir, worker, round_index)
    suffix = SUFFIXES[fmt]
    out = out or run_dir / EXPORT_DIR / f"{kept.worker}-round-{kept.round:03d}{suffix}"
    if not out.name.endswith(suffix):
        raise UsageError(f"--out {out}: a {fmt} file's name ends in {suffix} (Keras requires .weights.h5); e.g. --out {out.with_suffix('')}{suffix}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {out}: cannot create {out.parent}: {exc.strerror}") from None
    WRITERS[fmt](kept, out)
    return kept, out


def add_parser(commands: Any) -> None:
    """The `export` subcommand."""
    parser = commands.add_parser(
        "export", help="write a worker's kept weights as ONNX, safetensors, a PyTorch state_dict or Keras weights",
        description="Export the weights a relay run kept (its last completed round) as a file other tools load: "
                    "onnx (graph and weights; input [batch, C, H, W], outputs logits and probabilities), safetensors "
                    "(canonical layout), torch (state_dict of torch_service.adapter.SpecModel) or keras "
                    "(.weights.h5 of keras_service.adapter.build_model).",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--worker", metavar="NAME", help="whose weights (default: the first worker of the ring)")
    parser.add_argument("--round", type=int, metavar="N", help="the round after which they were kept (default: the last kept, the only one)")
    parser.add_argument("--format", dest="fmt", choices=list(WRITERS), default="onnx", help="(default onnx)")
    parser.add_argument("--out", type=Path, metavar="FILE", help="where to write (default RUN_DIR/export/WORKER-round-NNN.SUFFIX)")


def command(args: argparse.Namespace) -> int:
    kept, out = export(args.run_dir, args.fmt, args.worker, args.round, args.out)
    print(f"exported the {kept.worker} worker's weights after round {kept.round} (sha256 {kept.sha256[:12]}...) "
          f"as {args.fmt}: {out}")
    return 0
