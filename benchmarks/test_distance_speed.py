"""Speed of the fused distance op against the baselines of the issue, in the same run.

One benchmark group per (workload, device). Every group holds our op and the
baselines, so `ratios.py` can divide times measured minutes apart on one machine:

  loop_item   the authors' script: per tensor, (a - b).abs().mean() for D(θr, θB)
              and D(θA, θB), each read with .item()
  loop_stack  the same loop, the per-tensor results stacked and read once
  foreach     torch._foreach_sub then torch._foreach_norm, for both anchors
  roofline    x.sum() over one tensor holding as many bytes as the three sets

Each measured function returns its result on the host (or syncs the GPU), so the
time covers the whole computation.
"""

from __future__ import annotations

import pytest
import torch

import transfer_fast
from transfer_fast import multi_tensor_distance, transferability

from .conftest import Workload, make_workload, measure, selected

BASELINES = ("loop_item", "loop_stack", "foreach", "roofline")


def loop_item(w: Workload) -> list[float]:
    out = []
    for r, a, b in zip(w.random, w.pretrained, w.finetuned):
        out.append((r - b).abs().mean().item())
        out.append((a - b).abs().mean().item())
    return out


def loop_stack(w: Workload) -> torch.Tensor:
    d_random, d_pretrained = [], []
    for r, a, b in zip(w.random, w.pretrained, w.finetuned):
        d_random.append((r - b).abs().mean())
        d_pretrained.append((a - b).abs().mean())
    return torch.stack([torch.stack(d_random), torch.stack(d_pretrained)]).cpu()


def foreach(w: Workload) -> torch.Tensor:
    norms = [torch._foreach_norm(torch._foreach_sub(anchor, w.finetuned))
             for anchor in (w.random, w.pretrained)]
    return torch.stack([torch.stack(n) for n in norms]).cpu()


def roofline(w: Workload) -> float:
    return w.roofline.sum().item()


def fused(backend: str):
    def run(w: Workload) -> torch.Tensor:
        out = multi_tensor_distance([w.random, w.pretrained], [w.finetuned], backend=backend)
        return out.cpu()
    return run


def entries(workload: str) -> list[str]:
    ours = ["op"] + (["op_torch"] if workload == "small2000" else [])
    return ours + list(BASELINES)


CASES = [(w, e) for w in ("resnet50", "vitb16", "small2000") for e in entries(w)]


def require_backend(backend: str) -> None:
    status = transfer_fast.backend_status()[backend]
    if status != "available":
        pytest.skip(f"backend {backend!r} {status}")


def run(benchmark, fn, w: Workload, group: str, entry: str) -> None:
    measure(benchmark, lambda: fn(w), group=group, entry=entry, device=w.device,
            nbytes=w.nbytes, baseline=entry in BASELINES)


@pytest.mark.parametrize(("workload", "entry"), CASES, ids=[f"{w}-{e}" for w, e in CASES])
def test_distance(benchmark, workloads, device, workload, entry):
    w = workloads(workload, device)
    if entry == "op":
        require_backend(device)
        fn = fused(device)
    elif entry == "op_torch":
        fn = fused("torch")
    else:
        fn = globals()[entry]
    run(benchmark, fn, w, f"{workload} [{device}]", entry)


E2E_ENTRIES = ["transferability", "loop_item", "loop_stack", "roofline"]


@pytest.fixture(scope="session")
def paper_workload(resnet50_triple):
    """The ResNet-50 tensors preset 'paper' compares (names with 'conv', and fc.weight)."""
    cache = {}

    def get(device: str):
        if device not in cache:
            states = tuple({k: v.to(device) for k, v in s.items()} for s in resnet50_triple)
            cache[device] = states, make_workload("resnet50-paper", selected(states, "paper"),
                                                  device)
        return cache[device]

    return get


@pytest.mark.parametrize("entry", E2E_ENTRIES)
def test_transferability_resnet50(benchmark, paper_workload, device, entry):
    """End to end: plan, fused pass, checks and grouping, against the authors' loop
    over the same tensors."""
    states, w = paper_workload(device)
    if entry == "transferability":
        require_backend(device)

        def fn(_):
            return transferability(*states, preset="paper", backend=device).overall
    else:
        fn = globals()[entry]
    run(benchmark, fn, w, f"resnet50 transferability preset=paper [{device}]", entry)
