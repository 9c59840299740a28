"""Speed of the many-model scan against the baselines of the issue, in the same run.

Workload: θr, θA and 32 fine-tuned θB with ResNet-50's names and shapes (θB = θA + a
small move per seed, a new 10-class head), written once per session to a temporary
folder as .safetensors and as .pt (3.2 GB per format), every file read once
before timing so the page cache is warm. One benchmark group per format:

  scan               transfer_fast.scan(32 paths, ...) into a fresh run folder every
                     round (default preset 'auto'; K from the default memory budget: two
                     (K, L) buffers of whole checkpoints, see `batch_size`)
  scan_paper         the same with preset='paper'
  scan_tables        the same as scan without the two PNG plots (plots=False)
  script_loop        the authors' script once per checkpoint: load θr, θA and θB
                     (torch.load, or safetensors' load_file), per 'conv' tensor (and
                     fc.weight where the shapes agree) (x - b).abs().mean().item() for
                     x = θr and θA, stem + blocks of three convs, ratios, their mean
  measure_loop       transferability(r, a, b, preset='paper') once per checkpoint
  measure_loop_auto  the same with preset='auto' (what `scan` computes)
  read_only          the bare read of what a scan must read, every byte copied into
                     memory: the 32 fine-tuned files plus θr and θA once, with
                     load_file(backend="pread") (the default load_file of safetensors 0.8
                     maps the file and reads nothing until a tensor is used) or
                     torch.load(weights_only=True)
  read_touch         the same files opened as the scan opens them, mapped (load_file,
                     torch.load(mmap=True)), every floating tensor summed once: the
                     pages brought in and read, nothing copied
  read_raw           the same files' bytes copied from the page cache into one reused
                     16 MiB buffer (readinto): the floor of any reader, no tensors made

`bytes` in extra_info is the size of those 34 files for every entry of a group, so the
GB/s column of `ratios.py` is comparable. The ratios of the issue's goals are printed by
`python benchmarks/ratios.py <bench.json>` (`of read_only` = read time / scan time).

The marginal cost per checkpoint (group `scan marginal [fmt]`, and
`python -m benchmarks.test_scan_speed --rounds 5`): each round scans all 32 and the
first 8 checkpoints (tables only, fresh run folders, warm cache) and reads the other 24
files' bytes with the format's loader (as `read_only`); marginal = (t32 - t8) / 24,
bare = read / 24, and the goal is marginal <= 1.3 x bare. The fixed costs (θr and θA,
planning, tables) cancel in the difference; rounds are paired, so drift of a shared
machine cancels too. extra_info holds the per-round ratios and their median, and the
same ratio in CPU time of the process (steadier when other processes share the cores).

The folder is deleted at session end. With TRANSFER_FAST_SCAN_DIR=<dir> the checkpoints
are written there once and kept, for repeated sessions and for `scan_memory.py`.
"""

from __future__ import annotations

import csv
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import transfer_fast
from transfer_fast import transferability
from transfer_fast.pipelines.scan import default_memory_budget
from transfer_fast.pipelines.scan_pair import batch_size as scan_batch_size
from transfer_fast.testing import random_state, resnet_shapes, triple

from .conftest import describe, preemption_counted

NUM_FINETUNED = 32
FINETUNED_CLASSES = 10
STEP = 0.2  # as testing.triple: θB = θA + 0.2 * N(0, 0.05^2)
FORMATS = ("safetensors", "pt")
ENTRIES = ("scan", "scan_paper", "scan_tables", "script_loop", "measure_loop",
           "measure_loop_auto", "read_only", "read_touch", "read_raw")
ENV_DIR = "TRANSFER_FAST_SCAN_DIR"
_DONE_MARK = ".complete"


@dataclass
class ScanWorkload:
    """θr, θA and the fine-tuned checkpoints in one format, in `folder`."""

    folder: Path
    fmt: str
    random: Path
    pretrained: Path
    finetuned: list[Path]
    runs: Path  # where the scans' run folders go

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in (self.random, self.pretrained, *self.finetuned))

    @property
    def checkpoint_bytes(self) -> int:
        """The size of one fine-tuned checkpoint file."""
        return self.finetuned[0].stat().st_size


def _paths(folder: Path, fmt: str, count: int) -> tuple[Path, Path, list[Path]]:
    return (folder / f"r.{fmt}", folder / f"a.{fmt}",
            [folder / f"b{i:02d}.{fmt}" for i in range(count)])


