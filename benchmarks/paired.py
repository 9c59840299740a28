"""Cross-check of the pytest-benchmark ratios, robust to a machine whose speed drifts.

    .venv/bin/python -m benchmarks.paired [--rounds 40] [--device cpu]
        [--workloads resnet50 small2000] [--entries op packed op_torch op_torch_l1 op_torch_l2]

pytest-benchmark times each entry on its own, one after the other, so a change of
memory bandwidth between entries (a shared VM) moves the ratios. Here every round
runs our entries and every baseline back to back (in reverse order every other round,
so a steady drift cancels) and each ratio is taken within the round; the quartiles of
the per-round ratios are printed. Same functions as test_distance_speed.py.

Goals on the CPU: op and packed at least 85% of the roofline on ResNet-50 and 60% on
small2000; the pure-torch fallback at least 1.00x naive_loop (op_torch_l1 computes
what naive_loop computes, op_torch all five sums).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .conftest import BASELINES, BOUNDS, DEVICES, make_workload, sync, workload_sets
from .test_distance_speed import BASELINE_ENTRIES, function


def seconds(fn, w) -> float:
    start = time.perf_counter()
    fn(w)
    sync(w.device)
    return time.perf_counter() - start


def cell(values: list[float], bound: bool) -> str:
    q1, med, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.0%} / {med:.0%} / {q3:.0%}" if bound else f"{q1:.2f} / {med:.2f} / {q3:.2f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--device", choices=DEVICES, default=DEVICES[-1])
    parser.add_argument("--workloads", nargs="+", default=["resnet50", "small2000"])
    parser.add_argument("--entries", nargs="+",
                        default=["op", "packed", "op_torch", "op_torch_l1", "op_torch_l2"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, "
          f"{args.rounds} rounds; cells: q1 / median / q3 of baseline_time / entry_time "
          "within a round\n")
    heads = [f"of {b}" if b in BOUNDS else f"vs {b}" for b in BASELINE_ENTRIES]
    print("| workload | entry | " + " | ".join(heads) + " |")
    print("|---|---|" + "--:|" * len(BASELINE_ENTRIES))
    for name in args.workloads:
        w = make_workload(name, workload_sets(name), args.device)
        w.packed()
        fns = {e: function(e, args.device) for e in (*args.entries, *BASELINE_ENTRIES)}
        for fn in fns.values():  # warm up
            fn(w)
        times: dict[str, list[float]] = {e: [] for e in fns}
        order = list(fns)
        for r in range(args.rounds):
            for entry in order if r % 2 == 0 else order[::-1]:
                times[entry].append(seconds(fns[entry], w))
        for entry in args.entries:
            cells = [cell([b / t for b, t in zip(times[base], times[entry])], base in BOUNDS)
                     for base in BASELINE_ENTRIES]
            print(f"| {name} [{args.device}] | {entry} | " + " | ".join(cells) + " |")
        del w
    print("\nBaselines: " + "; ".join(f"{b}: {BASELINES[b]}" for b in BASELINE_ENTRIES))


if __name__ == "__main__":
    main()
