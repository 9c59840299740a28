"""Markdown tables of speed ratios from a pytest-benchmark JSON file.

    .venv/bin/python benchmarks/ratios.py /tmp/bench.json

Per group: each entry's median time, the bandwidth it reaches over the bytes of
the three sets, and baseline_median / entry_median for every baseline of the
group (a speedup for the loops and foreach, a fraction for the roofline).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

BASELINES = ("loop_item", "loop_stack", "foreach", "roofline")


def ratio(base: float | None, median: float, fraction: bool) -> str:
    if base is None:
        return "-"
    return f"{base / median:.0%}" if fraction else f"{base / median:.2f}x"


def table(group: str, rows: list[dict]) -> list[str]:
    medians = {r["extra_info"]["entry"]: r["stats"]["median"] for r in rows}
    present = [b for b in BASELINES if b in medians]
    heads = [f"of {b}" if b == "roofline" else f"vs {b}" for b in present]
    lines = [f"### {group}", "", "| entry | median ms | GB/s | " + " | ".join(heads) + " |",
             "|---|--:|--:|" + "--:|" * len(present)]
    for r in sorted(rows, key=lambda r: r["stats"]["median"]):
        entry, median = r["extra_info"]["entry"], r["stats"]["median"]
        gbps = r["extra_info"]["bytes"] / median / 1e9
        cells = [ratio(medians[b], median, b == "roofline") for b in present]
        lines.append(f"| {entry} | {median * 1e3:.2f} | {gbps:.1f} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    info = data.get("machine_info", {})
    print(f"CPU: {info.get('cpu', {}).get('brand_raw', '?')}, "
          f"python {info.get('python_version', '?')}, run {data.get('datetime', '?')}")
    print()
    for group, rows in groups.items():
        print("\n".join(table(group, rows)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench.json")
