"""One table of GPU speed ratios for the engine issue; run by benchmarks/gpu_check.sh.

    python3 benchmarks/gpu_bench.py [--table PATH] [--reps 50]

Every measured function returns its result on the host (`.cpu()` / `.item()`), so a
time covers host work, launches, kernels and the copy back. Times are the median of
`--reps` runs after warm-up, each between two CUDA events on the current stream.
ratio = ours / reference: against the read floor (x.sum() over one flat tensor holding
the same bytes) lower is better and 1.0 is the bound; against a baseline < 1 is faster.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

import transfer_fast
from transfer_fast.ops import _library as _ext
from transfer_fast.ops import packed
from transfer_fast.testing import resnet_shapes, triple

ROOT = Path(__file__).resolve().parents[1]




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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, help="also write the table to this file")
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no GPU visible to torch")
    for op in ("multi_tensor_distance", "packed_distance"):
        if not _ext.has_kernel("CUDA", op):
            raise SystemExit(f"gpu_bench: no CUDA kernel for {op} ({_ext.reason or 'not built'})")
    reps = args.reps
    rows: list[tuple[str, float, str, float, str]] = []
    same: list[str] = []  # packed vs list op, per workload

    def row(case: str, ours: Callable, ref_name: str, ref: Callable, goal: str,
            ref_reps: int = reps) -> None:
        ours_ms, ref_ms = time_ms(ours, reps), time_ms(ref, ref_reps)
        rows.append((case, ours_ms, ref_name, ref_ms, goal))
        print(f"  {case}: {ours_ms:.3f} ms vs {ref_name} {ref_ms:.3f} ms", flush=True)

    print("ResNet-50, float32, 3 sets", flush=True)
    sets = resnet50_sets()
    w = Workload(sets)
    same.append(f"resnet50 {w.same_sums()}")
    floor = floor_fn(w.num_elements)
    row("resnet50 packed_distance (Python API)", w.packed, "read floor", floor, "<= 1.3")
    row("resnet50 multi_tensor_distance (torch.ops)", w.list_op_raw, "read floor", floor, "")
    row("resnet50 multi_tensor_distance (Python API)", w.list_op_api, "read floor", floor, "")
    cuda_sets = [[t.cuda() for t in s] for s in sets]
    row("resnet50 packed_distance", w.packed, "authors' loop",
        lambda: loop_item(*cuda_sets), "< 1", ref_reps=10)
    row("resnet50 packed_distance", w.packed, "foreach", lambda: foreach(*cuda_sets), "< 1")
    del w, floor, cuda_sets

    print("ResNet-50, float32, 2 anchors x 16 targets", flush=True)
    w = Workload(sets, extra_targets=15)
    same.append(f"K=16 {w.same_sums()}")
    floor = floor_fn(w.num_elements)
    row("resnet50 K=16 packed_distance", w.packed, "read floor", floor, "")
    row("resnet50 K=16 multi_tensor_distance (torch.ops)", w.list_op_raw, "read floor", floor,
        "")
    del w, floor, sets

    print("2000 small tensors (1..5000 elements), float32, 3 sets", flush=True)
    sets = small_sets()
    w = Workload(sets)
    same.append(f"small2000 {w.same_sums()}")
    cuda_sets = [[t.cuda() for t in s] for s in sets]
    row("small2000 packed_distance", w.packed, "foreach", lambda: foreach(*cuda_sets),
        "ours <= 0.25 ms")
    row("small2000 multi_tensor_distance (torch.ops)", w.list_op_raw, "foreach",
        lambda: foreach(*cuda_sets), "")
    row("small2000 packed_distance", w.packed, "authors' loop", lambda: loop_item(*cuda_sets),
        "< 1", ref_reps=5)
    row("small2000 packed_distance", w.packed, "read floor", floor_fn(w.num_elements), "")

    name = torch.cuda.get_device_name()
    head = (f"transfer_fast GPU ratios on {name}, torch {torch.__version__}: median of {reps} "
            f"runs, result on the host; ratio = ours / reference")
    width = max(len(r[0]) for r in rows)
    lines = [head, "packed vs list op sums (bitwise): " + ", ".join(same), "",
             f"{'case':<{width}}  {'ours ms':>9}  {'reference':<14} {'ref ms':>9}  "
             f"{'ratio':>7}  goal"]
    for case, ours_ms, ref_name, ref_ms, goal in rows:
        lines.append(f"{case:<{width}}  {ours_ms:9.3f}  {ref_name:<14} {ref_ms:9.3f}  "
                     f"{ours_ms / ref_ms:7.3f}  {goal}")
    table = "\n".join(lines)
    print("\n" + table)
    if args.table:
        args.table.write_text(table + "\n")
        print(f"table written to {args.table}")


if __name__ == "__main__":
    main()
