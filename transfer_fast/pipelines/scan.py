"""Many-model scans: T of every fine-tuned checkpoint, streamed, batched, resumable, sharded.

Checkpoints are files, Hugging Face folders or index files, read shard by shard. Per
architecture the plan's tensors get one flat layout and θr, θA are packed into it
once (scan_packed.py); each batch of K fine-tuned targets is read straight from the
files into a reused (K, L) buffer and reduced by one `packed_distance` call, while
reader threads fill the other buffer with the next batch and a prefetch thread opens
the batch after it. --max-memory bounds the targets in flight and so sets K. Under
torchrun each rank takes every world_size-th pending checkpoint and rank 0 writes the
tables.
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

from ..errors import TransferFastError, first_few
from ..io.files import refuse_overwriting_inputs
from ..io.streaming import checkpoint_key, open_streamed
from ..measure.plan import Plan
from ..measure.presets import load_groups
from ..measure.transferability import check_metric, result_from_sums
from .scan_journal import RunFolder, ScanRecord, ScanRow, read_manifest, validate_rows
from .scan_packed import Arch, Buffers, make_arch, read_row, reduce_part

SEGMENT_ELEMS = 1 << 26  # a tensor larger than this is read and reduced in pieces of it
MAX_BATCH = 64
DEFAULT_BUDGET_CAP = 2 << 30  # default bytes of targets in flight, at most
READ_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))


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


def default_memory_budget(device: torch.device) -> int:
    """Bytes the targets in flight may take: a quarter of the available RAM, at most
    DEFAULT_BUDGET_CAP, and on a GPU at most half its free memory."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f
                         if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        avail = 4 << 30
    budget = min(avail // 4, DEFAULT_BUDGET_CAP)
    if device.type == "cuda":
        budget = min(budget, torch.cuda.mem_get_info(device)[0] // 2)
    return budget


def batch_size(target_bytes: int, budget: int) -> int:
    """K: how many targets of `target_bytes` fit twice (two buffers) in `budget`."""
    return max(1, min(MAX_BATCH, budget // max(1, 2 * target_bytes)))


def _open(path: str, key: str | None = None):
    """Opens one checkpoint (headers, a pickle's offsets, an index and its shards); runs in
    the prefetch thread. Returns (the open checkpoint or None, why not)."""
    try:
        return open_streamed(path, key=key), ""
    except TransferFastError as exc:
        return None, str(exc)
    except Exception as exc:  # any unreadable file is a failed row, never the scan's end
        return None, f"{path}: {type(exc).__name__}: {exc}"


@dataclass
class _Group:
    """The members of one batch that share an architecture, and their sums so far."""

    arch: Arch
    members: list  # [(ScanRow, open checkpoint)]
    sums: torch.Tensor  # float64 (2, K, T, 5), filled part by part
    broken: dict[int, str] = field(default_factory=dict)  # member -> why its read failed


@dataclass
class _Batch:
    opened: list  # [(ScanRow, open checkpoint or None, error)]
    records: dict[str, ScanRecord]
    groups: list[_Group]
    start: float = 0.0


class _PairScan:
    """All checkpoints fine-tuned from one (θr, θA) pair: the anchors kept open, an Arch per
    architecture, and the pipelined reading and reduction of the batches."""

    def __init__(self, random: str, pretrained: str, opts: dict, budget: int):
        self.opts, self.budget = opts, budget
        self.labels = [f"random ({random})", f"pretrained ({pretrained})",
                       "the fine-tuned set"]
        self.anchors = []
        try:
            for path in (random, pretrained):
                self.anchors.append(open_streamed(path, key=opts.get("key")))
        except Exception as exc:
            self.close()
            if isinstance(exc, TransferFastError):
                raise
            raise TransferFastError(f"{path}: {type(exc).__name__}: {exc}") from exc
        self.anchor_keys = [ck.key for ck in self.anchors]
        self.archs: dict[tuple, Arch | str] = {}
        self.first_plan: Plan | None = None
        pretrained_ck = self.anchors[1]
        self.target_bytes = sum(math.prod(s) * pretrained_ck.meta(n).element_size()
                                for n, s in pretrained_ck.shapes.items()
                                if pretrained_ck.meta(n).is_floating_point())
        self.batch = batch_size(self.target_bytes, budget)

    def close(self) -> None:
        for ck in self.anchors:
            ck.close()

    def _arch(self, ck) -> Arch | str:
        """The Arch of this checkpoint's architecture, or why it cannot be measured."""
        key = tuple(sorted((n, s, ck.meta(n).dtype) for n, s in ck.shapes.items()))
        if key not in self.archs:
            try:
                self.archs[key] = make_arch(
                    self.anchors, ck, self.labels, self.opts,
                    part_bytes=self.budget // (2 * self.batch), segment=SEGMENT_ELEMS,
                    device=self.opts["device"])
            except TransferFastError as exc:  # cached as text: no traceback holds buffers
                self.archs[key] = str(exc)
        return self.archs[key]

    def _prepare(self, opened: list) -> _Batch:
        """Groups a batch by architecture; checkpoints that cannot be measured fail here."""
        batch = _Batch(opened, {}, [])
        by_arch: dict[int, _Group] = {}
        for row, ck, error in opened:
            arch = self._arch(ck) if ck is not None else error
            if isinstance(arch, str):
                batch.records[row.resolved] = self._failed(
                    row, f"{row.path}: {arch}" if ck is not None else arch)
                continue
            if id(arch) not in by_arch:
                by_arch[id(arch)] = _Group(arch, [], None)
                batch.groups.append(by_arch[id(arch)])
            by_arch[id(arch)].members.append((row, ck))
        for group in batch.groups:
            group.sums = torch.zeros(2, len(group.members), len(group.arch.plan.names), 5,
                                     dtype=torch.float64)
        return batch

    def _units(self, batches):
        """(batch, group, part index, whether it ends the batch) in order; a batch with
        nothing to reduce is one (batch, None, -1, True)."""
        for opened in batches:
            batch = self._prepare(opened)
            units = [(g, p) for g in batch.groups for p in range(len(g.arch.parts))]
            if not units:
                yield batch, None, -1, True
            for i, (group, p) in enumerate(units):
                yield batch, group, p, i == len(units) - 1

    def run(self, batches, buffers: Buffers, readers: ThreadPoolExecutor):
        """Records of each batch of `batches` (lists of opened rows), batch by batch. The
        readers fill the next part's buffer (of this batch or the next) while this one
        is reduced."""
        units = self._units(batches)
        current, slot = next(units, None), 0
        pending = self._submit(current, slot, buffers, readers)
        while current is not None:
            batch, group, p, last = current
            following = next(units, None)  # opens and plans the next batch meanwhile
            if group is not None:
                batch.start = batch.start or time.perf_counter()
                host, futures = pending
                for k, future in enumerate(futures):
                    why = future.result()
                    if why:
                        group.broken.setdefault(k, why)
                slot = 1 - slot  # the other buffer: its last reduction is done
            pending = self._submit(following, slot, buffers, readers)
            if group is not None:
                part = group.arch.parts[p]
                sums = reduce_part(part, buffers.on_device(host), self.opts["backend"])
                group.sums.index_add_(2, part.index, sums)
            if last:
                yield self._finish(batch)
            current = following

    def _submit(self, unit, slot: int, buffers: Buffers, readers: ThreadPoolExecutor):
        """Starts reading `unit`'s part of every member into host buffer `slot`."""
        if unit is None or unit[1] is None:
            return None
        _, group, p, _ = unit
        part = group.arch.parts[p]
        host = buffers.host(slot, (len(group.members), part.layout.length), group.arch.dtype)
        futures = [readers.submit(_fill, ck, part.reads, host[k], k in group.broken)
                   for k, (_, ck) in enumerate(group.members)]
        return host, futures

    def _finish(self, batch: _Batch) -> list[ScanRecord]:
        """The records of a reduced batch, in its order; closes its checkpoints."""
        for group in batch.groups:
            arch, sums = group.arch, group.sums
            self.first_plan = self.first_plan or arch.plan
            # A NaN/Inf makes its set's sum of squares non-finite: only then look closer.
            bad = [f"{arch.plan.names[t]} in {self.labels[i]}" for i, t in
                   (~torch.isfinite(sums[:, 0, :, 3])).nonzero().tolist()
                   if not torch.isfinite(arch.anchor_values(i, t)).all()]
            for k, (row, ck) in enumerate(group.members):
                why = group.broken.get(k) or ck.changed() or (
                    f"NaN or Inf in {first_few(bad, 3)}" if bad else "")
                batch.records[row.resolved] = (self._failed(row, why) if why
                                               else self._record(row, ck, arch, sums[:, k]))
        seconds = (time.perf_counter() - batch.start) / max(1, len(batch.opened)) \
            if batch.start else 0.0
        out = []
        for row, ck, _ in batch.opened:
            batch.records[row.resolved].seconds = seconds  # the batch, shared evenly
            out.append(batch.records[row.resolved])
            if ck is not None:
                ck.close()
        return out

    def _record(self, row: ScanRow, ck, arch: Arch, sums: torch.Tensor) -> ScanRecord:
        plan = arch.plan
        bad = [t for t, sq in enumerate(sums[0, :, 4].tolist()) if not math.isfinite(sq)]
        try:
            bad = [plan.names[t] for t in bad
                   if not torch.isfinite(ck.load(arch.names[2][t])).all()]
        except Exception as exc:  # cut short while NaN/Inf were being named
            return self._failed(row, str(exc))
        if bad:
            return self._failed(row, f"{row.path}: NaN or Inf in {first_few(bad, 3)}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = result_from_sums(sums, plan, arch.numel, metric=self.opts["metric"])
        return ScanRecord(row.resolved, ck.key, self.anchor_keys, "ok", groups=list(res.groups),
                          d_random=list(res.d_random), d_pretrained=list(res.d_pretrained),
                          T=list(res.values), overall=res.overall, options=options(self.opts),
                          excluded=dict(res.excluded))

    def _failed(self, row: ScanRow, error: str) -> ScanRecord:
        return _failed(row, error, self.opts, self.anchor_keys)


def _fill(ck, reads, row: torch.Tensor, skip: bool) -> str:
    """Reads one target's part into its row; returns why it failed ('' when it did not)."""
    if skip:  # an earlier part of this target failed: its sums are discarded anyway
        return ""
    try:
        read_row(ck, reads, row)
    except Exception as exc:  # a file cut short under the scan
        return str(exc) or type(exc).__name__
    return ""


def options(opts: dict) -> dict:
    """The options a record's numbers depend on (not the backend: all agree); the
    planning options only when set, so folders made before them stay valid."""
    out = {"metric": opts["metric"], "preset": opts["preset"]}
    for name in ("groups", "classifier", "key", "strict"):
        if opts.get(name):
            out[name] = opts[name]
    return out


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


def _opened(pool: ThreadPoolExecutor, batches: list[list[ScanRow]], key: str | None):
    """Each batch's [(row, open checkpoint or None, error)]; the next batch opens in `pool`
    while this one is read and reduced."""
    submit = (lambda row: pool.submit(_open, row.path)) if key is None else (  # noqa: E731
        lambda row: pool.submit(_open, row.path, key))
    ahead = [submit(row) for row in batches[0]] if batches else []
    for i, current in enumerate(batches):
        opened = [(row, *future.result()) for row, future in zip(current, ahead)]
        if i + 1 < len(batches):
            ahead = [submit(row) for row in batches[i + 1]]
        yield opened


def _scan_rows(rows: list[ScanRow], folder: RunFolder, opts: dict, budget: int, bar
               ) -> tuple[int, Plan | None]:
    """Measures `rows`, appending each record to the journal; returns how many failed and
    the first plan used."""
    failed, plan = 0, None
    buffers = Buffers(opts["device"])
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool, \
            ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="read") as readers:
        for (random, pretrained), pair_rows in _pairs(rows).items():
            try:
                pair = _PairScan(random, pretrained, opts, budget)
            except TransferFastError as exc:  # a bad θr/θA fails its rows, not the scan
                for row in pair_rows:
                    folder.append(_failed(row, str(exc), opts))
                    bar.update(1)
                failed += len(pair_rows)
                continue
            try:
                k = pair.batch
                batches = [pair_rows[i:i + k] for i in range(0, len(pair_rows), k)]
                for records in pair.run(_opened(pool, batches, opts.get("key")), buffers,
                                        readers):
                    for record in records:
                        folder.append(record)
                        failed += record.status != "ok"
                        bar.update(1)
            finally:
                pair.close()
            plan = plan or pair.first_plan
    return failed, plan


def scan(finetuned=None, *, random=None, pretrained=None, manifest=None, out,
         preset: str = "auto", metric: str = "l1_mean", backend: str = "auto",
         groups=None, classifier: str | None = None, key: str | None = None,
         strict: bool = False, max_memory: int | None = None, pairwise: bool = False,
         plots: bool = True, progress: bool = True) -> ScanResult:
    """T of every fine-tuned checkpoint in `finetuned` (paths) or `manifest` (a CSV with a
    `path` column, optional `random`/`pretrained` columns and any user columns), into
    the run folder `out`: results.csv, summary.csv, excluded.csv, T_heatmap.png,
    T_curves.png.

    Every checkpoint (fine-tuned, θr, θA) is a file (.safetensors, .pt/.pth/.bin), a
    Hugging Face model folder or a `*.index.json`; sharded ones are read shard by shard.
    Differing prefixes ('bert.' in one, none in another) are lined up per architecture.
    `groups` (a .toml/.json file or a list of {name, pattern}), `classifier`, `strict`
    go to `make_plan` and `key` picks the wrapped state dict in every torch file, as in
    `transferability`; all four are recorded in the run folder's options.

    Resumable: checkpoints already measured (same resolved path, size and mtime, same
    θr and θA, same options) are skipped. A checkpoint that cannot be measured, or
    that changes while it is read, becomes a `failed` row; the scan goes on.
    `max_memory` bounds the bytes of targets in flight (default: a quarter of the
    available RAM, at most 2 GiB, and at most half the free GPU memory): it sets K, the
    targets per batch, and splits a model too large for it into parts.
    The folder is locked while the scan runs: a second scan of it fails at once.
    """
    check_metric(metric)
    plan_options = {"strict": bool(strict), "key": key, "classifier": classifier}
    if groups is not None:
        rules, file_classifier = load_groups(groups)  # a bad file fails before the scan
        plan_options.update(groups=[list(r) for r in rules],
                            classifier=classifier if classifier is not None else file_classifier)
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
                     manifest=manifest, plan_options=plan_options)
    finally:
        if started:  # a process group left to interpreter exit aborts in gloo's threads
            import torch.distributed as dist

            dist.destroy_process_group()


def _inputs(rows: list[ScanRow], manifest) -> list:
    """Every input path, a folder's files included (an --out inside a model folder must not
    overwrite its config.json)."""
    paths = [manifest, *(p for r in rows for p in (r.path, r.random, r.pretrained))]
    inside = [f for p in paths if p is not None and Path(p).is_dir()
              for f in Path(p).iterdir() if f.is_file()]
    return paths + inside


def _scan(rows, user_columns, out, rank, world, device, *, preset, metric, backend, max_memory,
          pairwise, plots, progress, random, pretrained, manifest, plan_options) -> ScanResult:
    opts = {"preset": preset, "metric": metric, "backend": backend, "device": device,
            **plan_options}
    config = {"preset": preset, "metric": metric, "columns": user_columns,
              "random": str(random) if random else None,
              "pretrained": str(pretrained) if pretrained else None,
              **{k: v for k, v in options(opts).items() if k not in ("preset", "metric")}}
    folder = RunFolder(out, config, rank)
    error = ""
    if rank == 0:
        try:
            refuse_overwriting_inputs(folder.outputs(), _inputs(rows, manifest))
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
        bar = tqdm(total=len(mine), unit="ckpt",
                   desc=f"scan rank {rank}" if world > 1 else "scan",
                   disable=None if progress else True)
        try:
            failed, plan = _scan_rows(mine, folder, opts, budget, bar)
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
        return (record.key == checkpoint_key(row.path)
                and record.anchors == [checkpoint_key(row.random),
                                       checkpoint_key(row.pretrained)])
    except (OSError, TransferFastError):  # gone since: measuring it again names the problem
        return False
