"""Settings that no worker would take, refused before anything starts.

Each value was checked on its own as the flags and files were read (`coordinator.validators`);
here the settings are checked together and against the data set, as far as it can be known
without loading it: a run that could only fail at Initialize or in round 0 (and then advise a
`--resume` that fails again) ends at once with a usage error naming the flag or the key.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

from coordinator.config import ROUND_SEED_STRIDE, Settings
from coordinator.errors import CoordinatorError, UsageError
from coordinator.local import framework_of
from weightrelay import data, defaults, models
from weightrelay.objectives import parse_objective


@dataclass(frozen=True)
class DatasetFacts:
    """What is known of a run's data set without loading it; None where only loading would tell."""

    name: str
    num_classes: int | None = None
    input_shape: tuple[int, ...] | None = None  # one sample's (C, H, W)
    train_samples: int | None = None


def _idx_dims(path: Path) -> tuple[int, ...] | None:
    """The dimensions in an IDX file's header (gzipped or raw), None when it has no readable header."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as stream:
            head = stream.read(4)
            if len(head) < 4 or head[0] or head[1]:
                return None
            raw = stream.read(4 * head[3])
    except (OSError, EOFError):
        return None
    if len(raw) < 4 * head[3]:
        return None
    return tuple(int.from_bytes(raw[i:i + 4], "big") for i in range(0, len(raw), 4))


def _idx_facts(directory: Path) -> tuple[tuple[int, ...] | None, int | None]:
    """(input shape, training samples) from the header of the training images, where the directory has them."""
    stem = data.FILES["train_images"]
    found = next((p for p in (directory / f"{stem}.gz", directory / stem) if p.is_file()), None)
    dims = _idx_dims(found) if found else None
    if not dims or len(dims) not in (3, 4):
        return None, None
    return ((1, *dims[1:]) if len(dims) == 3 else dims[1:]), dims[0]


def dataset_facts(settings: Settings) -> DatasetFacts:
    """The data set's class count (a known data set's), and, where its files are on this machine
    (--local), one sample's shape and the training samples, from the files' headers. Raises
    UsageError when --local workers could not find any such data set."""
    config = settings.config
    key = config.dataset.strip().lower()
    directory = None
    if config.local:
        try:
            spec, directory = data.resolve_dataset(config.dataset, config.data_dir)
        except data.UnknownDataset as exc:
            raise UsageError(f"{settings.where('dataset')}: {exc}") from None
    elif key in data.DATASETS:
        spec = data.DATASETS[key]
    else:
        return DatasetFacts(config.dataset)  # a directory on the workers
    shape = samples = None
    if spec.format == "cifar10-bin":  # every record of the binary format holds one image of the same shape
        images, _ = data.parse_cifar10_batch(bytes(data.CIFAR10_RECORD), "one record")
        shape = tuple(images.shape[1:])
    elif directory is not None:
        shape, samples = _idx_facts(directory)
    return DatasetFacts(spec.name, len(spec.class_names) or None, shape, samples)


def _objectives(settings: Settings, kind: str, facts: DatasetFacts) -> None:
    config = settings.config
    names = config.names()
    if kind == "twin":
        given = {"": (config.twin_objective, settings.where("twin_objective"))}
    else:
        stray = [name for name in config.objectives() if name not in names]
        if stray:
            where = ", ".join(sorted({settings.where("objective", name) for name in stray}))
            raise UsageError(f"{where} names {', '.join(stray)}, which is no worker of this run ({', '.join(names)})")
        given = {name: (config.objective_for(name), settings.where("objective", name) if name in config.objectives()
                        else f"worker {name}'s default objective (--objective {name}=OBJECTIVE gives another)")
                 for name in names}
    if facts.num_classes is None:
        return  # the workers check the labels against their data set at Initialize
    for name, (objective, where) in given.items():
        try:
            parse_objective(objective, facts.num_classes)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc} ({facts.name} has {facts.num_classes} classes)") from None


def _model(settings: Settings, facts: DatasetFacts) -> None:
    if facts.input_shape is None or facts.num_classes is None:
        return  # the workers resolve the model against their data set at Initialize
    try:
        models.resolve(models.load_model(settings.config.model), facts.input_shape, facts.num_classes)
    except models.SpecError as exc:
        shape = "x".join(map(str, facts.input_shape))
        raise UsageError(f"{settings.where('model')} {settings.config.model}: {exc} (on {facts.name}: {shape} inputs, "
                         f"{facts.num_classes} classes)") from None


def _seed(settings: Settings, kind: str) -> None:
    config = settings.config
    rounds = config.rounds if kind == "relay" else 1
    if defaults.seed_problem(config.train_seed(rounds - 1)):
        largest = (defaults.MAX_SEED - (rounds - 1)) // ROUND_SEED_STRIDE
        raise UsageError(f"{settings.where('seed')} {config.seed}: each round's Train seed (seed x {ROUND_SEED_STRIDE} + round) "
                         f"must be a uint64 too; with {rounds} round(s) use a seed of at most {largest}")


def check_settings(settings: Settings, kind: str) -> DatasetFacts:
    """Refuse (UsageError) settings of a `kind` ("relay" or "twin") run that no worker would take."""
    config = settings.config
    names = config.names()
    if kind == "twin" and len(names) < 2:
        raise UsageError("twin training needs at least two workers (e.g. --local --workers torch,torch-b)")
    if kind == "relay":
        config.ring(names, settings.where("order"))
    if config.local:
        for name in names:
            try:
                framework_of(name)
            except CoordinatorError as exc:
                raise UsageError(f"{settings.where('workers')} {config.workers}: {exc}") from None
    _seed(settings, kind)
    facts = dataset_facts(settings)
    _objectives(settings, kind, facts)
    _model(settings, facts)
    if facts.train_samples is not None and config.batch_size > facts.train_samples:
        raise UsageError(f"{settings.where('batch_size')} {config.batch_size} is larger than the {facts.train_samples} "
                         f"training samples of {facts.name}")
    return facts
