"""One table of GPU speed ratios for the engine issues; run by benchmarks/gpu_check.sh.

    python3 benchmarks/gpu_bench.py [--table PATH] [--reps 50]

Every measured function returns its result on the host (`.cpu()` / `.item()`), so a
time covers host work, launches, kernels and the copy back. Times are the median of
`--reps` runs after warm-up, each between two CUDA events on the current stream; rows
marked "per call, back to back" time n calls queued without a synchronisation between
them (a data loader's loop) and divide by n. ratio = ours / reference: against the read
floor (x.sum() over one flat tensor holding the same bytes) lower is better and 1.0 is
the bound; against a baseline < 1 is faster. A row that fails prints its error and the
table goes on. About a minute on an H200.

Sections: the distance ops (ResNet-50 and 2000 small tensors); channel_stats against
torch.var_mean on (256, 1024, 14, 14) float32 activations, 1 and 10 classes, NCHW and
channels_last, with its float64 accuracy; FeatureStats.update on a ResNet-50
(transfer_fast.train.models, 1000 classes) at batch 128 x 224 in float32 (TF32
convolutions: torch's defaults) against the bare forward; transferability(...,
preset="paper") end to end from in-memory state dicts against the authors' loop.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import transfer_fast
from transfer_fast import ops
from transfer_fast.ops import _library as _ext
from transfer_fast.ops import packed
from transfer_fast.testing import resnet_shapes, triple

ROOT = Path(__file__).resolve().parents[1]
STATS_SHAPE = (256, 1024, 14, 14)


def time_ms(fn: Callable[[], object], reps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def per_call_ms(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Mean ms of `reps` calls queued back to back (one synchronisation at the end)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def floor_fn(num_elements: int) -> Callable[[], float]:
    flat = torch.ones(num_elements, device="cuda")
    return lambda: flat.sum().item()


def loop_item(r, a, b) -> list[float]:
    """The authors' script: per tensor, mean |a - b| for both anchors, each read with .item()."""
    out = []
    for x, y, z in zip(r, a, b):
        out.append((x - z).abs().mean().item())
        out.append((y - z).abs().mean().item())
    return out


def foreach(r, a, b) -> torch.Tensor:
    norms = [torch._foreach_norm(torch._foreach_sub(anchor, b)) for anchor in (r, a)]
    return torch.stack([torch.stack(n) for n in norms]).cpu()


class Workload:
    """Sets packed once: anchors (2, L) = (θr, θA), targets (K, L), plus per-tensor views."""

    def __init__(self, sets: list[list[torch.Tensor]], extra_targets: int = 0):
        self.layout = packed.PackedLayout.from_tensors(sets[0])
        self.anchors = self.layout.new_buffer(2, device="cuda")
        self.targets = self.layout.new_buffer(1 + extra_targets, device="cuda")
        for row, tensors in zip([*self.anchors, self.targets[0]], sets):
            self.layout.pack([t.cuda() for t in tensors], out=row)
        g = torch.Generator(device="cuda").manual_seed(0)
        for k in range(1, 1 + extra_targets):  # more fine-tuned sets near θB
            noise = torch.randn(self.layout.length, device="cuda", generator=g)
            self.targets[k] = self.targets[0] + 0.01 * noise
        self.views = [self.layout.unpack(row) for row in [*self.anchors, *self.targets]]
        self.num_elements = sum(self.layout.numels) * (2 + len(self.targets))

    def packed(self) -> torch.Tensor:
        return packed.packed_distance(self.anchors, self.targets, self.layout).cpu()

    def list_op_raw(self) -> torch.Tensor:
        flat_a = self.views[0] + self.views[1]
        flat_b = [t for s in self.views[2:] for t in s]
        return torch.ops.transfer_fast.multi_tensor_distance(flat_a, flat_b,
                                                             len(self.layout)).cpu()

    def list_op_api(self) -> torch.Tensor:
        return transfer_fast.multi_tensor_distance(self.views[:2], self.views[2:],
                                                   backend="cuda").cpu()

    def same_sums(self) -> str:
        """The packed op and the list op reduce in the same order: bitwise equal sums."""
        return "equal" if torch.equal(self.packed(), self.list_op_raw()) else "DIFFERENT"


