"""Workloads for the speed benchmarks, built once per session.

Run with:  .venv/bin/python -m pytest benchmarks --benchmark-json=/tmp/bench.json
(the default `pytest` run only collects tests/, see pyproject's testpaths).
"""

from __future__ import annotations

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


def _selected(states: tuple[dict, dict, dict]) -> list[list[torch.Tensor]]:
    """The tensors the default plan compares: learned float tensors, no BN statistics."""
    plan = transfer_fast.make_plan(list(states), "auto")
    return [[s[n] for n in plan.names] for s in states]


def _small_sets(count: int = 2000, max_numel: int = 5000, seed: int = 0):
    """`count` tensors of 1..max_numel elements, three sets of them (θB near θA)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_numel + 1, (count,), generator=g).tolist()
    r = [torch.randn(n, generator=g) * 0.05 for n in sizes]
    a = [x + torch.randn(x.shape, generator=g) * 0.05 for x in r]
    b = [x + torch.randn(x.shape, generator=g) * 0.01 for x in a]
    return [r, a, b]


@pytest.fixture(scope="session")
def resnet50_triple():
    """(θr, θA, θB) state dicts with ResNet-50's names and shapes (25.6M parameters)."""
    return triple(resnet_shapes(50), seed=0)


@pytest.fixture(scope="session")
def vitb16_triple():
    """(θr, θA, θB) state dicts with ViT-B/16's names and shapes (86M parameters)."""
    return triple(vit_shapes(), seed=0)


@pytest.fixture(scope="session")
def small_sets():
    """2000 small tensors (1..5000 elements) x 3 sets."""
    return _small_sets()


@pytest.fixture(params=DEVICES, scope="session")
def device(request):
    return request.param


@pytest.fixture(scope="session")
def workloads(request):
    """get(name, device) -> Workload, each built (and moved to its device) once."""
    cache: dict[tuple[str, str], Workload] = {}
    sources = {"resnet50": "resnet50_triple", "vitb16": "vitb16_triple", "small2000": "small_sets"}

    def get(name: str, device: str) -> Workload:
        if (name, device) not in cache:
            data = request.getfixturevalue(sources[name])
            sets = data if name == "small2000" else _selected(data)
            sets = [[t.to(device) for t in s] for s in sets]
            numel = sum(t.numel() for s in sets for t in s)
            roofline = torch.ones(numel, dtype=sets[0][0].dtype, device=device)
            cache[name, device] = Workload(name, device, *sets, roofline=roofline)
            sync(device)
        return cache[name, device]

    return get