def finetuned_state(pretrained: dict, seed: int) -> dict[str, torch.Tensor]:
    """θB = θA + a small move, with a fresh 10-class head (like testing.triple)."""
    shapes = {k: tuple(v.shape) for k, v in pretrained.items()}
    noise = random_state(shapes, seed=1000 + seed)
    b = {k: v + STEP * noise[k] if v.is_floating_point() else v.clone()
         for k, v in pretrained.items()}
    b.update(random_state({"fc.weight": (FINETUNED_CLASSES, shapes["fc.weight"][1]),
                           "fc.bias": (FINETUNED_CLASSES,)}, seed=2000 + seed))
    return b


def _save(state: dict, path: Path) -> None:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)


def write_checkpoints(folder: Path, count: int = NUM_FINETUNED,
                      formats=FORMATS) -> None:
    """θr, θA and `count` fine-tuned ResNet-50 sets, each in every format; skipped when
    `folder` already holds a complete set."""
    folder.mkdir(parents=True, exist_ok=True)
    mark = folder / _DONE_MARK
    wanted = f"{count} {' '.join(formats)}"
    if mark.exists() and mark.read_text() == wanted:
        return
    r, a, _ = triple(resnet_shapes(50), seed=0, finetuned_classes=FINETUNED_CLASSES)
    for fmt in formats:
        r_path, a_path, _ = _paths(folder, fmt, count)
        _save(r, r_path)
        _save(a, a_path)
    for i in range(count):
        b = finetuned_state(a, seed=i)
        for fmt in formats:
            _save(b, _paths(folder, fmt, count)[2][i])
    mark.write_text(wanted)


def warm_page_cache(paths) -> int:
    """Reads every file once so the timed runs find it in the page cache."""
    total, buf = 0, bytearray(16 << 20)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def workload(folder: Path, fmt: str, count: int = NUM_FINETUNED) -> ScanWorkload:
    r, a, bs = _paths(folder, fmt, count)
    runs = folder / "runs"
    runs.mkdir(exist_ok=True)
    return ScanWorkload(folder, fmt, r, a, bs, runs)


def batch_size(target_bytes: int, device: torch.device | None = None) -> int:
    """K as `scan` chooses it by default for targets of `target_bytes` (scan_pair.py:
    two (K, L) buffers within the default memory budget)."""
    return scan_batch_size(target_bytes, default_memory_budget(device or scan_device()))


def target_bytes(w: ScanWorkload) -> int:
    """The bytes of θA's floating tensors: what `scan` sizes K by."""
    return sum(t.numel() * t.element_size() for t in load(w.pretrained).values()
               if t.is_floating_point())


def scan_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---- the entries --------------------------------------------------------------------