def resnet50_sets() -> list[list[torch.Tensor]]:
    """θr, θA, θB of ResNet-50: its 161 learned tensors (no BatchNorm statistics)."""
    states = triple(resnet_shapes(50), seed=0)
    names = [n for n, t in states[0].items()
             if t.is_floating_point() and not n.endswith(("running_mean", "running_var"))]
    return [[s[n] for n in names] for s in states]


def small_sets(count: int = 2000, max_numel: int = 5000) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, max_numel + 1, (count,), generator=g).tolist()
    r = [torch.randn(n, generator=g) * 0.05 for n in sizes]
    a = [x + torch.randn(x.shape, generator=g) * 0.05 for x in r]
    return [r, a, [x + torch.randn(x.shape, generator=g) * 0.01 for x in a]]


class Table:
    """Rows of (case, ours ms, reference, reference ms, goal, note), printed at the end."""

    def __init__(self, reps: int):
        self.reps, self.rows, self.notes = reps, [], []

    def row(self, case: str, ours: Callable, ref_name: str, ref: Callable, goal: str = "", *,
            ref_reps: int | None = None, timer: Callable = time_ms,
            reps: int | None = None) -> None:
        """Times ours and the reference; a failure becomes a row with its error."""
        reps = reps or self.reps
        try:
            ours_ms = timer(ours, reps)
            ref_ms = timer(ref, ref_reps or reps)
        except Exception as exc:  # noqa: BLE001  (one failing row must not end the table)
            self.failed(case, exc)
            return
        self.rows.append((case, ours_ms, ref_name, ref_ms, goal, ""))
        print(f"  {case}: {ours_ms:.3f} ms vs {ref_name} {ref_ms:.3f} ms "
              f"({ours_ms / ref_ms:.3f})", flush=True)

    def failed(self, case: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        self.rows.append((case, math.nan, "", math.nan, "", "FAILED " + message))
        print(f"  {case}: FAILED {message}", flush=True)

    def section(self, name: str, fn: Callable[[Table], None]) -> None:
        print(name, flush=True)
        try:
            fn(self)
        except Exception as exc:  # noqa: BLE001
            self.failed(f"{name} (setup)", exc)
        torch.cuda.empty_cache()

    def text(self, head: str) -> str:
        width = max([len(r[0]) for r in self.rows] + [4])
        lines = [head, *self.notes, "",
                 f"{'case':<{width}}  {'ours ms':>9}  {'reference':<14} {'ref ms':>9}  "
                 f"{'ratio':>7}  goal"]
        for case, ours_ms, ref_name, ref_ms, goal, note in self.rows:
            if note:
                lines.append(f"{case:<{width}}  {note}")
                continue
            lines.append(f"{case:<{width}}  {ours_ms:9.3f}  {ref_name:<14} {ref_ms:9.3f}  "
                         f"{ours_ms / ref_ms:7.3f}  {goal}")
        return "\n".join(lines)


def distances(t: Table) -> None:
    for op in ("multi_tensor_distance", "packed_distance"):
        if not _ext.has_kernel("CUDA", op):
            raise RuntimeError(f"no CUDA kernel for {op} ({_ext.reason or 'not built'})")
    sets = resnet50_sets()
    w = Workload(sets)
    t.notes.append(f"packed vs list op sums (bitwise), resnet50: {w.same_sums()}")
    floor = floor_fn(w.num_elements)
    t.row("resnet50 packed_distance (Python API)", w.packed, "read floor", floor, "<= 1.3")
    t.row("resnet50 multi_tensor_distance (torch.ops)", w.list_op_raw, "read floor", floor)
    t.row("resnet50 multi_tensor_distance (Python API)", w.list_op_api, "read floor", floor)
    cuda_sets = [[x.cuda() for x in s] for s in sets]
    t.row("resnet50 packed_distance", w.packed, "authors' loop",
          lambda: loop_item(*cuda_sets), "< 1", ref_reps=10)
    t.row("resnet50 packed_distance", w.packed, "foreach", lambda: foreach(*cuda_sets), "< 1")
    del w, floor, cuda_sets
    w = Workload(sets, extra_targets=15)
    t.notes.append(f"packed vs list op sums (bitwise), resnet50 K=16: {w.same_sums()}")
    floor = floor_fn(w.num_elements)
    t.row("resnet50 K=16 packed_distance", w.packed, "read floor", floor)
    t.row("resnet50 K=16 multi_tensor_distance (torch.ops)", w.list_op_raw, "read floor", floor)
    del w, floor, sets
    sets = small_sets()
    w = Workload(sets)
    t.notes.append(f"packed vs list op sums (bitwise), small2000: {w.same_sums()}")
    cuda_sets = [[x.cuda() for x in s] for s in sets]
    t.row("small2000 packed_distance", w.packed, "foreach", lambda: foreach(*cuda_sets),
          "ours <= 0.25 ms")
    t.row("small2000 multi_tensor_distance (torch.ops)", w.list_op_raw, "foreach",
          lambda: foreach(*cuda_sets))
    t.row("small2000 packed_distance", w.packed, "authors' loop", lambda: loop_item(*cuda_sets),
          "< 1", ref_reps=5)
    t.row("small2000 packed_distance", w.packed, "read floor", floor_fn(w.num_elements))


def stats_accuracy(x: torch.Tensor, labels: torch.Tensor | None, k: int) -> str:
    """Worst relative error of the op's mean and variance against float64 math, and
    whether a second call gives the same bits."""
    count, mean, m2 = ops.channel_stats(x, labels, k)
    again = ops.channel_stats(x, labels, k)
    same = all(torch.equal(a, b) for a, b in zip((count, mean, m2), again))
    y = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if labels is None else labels
    x64 = x.double().movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])  # (N, S, C)
    n = torch.bincount(y, minlength=k).double() * x64.shape[1]
    want_mean = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
    want_mean.index_add_(0, y, x64.sum(1))
    want_mean /= n.clamp_min(1)[:, None]
    centred = x64 - want_mean[y][:, None]
    want_m2 = torch.zeros_like(want_mean).index_add_(0, y, (centred * centred).sum(1))
    err_mean = ((mean - want_mean).abs() / want_m2.div(n.clamp_min(1)[:, None]).sqrt()
                .clamp_min(1e-300)).max().item()
    err_m2 = ((m2 - want_m2).abs() / want_m2.clamp_min(1e-300)).max().item()
    ok = torch.equal(count, n)
    return (f"mean err/std {err_mean:.1e}, m2 rel err {err_m2:.1e}, counts "
            f"{'exact' if ok else 'WRONG'}, repeat {'bitwise equal' if same else 'DIFFERENT'}")


