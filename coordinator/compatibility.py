"""Whether a run's workers can share weights: the same parameters, the same data, and each the
framework its name says (a worker named after a framework, e.g. torch or torch-b, must run it)."""

from __future__ import annotations

from itertools import combinations
from typing import Mapping

from coordinator.config import ALIASES
from coordinator.local import named_framework
from weightrelay.v1 import worker_pb2 as pb


def _exchange(a: str, b: str) -> str:
    flags = {alias.worker: alias.flag for alias in ALIASES.values() if alias.setting == "worker"}
    if a in flags and b in flags:
        return f"exchange {flags[a]} and {flags[b]}"
    return f"exchange the addresses of {a} and {b}"


def framework_problems(described: Mapping[str, pb.DescribeReply], addresses: Mapping[str, str]) -> list[str]:
    """Workers that run another framework than their name says; two that run each other's, as swapped addresses."""
    expected = {name: named_framework(name) for name in described}
    wrong = [name for name, framework in expected.items() if framework and described[name].framework != framework]
    problems = []
    for a, b in combinations(list(wrong), 2):
        if a in wrong and b in wrong and (described[a].framework, described[b].framework) == (expected[b], expected[a]):
            problems.append(f"the addresses are swapped: {addresses[a]} is the {expected[b]} worker and {addresses[b]} "
                            f"the {expected[a]} worker; {_exchange(a, b)}")
            wrong = [name for name in wrong if name not in (a, b)]
    problems += [f"worker {name} at {addresses[name]} is a {described[name].framework} worker; check its address" for name in wrong]
    return problems


def sharing_problems(described: Mapping[str, pb.DescribeReply]) -> list[str]:
    """Tensors or data that differ from the first worker's."""
    problems = []
    first, first_d = next(iter(described.items()))
    first_specs = {p.name: p for p in first_d.parameters}
    for name, d in list(described.items())[1:]:
        specs = {p.name: p for p in d.parameters}
        for tensor in sorted(set(first_specs) | set(specs)):
            a, b = first_specs.get(tensor), specs.get(tensor)
            if a is None or b is None:
                problems.append(f"tensor {tensor} exists only on the {name if a is None else first} worker")
            elif list(a.shape) != list(b.shape) or a.dtype != b.dtype:
                problems.append(
                    f"workers disagree on tensor {tensor}: {first} has {list(a.shape)} {pb.DType.Name(a.dtype)}, "
                    f"{name} has {list(b.shape)} {pb.DType.Name(b.dtype)}"
                )
        if d.dataset.fingerprint != first_d.dataset.fingerprint:
            problems.append(
                f"workers hold different data: {first} {first_d.dataset.data_dir} (fingerprint {first_d.dataset.fingerprint[:12]}), "
                f"{name} {d.dataset.data_dir} (fingerprint {d.dataset.fingerprint[:12]}); give all the same {first_d.dataset.name} files"
            )
    return problems


def problems(described: Mapping[str, pb.DescribeReply], addresses: Mapping[str, str]) -> list[str]:
    """Everything that keeps these workers (their Describe replies, by name) from sharing weights."""
    return framework_problems(described, addresses) + sharing_problems(described)
