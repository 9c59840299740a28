"""Markdown tables of speed ratios from pytest-benchmark JSON files.

    .venv/bin/python benchmarks/ratios.py /tmp/bench.json [more.json ...] [--stat min]

Per group of the last file: each entry's median (or min) time, the bandwidth it
reaches over the bytes it reads, and baseline_time / entry_time for every baseline of
the group (a speedup, "vs X"; a fraction for a bound such as the roofline, "of X").
Which entries are baselines or bounds is recorded by the harness (conftest.BASELINES,
conftest.BOUNDS) in each entry's extra_info. `preempt/s` counts the involuntary context
switches per second during the entry: in the hundreds, other processes took the CPU
and its time is inflated. With several files, a summary follows: our entries' ratios
in each run and their median over the runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

Entries = dict[str, tuple[float, dict]]  # entry -> (time in s, extra_info)


def baselines(entries: Entries) -> list[str]:
    """The group's baselines, in the order they ran."""
    return [e for e, (_, info) in entries.items() if info.get("baseline")]


def is_bound(entries: Entries, baseline: str) -> bool:
    return bool(entries[baseline][1].get("bound"))


def fmt(value: float, bound: bool) -> str:
    return f"{value:.0%}" if bound else f"{value:.2f}x"


def heads(entries: Entries, present: list[str]) -> list[str]:
    return [f"of {b}" if is_bound(entries, b) else f"vs {b}" for b in present]


def load(path: str, stat: str) -> dict[str, Entries]:
    """group -> entry -> (time in s, extra_info)."""
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, dict] = defaultdict(dict)
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        groups[bench["group"]][info["entry"]] = (bench["stats"][stat], info)
    return groups


def table(group: str, entries: Entries, stat: str) -> list[str]:
    present = baselines(entries)
    lines = [f"### {group}", "",
             f"| entry | {stat} ms | GB/s | " + " | ".join(heads(entries, present))
             + " | preempt/s |",
             "|---|--:|--:|" + "--:|" * (len(present) + 1)]
    for entry, (time, info) in sorted(entries.items(), key=lambda item: item[1][0]):
        cells = [fmt(entries[b][0] / time, is_bound(entries, b)) for b in present]
        lines.append(f"| {entry} | {time * 1e3:.2f} | {info['bytes'] / time / 1e9:.1f} | "
                     + " | ".join(cells) + f" | {info.get('preempted_per_s', '?')} |")
    return lines + [""]


def summary(runs: list[dict[str, Entries]]) -> list[str]:
    """Ratios of the non-baseline entries, one cell per run, then the median of the runs."""
    lines = ["### Summary over runs (each cell: run 1, run 2, ... -> median)", ""]
    for group, entries in runs[-1].items():
        present = baselines(entries)
        lines += [f"{group}", "", "| entry | " + " | ".join(heads(entries, present)) + " |",
                  "|---|" + "--:|" * len(present)]
        for entry, (_, info) in entries.items():
            if info.get("baseline"):
                continue
            cells = []
            for b in present:
                bound = is_bound(entries, b)
                values = [r[group][b][0] / r[group][entry][0] for r in runs
                          if entry in r.get(group, {}) and b in r[group]]
                cells.append(", ".join(fmt(v, bound) for v in values)
                             + f" -> **{fmt(statistics.median(values), bound)}**")
            lines.append(f"| {entry} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", help="pytest-benchmark JSON files, one per run")
    parser.add_argument("--stat", default="median", choices=("median", "min", "mean"))
    args = parser.parse_args()
    runs = [load(path, args.stat) for path in args.files]
    print(f"Last run ({args.files[-1]}):\n")
    for group, entries in runs[-1].items():
        print("\n".join(table(group, entries, args.stat)))
    if len(runs) > 1:
        print("\n".join(summary(runs)))


if __name__ == "__main__":
    main()