def channel_stats(t: Table) -> None:
    if not _ext.has_kernel("CUDA", "channel_stats"):
        raise RuntimeError(f"no CUDA kernel for channel_stats ({_ext.reason or 'not built'})")
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(STATS_SHAPE, device="cuda", generator=g) * 2 + 3
    labels = torch.randint(0, 10, (STATS_SHAPE[0],), device="cuda", generator=g)
    floor = floor_fn(base.numel())
    for layout, x in (("NCHW", base), ("channels_last",
                                       base.to(memory_format=torch.channels_last))):
        def var_mean(x=x):
            return torch.var_mean(x, dim=(0, 2, 3))[0].cpu()

        for k, y in ((1, None), (10, labels)):
            name = f"channel_stats {layout} {k} class{'es' if k > 1 else ''}"
            try:
                t.notes.append(f"{name}: {stats_accuracy(x, y, k)}")
            except Exception as exc:  # noqa: BLE001
                t.failed(f"{name} (accuracy)", exc)
            t.row(name, lambda x=x, y=y, k=k: ops.channel_stats(x, y, k)[2].cpu(), "var_mean",
                  var_mean, "<= 1.0")
        x3 = x.reshape(x.shape[0], x.shape[1], -1) if layout == "NCHW" else \
            x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])
        cl = layout != "NCHW"
        t.row(f"channel_stats {layout} (torch.ops, kernels)",
              lambda x3=x3, cl=cl: torch.ops.transfer_fast.channel_stats(x3, None, None, 1, cl)[2]
              .cpu(), "read floor", floor)
    del base, floor


