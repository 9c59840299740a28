"""Many-model scans: T of every fine-tuned checkpoint, streamed, batched, resumable, sharded.

θr and θA are held in memory and read once per batch of K fine-tuned targets; the
targets are read piece by piece into reused buffers (streaming.py) and reduced a
call at a time, so memory stays bounded whatever K is. One thread opens the next
batch, another reads the next call's pieces while the kernel runs. Under torchrun
each rank takes every world_size-th pending checkpoint and rank 0 writes the tables.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import ops
from ..errors import TransferFastError, first_few
from ..io.files import file_key, refuse_overwriting_inputs
from ..io.streaming import StreamedCheckpoint
from ..measure.plan import Plan, make_plan, natural_key
from ..measure.transferability import check_metric, result_from_sums
from .scan_journal import RunFolder, ScanRecord, ScanRow, read_manifest, validate_rows

SEGMENT_ELEMS = 1 << 18  # elements per target per kernel call: 1 MB of float32
MAX_BATCH = 64


@dataclass
class ScanResult:
    """Where the tables went, the per-checkpoint status counts, every checkpoint's record
    (in manifest order, measured now or before) and the plan of this call's first
    measured architecture (None when it measured nothing)."""

    out: Path
    results_csv: Path
    summary_csv: Path
    done: int
    failed: int
    skipped: int
    rank: int = 0  # under torchrun, only rank 0 writes the tables
    records: list[ScanRecord] = field(default_factory=list)
    plan: Plan | None = None


def _segments(numels: list[int], size: int) -> list[list[tuple[int, int, int]]]:
    """Kernel calls of at most `size` elements each: (tensor, start, end) pieces in order."""
    calls, current, filled = [], [], 0
    for t, n in enumerate(numels):
        start = 0
        while start < n:
            take = min(n - start, size - filled)
            current.append((t, start, start + take))
            filled, start = filled + take, start + take
            if filled == size:
                calls.append(current)
                current, filled = [], 0
    return calls + ([current] if current else [])


def default_memory_budget(device: torch.device) -> int:
    """Bytes the targets in flight may take: half the free GPU memory, or a quarter of
    the available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        avail = 4 << 30
    return avail // 4


def _open(path: str) -> tuple[StreamedCheckpoint | None, str]:
    """Opens one checkpoint (its header, or its pickle's offsets); runs in the prefetch
    thread."""
    try:
        return StreamedCheckpoint(path), ""
    except TransferFastError as exc:
        return None, str(exc)
    except Exception as exc:  # any unreadable file is a failed row, never the scan's end
        return None, f"{path}: {type(exc).__name__}: {exc}"


def _load_anchor(path: str, device: torch.device) -> tuple[dict[str, torch.Tensor], list]:
    """θr or θA in memory (read with pread, no map a truncation could turn into SIGBUS),
    in load_state's order, and its file key."""
    with StreamedCheckpoint(path) as ck:
        names = list(ck.shapes)
        if ck.path.suffix == ".safetensors":  # as load_state orders them
            names.sort(key=natural_key)
        state = {n: ck.load(n).to(device) for n in names}
        changed = ck.changed()
        if changed:
            raise TransferFastError(changed)
        return state, ck.key


