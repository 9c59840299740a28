"""Peak resident memory of a 32-checkpoint scan (the ratios of the timings: ratios.py).

    .venv/bin/python -m benchmarks.scan_memory [--folder DIR] [--budgets default 1G 256M 64M]

Memory: each scan runs in a fresh child process that imports transfer_fast and nothing
else, takes its VmRSS as the baseline, runs `transfer_fast.scan` over the 32 fine-tuned
ResNet-50 checkpoints of `test_scan_speed.py` (written to DIR, or to a temporary folder
deleted afterwards) and reports its VmHWM (peak RSS) from /proc/self/status. A thread
samples VmRSS/RssAnon/RssFile every 5 ms to split the peak into anonymous memory and
mapped file pages (page cache pages mapped by the process count in RSS). The parent
cross-checks with getrusage(RUSAGE_CHILDREN).ru_maxrss. The memory budget is the
scan's default or `max_memory` (`--budgets`); it sets K (two (K, L) buffers of whole
checkpoints fit in it) and, below two checkpoints, splits each into parts. The bound
a scan must keep: θr and θA packed (two checkpoints) plus the budget, plus SLACK for
the rest of the process (the plan, the tables, matplotlib for the plots).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .test_scan_speed import FORMATS, NUM_FINETUNED, warm_page_cache, workload, write_checkpoints

MB = 1 << 20
SLACK = 48 * MB

# Runs in the child: transfer_fast is the only import of note before the baseline.
CHILD = r"""
import json, sys, threading, time
import transfer_fast

def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024
    return out

baseline = status()
peak = dict(baseline)
stop = threading.Event()

def sample():
    while not stop.is_set():
        s = status()
        if s["VmRSS"] > peak["VmRSS"]:
            peak.update(s)
        time.sleep(0.005)

args = json.loads(sys.argv[1])
if args.get("preload_pyplot"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
    print(json.dumps({"baseline": baseline["VmRSS"], "after": status()["VmRSS"]}))
    sys.exit(0)
thread = threading.Thread(target=sample, daemon=True)
thread.start()
start = time.perf_counter()
res = transfer_fast.scan(args["paths"], random=args["random"], pretrained=args["pretrained"],
                         out=args["out"], max_memory=args["max_memory"], progress=False)
seconds = time.perf_counter() - start
stop.set()
thread.join()
end = status()
print(json.dumps({"baseline": baseline["VmRSS"], "base": baseline, "hwm": end["VmHWM"],
                  "end": end["VmRSS"],
                  "sampled": peak, "seconds": seconds, "done": res.done,
                  "failed": res.failed}))
"""


def child(args: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], check=True,
                          capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_budget(text: str) -> int | None:
    """'default' -> None (the scan's own), '256M' -> bytes."""
    if text == "default":
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def measure(folder: Path, formats, budgets) -> list[dict]:
    from transfer_fast.pipelines.scan import default_memory_budget
    from transfer_fast.pipelines.scan_pair import batch_size

    from .test_scan_speed import scan_device, target_bytes

    rows = []
    for fmt in formats:
        w = workload(folder, fmt)
        warm_page_cache([w.random, w.pretrained, *w.finetuned])
        for text in budgets:
            budget = parse_budget(text)
            out = w.runs / f"memory-{fmt}-{text}"
            shutil.rmtree(out, ignore_errors=True)
            r = child({"paths": [str(p) for p in w.finetuned], "random": str(w.random),
                       "pretrained": str(w.pretrained), "out": str(out),
                       "max_memory": budget})
            assert (r["done"], r["failed"]) == (len(w.finetuned), 0), r
            shutil.rmtree(out, ignore_errors=True)
            budget = budget or default_memory_budget(scan_device())
            size = target_bytes(w)
            k = batch_size(size, budget)
            rows.append({"format": fmt, "budget": budget, "K": min(k, len(w.finetuned)),
                         "checkpoint": w.checkpoint_bytes, "bound": 2 * size + budget + SLACK,
                         "ru_maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
                         * 1024, **r})
    return rows


def memory_table(rows: list[dict], pyplot: dict) -> list[str]:
    lines = ["| format | budget MiB | K | peak RSS - baseline MiB | in checkpoints | "
             "bound MiB (θr, θA + budget + slack) | within | sampled peak above baseline: anon / "
             "file MiB | baseline MiB | scan s |",
             "|---|--:|--:|--:|--:|--:|:-:|--:|--:|--:|"]
    for r in rows:
        extra = r["hwm"] - r["baseline"]
        s, b = r["sampled"], r["base"]
        lines.append(
            f"| {r['format']} | {r['budget'] / MB:.0f} | {r['K']} | {extra / MB:.0f} | "
            f"{extra / r['checkpoint']:.2f} | {r['bound'] / MB:.0f} | "
            f"{'yes' if extra <= r['bound'] else 'NO'} | "
            f"{(s['RssAnon'] - b['RssAnon']) / MB:.0f} / "
            f"{(s['RssFile'] - b['RssFile']) / MB:.0f} | "
            f"{r['baseline'] / MB:.0f} | {r['seconds']:.2f} |")
    sizes = {r["format"]: r["checkpoint"] for r in rows}
    lines += ["", "One fine-tuned checkpoint file: " + ", ".join(
              f"{b / MB:.1f} MiB ({fmt}; 3 checkpoints: {3 * b / MB:.0f} MiB)"
              for fmt, b in sizes.items()) + ". "
              f"Importing matplotlib.pyplot (the scan's plots) adds "
              f"{(pyplot['after'] - pyplot['baseline']) / MB:.0f} MiB to a process that has "
              f"imported transfer_fast. The parent's ru_maxrss over all children: "
              f"{max(r['ru_maxrss'] for r in rows) / MB:.0f} MiB (absolute, baseline included)."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, help="checkpoints folder (written if needed, "
                        "kept); default: a temporary folder, deleted")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--budgets", nargs="+", default=["default", "1G", "256M", "64M"],
                        help="max_memory per scan: 'default' (the scan's own) or bytes "
                             "with K/M/G")
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="tf-scan-mem-"))
    try:
        write_checkpoints(folder)
        rows = measure(folder, args.formats, args.budgets)
        pyplot = child({"preload_pyplot": True})
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            shutil.rmtree(folder / "runs", ignore_errors=True)
    print(f"{NUM_FINETUNED} fine-tuned ResNet-50 checkpoints; peak = VmHWM of a fresh "
          "process, baseline = its VmRSS after `import transfer_fast`\n")
    print("\n".join(memory_table(rows, pyplot)))


if __name__ == "__main__":
    main()
