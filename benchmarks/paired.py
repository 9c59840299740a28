"""Cross-check of the pytest-benchmark ratios, robust to a machine whose speed drifts.

    .venv/bin/python -m benchmarks.paired [--rounds 40] [--device cpu]

pytest-benchmark times each entry on its own, one after the other, so a change of
memory bandwidth between entries (a shared VM) moves the ratios. Here every round
runs our op and each baseline back to back and the ratio is taken within the round;
the quartiles of the per-round ratios are printed. Same functions as the benchmarks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .conftest import DEVICES, make_workload, sync, workload_sets
from .test_distance_speed import BASELINES, foreach, fused, loop_item, loop_stack, roofline

FUNCTIONS = {"loop_item": loop_item, "loop_stack": loop_stack, "foreach": foreach,
             "roofline": roofline}


def seconds(fn, w) -> float:
    start = time.perf_counter()
    fn(w)
    sync(w.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--device", choices=DEVICES, default=DEVICES[-1])
    parser.add_argument("--workloads", nargs="+", default=["resnet50", "vitb16", "small2000"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}, "
          f"{args.rounds} rounds; cells: q1 / median / q3 of baseline_time / op_time\n")
    print("| workload | " + " | ".join(
        f"of {b}" if b == "roofline" else f"vs {b}" for b in BASELINES) + " |")
    print("|---|" + "--:|" * len(BASELINES))
    for name in args.workloads:
        w = make_workload(name, workload_sets(name), args.device)
        fns = {"op": fused(args.device), **FUNCTIONS}
        for fn in fns.values():  # warm up
            fn(w)
        ratios: dict[str, list[float]] = {b: [] for b in BASELINES}
        for _ in range(args.rounds):
            t = {key: seconds(fn, w) for key, fn in fns.items()}
            for b in BASELINES:
                ratios[b].append(t[b] / t["op"])
        cells = []
        for b, values in ratios.items():
            q1, med, q3 = statistics.quantiles(values, n=4)
            cells.append(f"{q1:.0%} / {med:.0%} / {q3:.0%}" if b == "roofline"
                         else f"{q1:.2f} / {med:.2f} / {q3:.2f}x")
        print(f"| {name} [{args.device}] | " + " | ".join(cells) + " |")
        del w


if __name__ == "__main__":
    main()
