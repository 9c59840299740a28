"""Workloads for the speed benchmarks, built once per session.

Run with:  .venv/bin/python -m pytest benchmarks --benchmark-json=/tmp/bench.json
(the default `pytest` run only collects tests/, see pyproject's testpaths).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass

import pytest
import torch

import transfer_fast
from transfer_fast.testing import resnet_shapes, triple, vit_shapes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass
class Workload:
    """The three sets the op reads (θr, θA as anchors, θB as target), on one device."""

    name: str
    device: str
    random: list[torch.Tensor]
    pretrained: list[torch.Tensor]
    finetuned: list[torch.Tensor]
    roofline: torch.Tensor  # one flat tensor holding as many bytes as the three sets

    @property
    def nbytes(self) -> int:
        sets = (self.random, self.pretrained, self.finetuned)
        return sum(t.numel() * t.element_size() for s in sets for t in s)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def selected(states, preset: str = "auto") -> list[list[torch.Tensor]]:
    """The tensors a plan compares; 'auto': learned float tensors, no BN statistics."""
    plan = transfer_fast.make_plan(list(states), preset)
    return [[s[n] for n in plan.names] for s in states]


def small_sets(count: int = 2000, max_numel: int = 5000, seed: int = 0):
    """`count` tensors of 1..max_numel elements, three sets of them (θB near θA)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_numel + 1, (count,), generator=g).tolist()
    r = [torch.randn(n, generator=g) * 0.05 for n in sizes]
    a = [x + torch.randn(x.shape, generator=g) * 0.05 for x in r]
    b = [x + torch.randn(x.shape, generator=g) * 0.01 for x in a]
    return [r, a, b]


# (θr, θA, θB) state dicts: ResNet-50 (25.6M parameters), ViT-B/16 (86M).
TRIPLES = {"resnet50": lambda: triple(resnet_shapes(50), seed=0),
           "vitb16": lambda: triple(vit_shapes(), seed=0)}


def make_workload(name: str, sets: list[list[torch.Tensor]], device: str) -> Workload:
    """The sets moved to `device`, with a roofline tensor of the same size."""
    sets = [[t.to(device) for t in s] for s in sets]
    numel = sum(t.numel() for s in sets for t in s)
    roofline = torch.ones(numel, dtype=sets[0][0].dtype, device=device)
    sync(device)
    return Workload(name, device, *sets, roofline=roofline)


def workload_sets(name: str, states=None) -> list[list[torch.Tensor]]:
    """'resnet50', 'vitb16' (the tensors of the default plan) or 'small2000'."""
    if name == "small2000":
        return small_sets()
    return selected(states if states is not None else TRIPLES[name]())


@pytest.fixture(scope="session")
def resnet50_triple():
    """(θr, θA, θB) with ResNet-50's names and shapes."""
    return TRIPLES["resnet50"]()


@pytest.fixture(scope="session")
def vitb16_triple():
    """(θr, θA, θB) with ViT-B/16's names and shapes."""
    return TRIPLES["vitb16"]()


@pytest.fixture(params=DEVICES, scope="session")
def device(request):
    return request.param


@pytest.fixture(scope="session")
def workloads(request):
    """get(name, device) -> Workload, each built (and moved to its device) once."""
    cache: dict[tuple[str, str], Workload] = {}

    def get(name: str, device: str) -> Workload:
        if (name, device) not in cache:
            states = None if name == "small2000" else request.getfixturevalue(f"{name}_triple")
            cache[name, device] = make_workload(name, workload_sets(name, states), device)
        return cache[name, device]

    return get


def measure(benchmark, fn, *, group: str, entry: str, device: str, nbytes: int,
            baseline: bool) -> None:
    """Times fn() in `group`; extra_info says what ratios.py needs. `preempted_per_s`,
    the involuntary context switches of this process per second while it ran, tells
    a run disturbed by other processes on a shared machine (tens when quiet)."""
    benchmark.group = group
    benchmark.extra_info.update(entry=entry, device=device, bytes=nbytes,
                                threads=torch.get_num_threads(), baseline=baseline,
                                torch=torch.__version__)

    def measured():
        result = fn()
        sync(device)
        return result

    switches, start = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw, time.perf_counter()
    benchmark(measured)
    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - switches
    benchmark.extra_info["preempted_per_s"] = round(switches / (time.perf_counter() - start))