def load(path: Path) -> dict[str, torch.Tensor]:
    """How the authors' script reads a checkpoint: torch.load, or load_file (which maps
    the file; pages are read as the loop touches them)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def authors_script(random, pretrained, finetuned) -> tuple[list[float], float]:
    """The script's semantics (PAPER.md section 1), positional like the original: tensors
    with 'conv' in the name in order, stem = the first, then blocks of three; fc.weight
    as one more group when its shape agrees in the three sets (not here: θB has a 10-class
    head, so the script would fail on it; preset 'paper' leaves it out the same way);
    per tensor mean |x - b| read with .item(); group T = ratio of the group means;
    overall = mean over the conv groups. Safetensors stores names alphabetically, which
    for ResNet-50 (block indices < 10) is the same order of conv tensors."""
    convs = [n for n in finetuned if "conv" in n]
    groups = [convs[:1]] + [convs[i:i + 3] for i in range(1, len(convs), 3)]
    head = "fc.weight"
    if head in finetuned and finetuned[head].shape == random[head].shape == \
            pretrained[head].shape:
        groups.append([head])

    def dist(p, q):
        return (p - q).abs().mean().item()

    values = []
    for group in groups:
        d_r = sum(dist(random[n], finetuned[n]) for n in group) / len(group)
        d_a = sum(dist(pretrained[n], finetuned[n]) for n in group) / len(group)
        values.append(d_r / d_a)
    body = values[:len(groups) - (groups[-1] == [head])]
    return values, sum(body) / len(body)


def script_loop(w: ScanWorkload) -> list[float]:
    """The script run once per fine-tuned checkpoint: three files loaded every time."""
    return [authors_script(load(w.random), load(w.pretrained), load(b))[1]
            for b in w.finetuned]


def measure_loop(w: ScanWorkload, preset: str = "paper") -> list[float]:
    return [transferability(w.random, w.pretrained, b, preset=preset).overall
            for b in w.finetuned]


def measure_loop_auto(w: ScanWorkload) -> list[float]:
    return measure_loop(w, preset="auto")


def bare_read(paths) -> int:
    """Each file's every byte copied into memory by the format's loader."""
    tensors = 0
    for path in paths:
        if path.suffix == ".safetensors":
            state = load_file(str(path), backend="pread")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        tensors += len(state)
    return tensors


def read_only(w: ScanWorkload) -> int:
    """The bare read: every file a scan needs, each once, copied into memory."""
    return bare_read([w.random, w.pretrained, *w.finetuned])


def read_touch(w: ScanWorkload) -> float:
    """Every file a scan needs, mapped and each floating tensor summed once."""
    total = 0.0
    for path in (w.random, w.pretrained, *w.finetuned):
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        total += sum(float(v.sum()) for v in state.values() if v.is_floating_point())
    return total


def read_raw(w: ScanWorkload) -> int:
    """The bytes of every file a scan needs, through one reused buffer."""
    return warm_page_cache([w.random, w.pretrained, *w.finetuned])


def run_scan(w: ScanWorkload, out: Path, preset: str = "auto", plots: bool = True):
    res = transfer_fast.scan(w.finetuned, random=w.random, pretrained=w.pretrained, out=out,
                             preset=preset, plots=plots, progress=False)
    assert (res.done, res.failed, res.skipped) == (len(w.finetuned), 0, 0), res
    return res


def summary_rows(res) -> list[dict]:
    with open(res.summary_csv, newline="") as f:
        return list(csv.DictReader(f))


# ---- fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="session")
def scan_folder():
    """The folder holding the checkpoints of both formats, page cache warmed."""
    keep = os.environ.get(ENV_DIR)
    folder = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="tf-scan-bench-"))
    try:
        write_checkpoints(folder)
        for fmt in FORMATS:
            r, a, bs = _paths(folder, fmt, NUM_FINETUNED)
            warm_page_cache([r, a, *bs])
        yield folder
    finally:
        if keep:
            shutil.rmtree(folder / "runs", ignore_errors=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def scan_workloads(scan_folder):
    """get(fmt) -> ScanWorkload; the first call per format runs one untimed scan (imports
    the plotting, checks K) and rereads the files."""
    cache: dict[str, ScanWorkload] = {}

    def get(fmt: str) -> ScanWorkload:
        if fmt not in cache:
            w = workload(scan_folder, fmt)
            run_scan(w, w.runs / f"warmup-{fmt}")
            warm_page_cache([w.random, w.pretrained, *w.finetuned])
            cache[fmt] = w
        return cache[fmt]

    return get


# ---- tests --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_entries_agree(scan_workloads, fmt):
    """The entries compute the same numbers (so the times compare like for like)."""
    w = scan_workloads(fmt)
    res = run_scan(w, w.runs / f"agree-{fmt}", preset="paper")
    overall = [float(row["overall_T"]) for row in summary_rows(res)]
    few = ScanWorkload(w.folder, fmt, w.random, w.pretrained, w.finetuned[:2], w.runs)
    script = script_loop(few)
    measured = measure_loop(few)
    torch.testing.assert_close(torch.tensor(script), torch.tensor(measured), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(overall[:2]), torch.tensor(measured),
                               rtol=1e-9, atol=0)


def _fresh_out(w: ScanWorkload, entry: str):
    counter = iter(range(1 << 30))

    def setup():
        return (w.runs / f"{entry}-{w.fmt}-{next(counter)}",), {}

    return setup


CASES = [(fmt, entry) for fmt in FORMATS for entry in ENTRIES]


@pytest.mark.parametrize(("fmt", "entry"), CASES, ids=[f"{f}-{e}" for f, e in CASES])
def test_scan32(benchmark, request, scan_workloads, fmt, entry):
    w = scan_workloads(fmt)
    ours = entry.startswith("scan")
    describe(benchmark, group=f"scan{NUM_FINETUNED} [{fmt}]", entry=entry,
             device=str(scan_device().type) if ours else "cpu", nbytes=w.nbytes,
             format=fmt, checkpoints=len(w.finetuned), checkpoint_bytes=w.checkpoint_bytes,
             batch=min(batch_size(target_bytes(w)), len(w.finetuned)) if ours else 1)
    rounds = max(1, request.config.getoption("benchmark_min_rounds"))
    if ours:
        preset = "paper" if entry == "scan_paper" else "auto"

        def target(out):
            return run_scan(w, out, preset=preset, plots=entry != "scan_tables")

        kwargs = dict(setup=_fresh_out(w, entry))
    else:
        fn = globals()[entry]

        def target():
            return fn(w)

        kwargs = {}
    with preemption_counted(benchmark):
        benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0, **kwargs)


# ---- the marginal cost per checkpoint -------------------------------------------------

MARGINAL_HEAD = 8  # checkpoints of the short scan; the other 24 are the margin


def marginal_round(w: ScanWorkload, tag: str) -> dict[str, float]:
    """One paired round: seconds of scan(all), scan(first 8) and the bare read of the
    other files; the marginal and bare seconds per checkpoint and their ratio, in wall
    time and in CPU time of the process (all threads: steadier on a shared machine)."""
    cpu: list[float] = []

    def timed(fn) -> float:
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - start_cpu)
        return time.perf_counter() - start

    head = ScanWorkload(w.folder, w.fmt, w.random, w.pretrained, w.finetuned[:MARGINAL_HEAD],
                        w.runs)
    rest = ScanWorkload(w.folder, w.fmt, w.random, w.pretrained, w.finetuned[MARGINAL_HEAD:],
                        w.runs)
    shutil.rmtree(w.runs / f"margin-all-{tag}", ignore_errors=True)
    shutil.rmtree(w.runs / f"margin-head-{tag}", ignore_errors=True)
    t_all = timed(lambda: run_scan(w, w.runs / f"margin-all-{tag}", plots=False))
    t_head = timed(lambda: run_scan(head, w.runs / f"margin-head-{tag}", plots=False))
    t_read = timed(lambda: bare_read(rest.finetuned))
    n = len(rest.finetuned)
    marginal, bare = (t_all - t_head) / n, t_read / n
    marginal_cpu, bare_cpu = (cpu[0] - cpu[1]) / n, cpu[2] / n
    return {"all_s": t_all, "head_s": t_head, "read_s": t_read, "marginal_s": marginal,
            "bare_s": bare, "ratio": marginal / bare, "marginal_cpu_s": marginal_cpu,
            "bare_cpu_s": bare_cpu, "cpu_ratio": marginal_cpu / bare_cpu}


@pytest.mark.parametrize("fmt", FORMATS)
def test_marginal_cost_per_checkpoint(benchmark, request, scan_workloads, fmt):
    """The scan's cost per extra checkpoint against the bare read of its bytes."""
    w = scan_workloads(fmt)
    benchmark.group = f"scan marginal [{fmt}]"
    rounds = max(1, request.config.getoption("benchmark_min_rounds"))
    results = []
    counter = iter(range(1 << 30))
    benchmark.pedantic(lambda: results.append(marginal_round(w, f"{fmt}-{next(counter)}")),
                       rounds=rounds, iterations=1, warmup_rounds=0)
    ratios = [r["ratio"] for r in results]
    benchmark.extra_info.update(
        entry="marginal", format=fmt, bytes=w.checkpoint_bytes, goal=1.3,
        ratios=[round(x, 3) for x in ratios], ratio_median=statistics.median(ratios),
        cpu_ratio_median=statistics.median(r["cpu_ratio"] for r in results),
        marginal_ms=1e3 * statistics.median(r["marginal_s"] for r in results),
        bare_ms=1e3 * statistics.median(r["bare_s"] for r in results),
        batch=min(batch_size(target_bytes(w)), len(w.finetuned)), device=scan_device().type,
        threads=torch.get_num_threads())