def feature_stats(t: Table) -> None:
    from transfer_fast.measure import features
    from transfer_fast.train.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet50", 1000).cuda().eval()
    x = torch.randn(128, 3, 224, 224, device="cuda")
    labels = torch.randint(0, 10, (128,))

    def bare():
        with torch.no_grad():
            return model(x)

    cases = (("unlabelled", None, True), ("unlabelled, one stream", None, False),
             ("10 classes", labels, True))
    try:
        for case, y, side in cases:
            features.SIDE_STREAM = side
            stats = transfer_fast.FeatureStats(model, num_classes=10 if y is not None else None)
            try:
                t.row(f"FeatureStats.update ResNet-50 b128x224 fp32, {case} (per call, back "
                      "to back)", lambda s=stats, y=y: s.update(x, y), "bare forward", bare,
                      "<= 1.10", timer=per_call_ms, reps=20)
                stats.layers  # noqa: B018  (the pending batches are checked and merged)
            finally:
                stats.close()
        features.SIDE_STREAM = True
        with transfer_fast.FeatureStats(model) as stats:
            t.row("FeatureStats.update ResNet-50 b128x224 fp32, unlabelled (one call)",
                  lambda: stats.update(x), "bare forward", bare, reps=20)
    finally:
        features.SIDE_STREAM = True


def end_to_end(t: Table) -> None:
    states = tuple({k: v.cuda() for k, v in s.items()} for s in triple(resnet_shapes(50),
                                                                        seed=0))
    plan = transfer_fast.make_plan(list(states), "paper")
    sets = [[s[n] for n in plan.names] for s in states]
    ours = transfer_fast.transferability(*states, preset="paper").overall
    theirs = loop_item(*sets)
    ratios = [d_r / d_a for d_r, d_a in zip(theirs[0::2], theirs[1::2])]
    t.notes.append(f"transferability(preset='paper') overall {ours:.6f}; per-tensor ratios of "
                   f"the authors' loop: {len(ratios)} (mean {statistics.mean(ratios):.6f})")
    t.row("transferability(preset='paper') ResNet-50, state dicts on the GPU",
          lambda: transfer_fast.transferability(*states, preset="paper").overall,
          "authors' loop", lambda: loop_item(*sets), "< 1", ref_reps=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, help="also write the table to this file")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no GPU visible to torch")
    started = time.perf_counter()
    t = Table(args.reps)
    t.section("distance ops: ResNet-50 (3 sets, K=16) and 2000 small tensors", distances)
    t.section(f"channel_stats {STATS_SHAPE} float32", channel_stats)
    t.section("FeatureStats on ResNet-50, batch 128 x 224, float32", feature_stats)
    t.section("transferability end to end, ResNet-50, preset paper", end_to_end)
    name = torch.cuda.get_device_name()
    head = (f"transfer_fast GPU ratios on {name}, torch {torch.__version__}: median of "
            f"{args.reps} runs, result on the host; ratio = ours / reference "
            f"({time.perf_counter() - started:.0f} s)")
    table = t.text(head)
    print("\n" + table)
    if args.table:
        args.table.write_text(table + "\n")
        print(f"table written to {args.table}")


if __name__ == "__main__":
    main()