class _PairScan:
    """All checkpoints fine-tuned from one (θr, θA) pair: the Plan per architecture,
    the anchors on the device, and the batched, segmented reduction."""

    def __init__(self, random: str, pretrained: str, opts: dict):
        self.opts = opts
        self.labels = [f"random ({random})", f"pretrained ({pretrained})"]
        loaded = [_load_anchor(p, opts["device"]) for p in (random, pretrained)]
        self.shared = [state for state, _ in loaded]
        self.anchor_keys = [key for _, key in loaded]
        self.plans: dict[tuple, tuple | str] = {}
        self.first_plan: Plan | None = None
        self._buffers: list[list[torch.Tensor]] | None = None  # 2 sets, reused by every batch

    def _entry(self, ck: StreamedCheckpoint):
        """(plan, anchors, kernel calls, numel) for this architecture, or why it fails."""
        key = tuple(sorted((n, s, ck.meta(n).dtype) for n, s in ck.shapes.items()))
        if key not in self.plans:
            try:
                states = [*self.shared, {n: ck.meta(n) for n in ck.shapes}]
                plan = make_plan(states, self.opts["preset"],
                                 labels=[*self.labels, "the fine-tuned set"])
                anchors = [[s[n].reshape(-1) for n in plan.names] for s in self.shared]
                numels = [x.numel() for x in anchors[0]]
                self.plans[key] = (plan, anchors, _segments(numels, SEGMENT_ELEMS),
                                   torch.tensor(numels, dtype=torch.float64))
            except TransferFastError as exc:  # cached as text: no traceback holds the views
                self.plans[key] = str(exc)
        return self.plans[key]

    def _reduce(self, plan: Plan, anchors, calls, cks) -> tuple[torch.Tensor, dict[int, str]]:
        """(2, K, T, 5) sums: θr and θA read once, each target once; and {k: why} for the
        targets whose reads failed (their sums are of zeros, to be discarded). The
        targets' pieces of the next call are read (by a thread: pread and the kernel
        release the GIL) into one buffer set while the kernel reduces the other:
        2 x K x SEGMENT_ELEMS elements in flight."""
        device, backend = self.opts["device"], self.opts["backend"]
        dtypes = [cks[0].meta(n).dtype for n in plan.names]  # one architecture key: same
        pad = lambda nbytes: (nbytes + 15) // 16 * 16  # noqa: E731  (aligned typed views)
        need = max(sum(pad((e - s) * dtypes[t].itemsize) for t, s, e in call) for call in calls)
        bufs = self._buffers
        if bufs is None or len(bufs[0]) < len(cks) or bufs[0][0].numel() < need:
            self._buffers = bufs = [[torch.empty(need, dtype=torch.uint8) for _ in cks]
                                    for _ in range(2)]
        broken: dict[int, str] = {}

        def fill(call, buffers) -> list[list[torch.Tensor]]:
            b_sets = []
            for k, (ck, buf) in enumerate(zip(cks, buffers)):
                pieces, offset = [], 0
                for t, s, e in call:
                    piece = None
                    if k not in broken:
                        try:
                            piece = ck.read(plan.names[t], s, e, buf[offset:])
                        except Exception as exc:  # a file cut short under the scan
                            broken[k] = str(exc) or type(exc).__name__
                    if piece is None:
                        piece = buf[offset:offset + (e - s) * dtypes[t].itemsize].view(dtypes[t])
                        piece.zero_()
                    pieces.append(piece.to(device))
                    offset += pad(piece.numel() * piece.element_size())
                b_sets.append(pieces)
            return b_sets

        out = torch.zeros(2, len(cks), len(plan.names), 5, dtype=torch.float64)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read") as reader:
            ahead = reader.submit(fill, calls[0], bufs[0])
            for i, call in enumerate(calls):
                b_sets = ahead.result()
                if i + 1 < len(calls):
                    ahead = reader.submit(fill, calls[i + 1], bufs[(i + 1) % 2])
                index = [t for t, _, _ in call]
                a_sets = [[anc[t][s:e] for t, s, e in call] for anc in anchors]
                out[:, :, index] += ops.multi_tensor_distance(a_sets, b_sets,
                                                              backend=backend).cpu()
        return out, broken

    def run_batch(self, opened: list[tuple[ScanRow, StreamedCheckpoint | None, str]]
                  ) -> list[ScanRecord]:
        """Records for one batch; checkpoints that cannot be measured become failed rows."""
        start = time.perf_counter()
        records: dict[str, ScanRecord] = {}
        by_plan: dict[int, tuple] = {}
        for row, ck, error in opened:
            entry = self._entry(ck) if ck is not None else error
            if isinstance(entry, str):
                records[row.resolved] = self._failed(row, f"{row.path}: {entry}"
                                                     if ck is not None else entry)
            else:
                by_plan.setdefault(id(entry), (entry, []))[1].append((row, ck))
        for (plan, anchors, calls, numel), members in by_plan.values():
            self.first_plan = self.first_plan or plan
            sums, broken = self._reduce(plan, anchors, calls, [ck for _, ck in members])
            # A NaN/Inf makes its set's sum of squares non-finite: only then look closer.
            bad = [f"{plan.names[t]} in {self.labels[i]}" for i, t in
                   (~torch.isfinite(sums[:, 0, :, 3])).nonzero().tolist()
                   if not torch.isfinite(anchors[i][t]).all()]
            for k, (row, ck) in enumerate(members):
                why = broken.get(k) or ck.changed() or (
                    f"NaN or Inf in {first_few(bad, 3)}" if bad else "")
                records[row.resolved] = (self._failed(row, why) if why
                                         else self._record(row, ck, plan, sums[:, k], numel))
        seconds = (time.perf_counter() - start) / max(1, len(opened))
        out = []
        for row, ck, _ in opened:
            records[row.resolved].seconds = seconds  # the batch, shared evenly
            out.append(records[row.resolved])
            if ck is not None:
                ck.close()
        return out

    def _record(self, row: ScanRow, ck: StreamedCheckpoint, plan: Plan, sums: torch.Tensor,
                numel) -> ScanRecord:
        bad = [n for n, sq in zip(plan.names, sums[0, :, 4].tolist()) if not math.isfinite(sq)]
        try:
            bad = [n for n in bad if not torch.isfinite(ck.load(n)).all()]
        except Exception as exc:  # cut short while NaN/Inf were being named
            return self._failed(row, str(exc))
        if bad:
            return self._failed(row, f"{row.path}: NaN or Inf in {first_few(bad, 3)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = result_from_sums(sums, plan, numel, metric=self.opts["metric"])
        return ScanRecord(row.resolved, ck.key, self.anchor_keys, "ok", groups=list(res.groups),
                          d_random=list(res.d_random), d_pretrained=list(res.d_pretrained),
                          T=list(res.values), overall=res.overall, options=options(self.opts),
                          excluded=dict(res.excluded))

    def _failed(self, row: ScanRow, error: str) -> ScanRecord:
        return _failed(row, error, self.opts, self.anchor_keys)


def options(opts: dict) -> dict:
    """The options a record's numbers depend on (not the backend: all agree)."""
    return {"metric": opts["metric"], "preset": opts["preset"]}


def _failed(row: ScanRow, error: str, opts: dict, anchors: list | None = None) -> ScanRecord:
    """A checkpoint that could not be measured; retried by the next run."""
    return ScanRecord(row.resolved, [row.resolved, -1, -1], anchors or [], "failed",
                      error=error.splitlines()[0] if error else "failed", options=options(opts))


def _distributed(backend: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call started the process group) under
    torchrun, or (0, 1, device, False) for one process."""
    use_cuda = backend == "cuda" or (backend == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, started = 0, False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
            started = True
        rank = dist.get_rank()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    return rank, world, device, started


def _agree(world: int, error: str = "") -> None:
    """A barrier that also carries rank 0's error, so no rank waits on one that failed."""
    if world > 1:
        import torch.distributed as dist

        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise TransferFastError(error)


def _pairs(rows: list[ScanRow]) -> dict[tuple, list[ScanRow]]:
    groups: dict[tuple, list[ScanRow]] = {}
    for row in rows:
        groups.setdefault((row.random, row.pretrained), []).append(row)
    return groups


def _scan_rows(rows: list[ScanRow], folder: RunFolder, opts: dict, batch: int, bar
               ) -> tuple[int, Plan | None]:
    """Measures `rows`, appending each record to the journal; returns how many failed and
    the first plan used."""
    failed, plan = 0, None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        for (random, pretrained), pair_rows in _pairs(rows).items():
            try:
                pair = _PairScan(random, pretrained, opts)
            except TransferFastError as exc:  # a bad θr/θA fails its rows, not the scan
                for row in pair_rows:
                    folder.append(_failed(row, str(exc), opts))
                    bar.update(1)
                failed += len(pair_rows)
                continue
            batches = [pair_rows[i:i + batch] for i in range(0, len(pair_rows), batch)]
            ahead = [pool.submit(_open, row.path) for row in batches[0]]
            for i, current in enumerate(batches):
                opened = [(row, *future.result()) for row, future in zip(current, ahead)]
                if i + 1 < len(batches):  # the next batch opens while this one reduces
                    ahead = [pool.submit(_open, row.path) for row in batches[i + 1]]
                for record in pair.run_batch(opened):
                    folder.append(record)
                    failed += record.status != "ok"
                    bar.update(1)
            plan = plan or pair.first_plan
    return failed, plan


def scan(finetuned=None, *, random=None, pretrained=None, manifest=None, out,
         preset: str = "auto", metric: str = "l1_mean", backend: str = "auto",
         max_memory: int | None = None, pairwise: bool = False, plots: bool = True,
         progress: bool = True) -> ScanResult:
    """T of every fine-tuned checkpoint in `finetuned` (paths) or `manifest` (a CSV with a
    `path` column, optional `random`/`pretrained` columns and any user columns), into
    the run folder `out`: results.csv, summary.csv, excluded.csv, T_heatmap.png,
    T_curves.png.

    Resumable: checkpoints already measured (same resolved path, size and mtime, same
    θr and θA, same metric and preset) are skipped. A checkpoint that cannot be
    measured, or that changes while it is read, becomes a `failed` row; the scan goes
    on. `max_memory` bounds the bytes of targets in flight (default: a quarter of the
    free RAM, or half the free GPU memory) and so sets K, the targets per batch.
    The folder is locked while the scan runs: a second scan of it fails at once.
    """
    check_metric(metric)
    if manifest is not None:
        rows, user_columns = read_manifest(manifest, random, pretrained)
    else:
        rows = [ScanRow.of(p, random, pretrained) for p in (finetuned or [])]
        user_columns = []
    validate_rows(rows)
    rank, world, device, started = _distributed(backend)
    try:
        return _scan(rows, user_columns, out, rank, world, device, preset=preset, metric=metric,
                     backend=backend, max_memory=max_memory, pairwise=pairwise, plots=plots,
                     progress=progress, random=random, pretrained=pretrained,
                     manifest=manifest)
    finally:
        if started:  # a process group left to interpreter exit aborts in gloo's threads
            import torch.distributed as dist

            dist.destroy_process_group()


def _scan(rows, user_columns, out, rank, world, device, *, preset, metric, backend, max_memory,
          pairwise, plots, progress, random, pretrained, manifest) -> ScanResult:
    config = {"preset": preset, "metric": metric, "columns": user_columns,
              "random": str(random) if random else None,
              "pretrained": str(pretrained) if pretrained else None}
    folder = RunFolder(out, config, rank)
    opts = {"preset": preset, "metric": metric, "backend": backend, "device": device}
    error = ""
    if rank == 0:
        try:
            inputs = [manifest, *(p for r in rows for p in (r.path, r.random, r.pretrained))]
            refuse_overwriting_inputs(folder.outputs(), inputs)
            folder.prepare()
        except TransferFastError as exc:
            error = str(exc)
    try:
        _agree(world, error)
        records = folder.records()
        pending = [r for r in rows if not _is_done(records.get(r.resolved), r, opts)]
        _agree(world)  # every rank has read the journals before any rank appends to them
        mine = pending[rank::world]
        budget = max_memory or default_memory_budget(device)
        batch = max(1, min(MAX_BATCH, budget // (2 * SEGMENT_ELEMS * 4)))  # two buffer sets
        bar = tqdm(total=len(mine), unit="ckpt",
                   desc=f"scan rank {rank}" if world > 1 else "scan",
                   disable=None if progress else True)
        try:
            failed, plan = _scan_rows(mine, folder, opts, batch, bar)
        finally:
            bar.close()
        failed = _total(world, failed)  # also the barrier before rank 0 reads every journal
        records = folder.records()
        if rank == 0:
            from .scan_outputs import write_outputs

            write_outputs(folder, rows, user_columns, records, pairwise=pairwise, plots=plots,
                          preset=preset, backend=backend)
        _agree(world)
    finally:
        folder.release()
    return ScanResult(folder.out, folder.out / "results.csv", folder.out / "summary.csv",
                      done=len(pending) - failed, failed=failed,
                      skipped=len(rows) - len(pending), rank=rank,
                      records=[records[r.resolved] for r in rows if r.resolved in records],
                      plan=plan)


def _total(world: int, count: int) -> int:
    """The sum of `count` over all ranks."""
    if world == 1:
        return count
    import torch.distributed as dist

    counts = [0] * world
    dist.all_gather_object(counts, count)
    return sum(counts)


def _is_done(record: ScanRecord | None, row: ScanRow, opts: dict) -> bool:
    """Measured before from the same files under the same options: the checkpoint and
    both anchors unchanged."""
    if record is None or record.status != "ok" or record.options != options(opts):
        return False
    try:
        return (record.key == file_key(row.path)
                and record.anchors == [file_key(row.random), file_key(row.pretrained)])
    except OSError:  # gone since it was checked: measuring it again names the problem
        return False
