"""Overhead of `finetune` over a bare PyTorch loop, and the cost of the trajectory.

Workload: the demo's TinyResNet fine-tuned on scikit-learn's digits 5-9 (717 training,
179 validation images of 8x8) for 10 epochs, batch 64, lr 0.01, from a θA made once
per session (one pre-training epoch on digits 0-4; the speed does not depend on its
values). Group "train-loop":

  bare_loop        the protocol in plain PyTorch, nothing else: θA loaded, a new head,
                   SGD + per-epoch cosine, shuffled index batches, validation accuracy
                   after every epoch, the best state cloned, θB saved (safetensors)
  finetune         transfer_fast.finetune(trajectory=False, resume=False): the same
                   protocol plus config.json, the sidecar, the label check, the loss
                   tracked per epoch for the NaN check and the bar, a fresh folder per call
  finetune_resume  the same with the resume state written (atomically) after every epoch
  finetune_full    the defaults: resume state, trajectory every epoch, trajectory.json/.png

Group "trajectory" (TinyResNet, digits 5-9):

  epoch            one training epoch and its validation, as bare_loop runs them
  trajectory       one Trajectory.record: T per group of the live model against θr and θA

`test_loops_agree` checks that bare_loop and finetune end with bit-identical θB, so the
two time the same work. Everything runs on one thread (THREADS, see there). Ratios:
`python benchmarks/ratios.py <bench.json>` (bare_loop / finetune: the speed relative to
the bare loop; epoch / trajectory: how many trajectory records cost one epoch).
pytest-benchmark times each entry's rounds back to back, so a drift of a shared machine's
speed moves those ratios by more than the 3% under test; the cross-check below runs the
entries in alternating order every round and prints quartiles of the per-round ratios:

    .venv/bin/python -m benchmarks.test_finetune_speed [--rounds 10]
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from transfer_fast.pipelines.experiment_data import digits_split
from transfer_fast.train.finetune import finetune, pretrain
from transfer_fast.train.models import TinyResNet
from transfer_fast.train.trajectory import Trajectory

from .conftest import measure

EPOCHS, BATCH, LR, SEED = 10, 64, 0.01, 0
# One intra-op thread: on the shared 2-core machines, two threads that meet another busy
# process spin-wait and make an epoch 10-20x slower at random, drowning a 3% difference.
THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@dataclass
class Workload:
    random: Path
    pretrained: Path
    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    runs: Path  # a fresh folder per timed call below it

    @property
    def nbytes(self) -> int:
        """Bytes of training images one call reads (for the GB/s column only)."""
        return self.train[0].numel() * self.train[0].element_size() * EPOCHS


def make_workload(folder: Path) -> Workload:
    pre = pretrain(lambda: TinyResNet(num_classes=5), *digits_split(range(0, 5), SEED),
                   out=folder / "pre", epochs=1, batch_size=BATCH, progress=False)
    train, val = digits_split(range(5, 10), SEED)
    return Workload(pre.random, pre.checkpoint, train, val, folder / "runs")


@pytest.fixture(scope="session")
def workload(tmp_path_factory) -> Workload:
    return make_workload(tmp_path_factory.mktemp("finetune-bench"))


def model_with_new_head(w: Workload) -> nn.Module:
    """TinyResNet, θA loaded, fc replaced (the global RNG as finetune leaves it)."""
    torch.manual_seed(SEED)
    model = TinyResNet(num_classes=5)
    model.fc = nn.Linear(model.fc.in_features, 5)
    body = {k: v for k, v in load_file(w.pretrained).items() if not k.startswith("fc.")}
    model.load_state_dict(body, strict=False)
    return model


def train_epoch(model, opt, sched, x, y, generator) -> None:
    model.train()
    for idx in torch.randperm(len(x), generator=generator).split(BATCH):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sched.step()


@torch.no_grad()
def val_accuracy(model, x, y) -> float:
    model.eval()
    correct = sum((model(a).argmax(1) == b).sum() for a, b in zip(x.split(BATCH), y.split(BATCH)))
    return correct.item() / len(y)


def optimizer(model):
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 0.5 * (1.0 + math.cos(math.pi * e / EPOCHS)))
    return opt, sched


def bare_loop(w: Workload, out: Path) -> Path:
    model = model_with_new_head(w)
    opt, sched = optimizer(model)
    generator = torch.Generator().manual_seed(SEED)
    best, best_acc = None, -1.0
    for _ in range(EPOCHS):
        train_epoch(model, opt, sched, *w.train, generator)
        acc = val_accuracy(model, *w.val)
        if acc > best_acc:
            best_acc, best = acc, {k: v.detach().clone() for k, v in model.state_dict().items()}
    out.mkdir(parents=True)
    save_file(best, str(out / "finetuned.safetensors"))
    return out / "finetuned.safetensors"


def ours(w: Workload, out: Path, **options) -> Path:
    res = finetune(lambda: TinyResNet(num_classes=5), w.pretrained, w.train, w.val,
                   num_classes=5, out=out, epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=SEED,
                   progress=False, **options)
    assert res.status == "done", res.reason
    return res.checkpoint


LOOP_ENTRIES = {
    "bare_loop": bare_loop,
    "finetune": lambda w, out: ours(w, out, trajectory=False, resume=False),
    "finetune_resume": lambda w, out: ours(w, out, trajectory=False),
    "finetune_full": ours,
}


def test_loops_agree(workload):
    runs = workload.runs / "agree"
    a = load_file(bare_loop(workload, runs / "bare"))
    b = load_file(LOOP_ENTRIES["finetune"](workload, runs / "ours"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("entry", list(LOOP_ENTRIES))
def test_train_loop(benchmark, workload, entry):
    fn, counter = LOOP_ENTRIES[entry], itertools.count()
    fn(workload, workload.runs / f"{entry}-warmup")

    def call():
        return fn(workload, workload.runs / f"{entry}-{next(counter)}")

    measure(benchmark, call, group=f"train-loop [TinyResNet digits, {EPOCHS} epochs]",
            entry=entry, device="cpu", nbytes=workload.nbytes)


@pytest.fixture(scope="session")
def live(workload):
    """A model part-way through fine-tuning, its optimizer and a Trajectory for it."""
    model = model_with_new_head(workload)
    opt, sched = optimizer(model)
    generator = torch.Generator().manual_seed(SEED)
    train_epoch(model, opt, sched, *workload.train, generator)
    trajectory = Trajectory(load_file(workload.random), load_file(workload.pretrained),
                            model.state_dict(), replaced=["fc.weight", "fc.bias"])
    return model, opt, sched, generator, trajectory


@pytest.mark.parametrize("entry", ["epoch", "trajectory"])
def test_trajectory(benchmark, workload, live, entry):
    model, opt, sched, generator, trajectory = live
    if entry == "epoch":
        def call():
            train_epoch(model, opt, sched, *workload.train, generator)
            return val_accuracy(model, *workload.val)
    else:
        def call():
            return trajectory.record(1, model.state_dict()).overall
    call()
    nbytes = sum(t.numel() * t.element_size() for t in model.parameters()) * 3
    measure(benchmark, call, group="trajectory [TinyResNet digits]", entry=entry,
            device="cpu", nbytes=nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description="paired cross-check of the train-loop ratios")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    w = make_workload(Path(tempfile.mkdtemp(prefix="tf-finetune-bench-")))
    entries, counter = list(LOOP_ENTRIES), itertools.count()
    for name in entries:  # warm up: imports, allocator, matplotlib
        LOOP_ENTRIES[name](w, w.runs / f"warmup-{name}")
    # Wall time, and the process's CPU time: the latter does not count the time other
    # processes held the core (nor our fsync waits, which only the wall time shows).
    wall: dict[str, list[float]] = {name: [] for name in entries}
    cpu: dict[str, list[float]] = {name: [] for name in entries}
    for r in range(args.rounds):
        for name in entries if r % 2 == 0 else entries[::-1]:  # cancels a linear drift
            start, start_cpu = time.perf_counter(), time.process_time()
            LOOP_ENTRIES[name](w, w.runs / f"{name}-{next(counter)}")
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.rounds} rounds, "
          f"{EPOCHS} epochs; cells: q1 / median / q3 over the rounds of bare_loop time / "
          "entry time in the same round\n")
    print("| entry | median wall s | vs bare_loop, wall | vs bare_loop, CPU |\n|---|--:|--:|--:|")
    for name in entries:
        cells = []
        for times in (wall, cpu):
            ratios = [b / t for b, t in zip(times["bare_loop"], times[name])]
            cells.append(" / ".join(f"{q:.3f}" for q in statistics.quantiles(ratios, n=4)) + "x")
        print(f"| {name} | {statistics.median(wall[name]):.3f} | {cells[0]} | {cells[1]} |")

if __name__ == "__main__":
    main()