def main() -> None:
    """Prints the marginal cost per checkpoint of each format, round by round."""
    import argparse

    parser = argparse.ArgumentParser(description="marginal scan cost per checkpoint")
    parser.add_argument("--folder", type=Path, default=None,
                        help="checkpoints folder (written if needed, kept); default: temporary")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    args = parser.parse_args()
    folder = args.folder or Path(tempfile.mkdtemp(prefix="tf-scan-bench-"))
    try:
        write_checkpoints(folder)
        for fmt in args.formats:
            w = workload(folder, fmt)
            warm_page_cache([w.random, w.pretrained, *w.finetuned])
            run_scan(w, w.runs / f"warmup-{fmt}", plots=False)
            results = [marginal_round(w, f"{fmt}-{i}") for i in range(args.rounds)]
            for r in results:
                print(f"{fmt}: scan {r['all_s']:.2f} s, head {r['head_s']:.2f} s -> "
                      f"{1e3 * r['marginal_s']:.1f} ms/ckpt; bare read "
                      f"{1e3 * r['bare_s']:.1f} ms/ckpt; ratio {r['ratio']:.2f} "
                      f"(CPU time {1e3 * r['marginal_cpu_s']:.1f} / "
                      f"{1e3 * r['bare_cpu_s']:.1f} ms: {r['cpu_ratio']:.2f})")
            ratios = [r["ratio"] for r in results]
            print(f"{fmt}: K = {min(batch_size(target_bytes(w)), NUM_FINETUNED)}, median "
                  f"ratio {statistics.median(ratios):.2f} (goal <= 1.3), min {min(ratios):.2f};"
                  f" CPU time: median "
                  f"{statistics.median(r['cpu_ratio'] for r in results):.2f}")
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            shutil.rmtree(folder / "runs", ignore_errors=True)


if __name__ == "__main__":
    main()
