"""The benchmarks' one harness: the list of baselines, how an entry is timed and
described, and the distance workloads, built once per session.

Run with:  .venv/bin/python -m pytest benchmarks --benchmark-json=/tmp/bench.json
then       .venv/bin/python benchmarks/ratios.py /tmp/bench.json
(the default `pytest` run only collects tests/, see pyproject's testpaths).
"""

from __future__ import annotations

import contextlib
import resource
import time
from dataclasses import dataclass, field

import pytest
import torch

import transfer_fast
from transfer_fast.ops import PackedLayout
from transfer_fast.testing import resnet_shapes, triple, vit_shapes

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Every baseline of every suite and what it is: ratios.py divides the other entries of
# a group by these. BOUNDS read the data and do nothing else (an entry can at best
# match them): their ratios are shown as fractions, "of roofline".
BASELINES = {
    # distances (test_distance_speed.py, paired.py)
    "loop_item": "the authors' script: per tensor (a - b).abs().mean().item(), both anchors",
    "loop_stack": "the same loop, the per-tensor results stacked and read once",
    "naive_loop": "[(a - b).abs().mean() for a, b in zip(...)] for both anchors, float32",
    "foreach": "torch._foreach_norm(torch._foreach_sub(anchor, θB)) for both anchors",
    "roofline": "x.sum().item() over one flat tensor holding as many bytes as the sets",
    # the many-model scan (test_scan_speed.py)
    "script_loop": "the authors' script once per checkpoint: load, loop, ratios",
    "measure_loop": "transferability(r, a, b, preset='paper') once per checkpoint",
    "measure_loop_auto": "the same with preset='auto'",
    "read_only": "every byte the scan reads, copied into memory by the format's loader",
    "read_touch": "the same files mapped, every floating tensor summed once",
    "read_raw": "the files' bytes through one reused buffer (readinto)",
    # statistics (test_stats_speed.py)
    "var_mean": "torch.var_mean over every dim but the channels: one call, no classes",
    "masked_loop": "per class x[labels == k] then var_mean",
    "bare_forward": "the model's forward pass without hooks",
    # training (test_finetune_speed.py)
    "bare_loop": "the same training loop written by hand",
    "epoch": "one training epoch of the demo model",
    # Fréchet distance (test_frechet_speed.py)
    "scipy_sqrtm": "pytorch-fid's scipy.linalg.sqrtm(S_a @ S_b)",
    "eigvals": "torchmetrics' torch.linalg.eigvals(S_a @ S_b)",
}
BOUNDS = frozenset({"roofline", "read_only", "read_touch", "read_raw"})


@dataclass
class Workload:
    """The three sets the op reads (θr, θA as anchors, θB as target), on one device."""

    name: str
    device: str
    random: list[torch.Tensor]
    pretrained: list[torch.Tensor]
    finetuned: list[torch.Tensor]
    roofline: torch.Tensor  # one flat tensor holding as many bytes as the three sets
    _packed: tuple | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        sets = (self.random, self.pretrained, self.finetuned)
        return sum(t.numel() * t.element_size() for s in sets for t in s)

    def packed(self) -> tuple[PackedLayout, torch.Tensor, torch.Tensor]:
        """(layout, anchors (2, L) = θr, θA, targets (1, L) = θB), packed once."""
        if self._packed is None:
            layout = PackedLayout.from_tensors(self.random)
            anchors = layout.new_buffer(2, device=self.device)
            targets = layout.new_buffer(1, device=self.device)
            for row, tensors in zip([*anchors, *targets],
                                    (self.random, self.pretrained, self.finetuned)):
                layout.pack(tensors, out=row)
            sync(self.device)
            self._packed = layout, anchors, targets
        return self._packed


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


def describe(benchmark, *, group: str, entry: str, device: str, nbytes: int, **extra) -> None:
    """Puts the entry in `group` with what ratios.py needs in extra_info: whether it is a
    baseline (a key of BASELINES) or a bound, the bytes it reads, threads, versions."""
    benchmark.group = group
    benchmark.extra_info.update(entry=entry, device=device, bytes=nbytes,
                                threads=torch.get_num_threads(), baseline=entry in BASELINES,
                                bound=entry in BOUNDS, torch=torch.__version__, **extra)


@contextlib.contextmanager
def preemption_counted(benchmark):
    """Records `preempted_per_s`: the involuntary context switches of this process per
    second while the block ran. Tens when the machine is quiet; hundreds tell a run
    disturbed by other processes on a shared machine."""
    switches, start = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw, time.perf_counter()
    yield
    switches = resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw - switches
    benchmark.extra_info["preempted_per_s"] = round(switches / (time.perf_counter() - start))


def measure(benchmark, fn, *, group: str, entry: str, device: str, nbytes: int,
            rounds: int | None = None, **extra) -> None:
    """Times fn() (synchronised on a GPU) as `entry` of `group`; `rounds`: that many
    rounds of one call (pedantic, after one warm-up) instead of pytest-benchmark's own
    calibration, for entries that take seconds."""
    describe(benchmark, group=group, entry=entry, device=device, nbytes=nbytes, **extra)

    def measured():
        result = fn()
        sync(device)
        return result

    with preemption_counted(benchmark):
        if rounds is None:
            benchmark(measured)
        else:
            benchmark.pedantic(measured, rounds=rounds, iterations=1, warmup_rounds=1)
