"""Speed of the distance ops against the baselines of the issue, in the same run.

One benchmark group per (workload, device). Every group holds our entries and the
baselines (described in conftest.BASELINES), so `ratios.py` divides times measured
minutes apart on one machine:

  op          multi_tensor_distance([θr, θA], [θB], backend=<device>): the list op
  packed      packed_distance on buffers packed once (PackedLayout): the plan-once route
  op_torch    the same with backend="torch": the pure-torch fallback (ops/fallback.py),
              what runs without the compiled library (ResNet-50 and the small tensors)
  op_torch_l1 the fallback asked for sum |a - b| alone (sums=("abs_diff",)): what
              transferability() with the authors' metric (l1_mean) asks of it, and
              what naive_loop computes
  op_torch_l2 the same for sum (a - b)^2 alone: the l2 and rms metrics
  loop_item, loop_stack, naive_loop, foreach, roofline: the baselines

Goals on the CPU: op and packed at least 85% of the roofline on ResNet-50 and 60% on
the 2000 small tensors; the fallback at least as fast as naive_loop: op_torch_l1
computes what naive_loop computes, op_torch all five sums. Each measured function
returns its result on the host (or syncs the GPU), so the time covers the whole
computation. `python -m benchmarks.paired` times the same functions back to back,
round by round.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import transfer_fast
from transfer_fast import multi_tensor_distance, transferability
from transfer_fast.ops import packed_distance

from .conftest import Workload, make_workload, measure, selected

BASELINE_ENTRIES = ("loop_item", "loop_stack", "naive_loop", "foreach", "roofline")


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


def naive_loop(w: Workload) -> list[torch.Tensor]:
    return [(a - b).abs().mean() for anchor in (w.random, w.pretrained)
            for a, b in zip(anchor, w.finetuned)]


def foreach(w: Workload) -> torch.Tensor:
    norms = [torch._foreach_norm(torch._foreach_sub(anchor, w.finetuned))
             for anchor in (w.random, w.pretrained)]
    return torch.stack([torch.stack(n) for n in norms]).cpu()


def roofline(w: Workload) -> float:
    return w.roofline.sum().item()


def ours(entry: str, device: str) -> Callable[[Workload], torch.Tensor]:
    """Our entry `entry` ('op', 'packed', 'op_torch', 'op_torch_l1', 'op_torch_l2')."""
    backend = "torch" if entry.startswith("op_torch") else device
    sums = {"op_torch_l1": ("abs_diff",), "op_torch_l2": ("sq_diff",)}.get(entry)
    if entry == "packed":
        def run(w: Workload) -> torch.Tensor:
            layout, anchors, targets = w.packed()
            return packed_distance(anchors, targets, layout, backend=backend).cpu()
    else:
        def run(w: Workload) -> torch.Tensor:
            return multi_tensor_distance([w.random, w.pretrained], [w.finetuned],
                                         backend=backend, sums=sums).cpu()
    return run


def function(entry: str, device: str) -> Callable[[Workload], object]:
    return globals()[entry] if entry in BASELINE_ENTRIES else ours(entry, device)


def entries(workload: str) -> list[str]:
    fallback = ["op_torch", "op_torch_l1", "op_torch_l2"]
    mine = ["op", "packed"] + (fallback if workload != "vitb16" else [])
    return mine + list(BASELINE_ENTRIES)


CASES = [(w, e) for w in ("resnet50", "vitb16", "small2000") for e in entries(w)]


def require_backend(backend: str) -> None:
    status = transfer_fast.backend_status()[backend]
    if status != "available":
        pytest.skip(f"backend {backend!r} {status}")


def run(benchmark, fn, w: Workload, group: str, entry: str) -> None:
    measure(benchmark, lambda: fn(w), group=group, entry=entry, device=w.device,
            nbytes=w.nbytes)


@pytest.mark.parametrize(("workload", "entry"), CASES, ids=[f"{w}-{e}" for w, e in CASES])
def test_distance(benchmark, workloads, device, workload, entry):
    w = workloads(workload, device)
    if entry in ("op", "packed"):
        require_backend(device)
    if entry == "packed":
        w.packed()  # packing is planned once, outside the timing
    run(benchmark, function(entry, device), w, f"{workload} [{device}]", entry)


# transferability_torch: the same call without the compiled library (backend="torch");
# op: the fused op alone on the same tensors (the goal: end to end <= 1.3x the op).
E2E_ENTRIES = ["transferability", "transferability_torch", "op", "loop_item", "loop_stack",
               "roofline"]


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
    elif entry == "transferability_torch":
        def fn(_):
            return transferability(*states, preset="paper", backend="torch").overall
    elif entry == "op":
        require_backend(device)
        fn = ours("op", device)
    else:
        fn = globals()[entry]
    run(benchmark, fn, w, f"resnet50 transferability preset=paper [{device}]", entry)
