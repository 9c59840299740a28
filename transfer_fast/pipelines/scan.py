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

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import TransferFastError
from ..io.files import refuse_overwriting_inputs
from ..io.sharded import checkpoint_key, open_streamed
from ..measure.plan import Plan
from ..measure.presets import load_groups
from ..measure.transferability import check_metric
from ..ops.devices import resolve_device
from .manifest_columns import SCAN_RESERVED, check_user_columns
from .scan_journal import (
    RunFolder,
    ScanRecord,
    ScanRow,
    failed_record,
    read_manifest,
    record_options,
    validate_rows,
)
from .scan_packed import Buffers
from .scan_pair import PairScan

SEGMENT_ELEMS = 1 << 26  # a tensor larger than this is read and reduced in pieces of it
DEFAULT_BUDGET_CAP = 1 << 30  # default bytes of targets in flight, at most
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


def _open(path: str, key: str | None = None):
    """Opens one checkpoint (headers, a pickle's offsets, an index and its shards); runs in
    the prefetch thread. Returns (the open checkpoint or None, why not)."""
    try:
        return open_streamed(path, key=key), ""
    except TransferFastError as exc:
        return None, str(exc)
    except Exception as exc:  # any unreadable file is a failed row, never the scan's end
        return None, f"{path}: {type(exc).__name__}: {exc}"


def _distributed(backend: str) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether this call started the process group) under
    torchrun, or (0, 1, device, False) for one process."""
    choice = {"cuda": "cuda", "auto": "auto"}.get(backend, "cpu")
    use_cuda = resolve_device(choice, what="--backend").type == "cuda"
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
                pair = PairScan(random, pretrained, opts, budget, SEGMENT_ELEMS)
            except TransferFastError as exc:  # a bad θr/θA fails its rows, not the scan
                for row in pair_rows:
                    folder.append(failed_record(row, str(exc), opts))
                    bar.update(1)
                failed += len(pair_rows)
                continue
            try:
                k = pair.batch
                batches = [pair_rows[i:i + k] for i in range(0, len(pair_rows), k)]
                for records in pair.run(_opened(pool, batches, opts.get("key")), buffers,
                                        readers, READ_THREADS):
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

    Resumable: checkpoints already measured (same resolved path, size and mtime, same
    θr and θA, same options) are skipped. A checkpoint that cannot be measured, or
    that changes while it is read, becomes a `failed` row; the scan goes on. θr and θA
    are held packed besides the targets (the plan's tensors). The folder is locked
    while the scan runs: a second scan of it fails at once. Under torchrun each rank
    takes every world_size-th pending checkpoint and rank 0 writes the tables.

    Args:
        finetuned: the fine-tuned checkpoints θB (paths), when no `manifest` is given.
        random: θr (a path) for every checkpoint; a manifest's `random` column, where
            filled, overrides it per row.
        pretrained: θA (a path) for every checkpoint; likewise the `pretrained` column.
        manifest: a CSV file with a `path` column, optional `random`/`pretrained`
            columns and any user columns (carried into results.csv); relative paths are
            taken from its folder. Used instead of `finetuned` when given.
        out: the run folder (created when missing; keyword, required).
        preset: the grouping of tensors into layer groups, as in `transferability`.
        metric: the distance D, one of METRICS, as in `transferability`.
        backend: "auto" (a GPU when there is one, else the CPU; the compiled kernel
            there, else pure torch), "cuda" (the GPU, an error without one), "cpu" or
            "torch" (on the CPU).
        groups: custom groups instead of the preset's: a .toml/.json file or a list of
            {name, pattern}.
        classifier: the classifier group or module, as in `transferability`.
        key: picks the wrapped state dict in every torch file, as in `transferability`
            (one name); None: the default choice.
        strict: as in `transferability`. `groups`, `classifier`, `strict` go to
            `make_plan`; these three and `key` are recorded in the run folder's options.
        max_memory: bounds the bytes of targets in flight, two host buffers of K
            targets (pinned on a GPU, whose one device buffer takes half as much again);
            None (default): a quarter of the available RAM, at most 1 GiB, and at most
            half the free GPU memory. It sets K, the targets per batch, and splits a
            model too large for it into parts; neither changes a number.
        pairwise: also write pairwise.csv (and, with `plots`, its figure): `similarity` of
            the updates of up to 64 measured checkpoints that share the most common
            grouping and the first one's θA (when there are 2 or more).
        plots: write T_heatmap.png and T_curves.png (False: the tables only).
        progress: show a progress bar of the checkpoints.
    Returns:
        ScanResult: the run folder and its results.csv and summary.csv, the counts
        `done`, `failed` and `skipped` (measured before), this process's `rank`, every
        checkpoint's record in manifest order, and the plan of the first architecture
        measured (None when nothing was).
    Raises:
        TransferFastError: an unknown metric; a bad groups file or list; a manifest that
            cannot be read, is not a UTF-8 CSV, lacks a `path` column, has an empty path
            or user columns that collide with the result columns; no checkpoints,
            duplicated paths, a checkpoint without θr or θA, or paths that do not exist
            or are not files or folders (all reported at once); backend "cuda" without a
            GPU; a run folder that would overwrite an input, is in use by another scan,
            was made with other options, cannot be written, or holds a corrupt config or
            journal; an unknown backend, or one that cannot run on the device; a table
            or figure that cannot be written; with `pairwise`, an error of `similarity`.
            Under torchrun, rank 0's folder errors are raised on every rank. A checkpoint
            (or θr/θA) that cannot be read, planned or measured is a failed row instead.
        OSError: a groups file or input model folder the system refuses to read or list
            (and, with `pairwise`, as in `similarity`).
    """
    check_metric(metric)
    plan_options = {"strict": bool(strict), "key": key, "classifier": classifier}
    if groups is not None:
        rules, file_classifier = load_groups(groups)  # a bad file fails before the scan
        plan_options.update(groups=[list(r) for r in rules],
                            classifier=classifier if classifier is not None else file_classifier)
    if manifest is not None:
        rows, user_columns = read_manifest(manifest, random, pretrained)
        check_user_columns(user_columns, SCAN_RESERVED, manifest)
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
              **{k: v for k, v in record_options(opts).items() if k not in ("preset", "metric")}}
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
                          preset=preset, backend=backend,
                          selection=plan_options)
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
    if record is None or record.status != "ok" or record.options != record_options(opts):
        return False
    try:
        return (record.key == checkpoint_key(row.path)
                and record.anchors == [checkpoint_key(row.random),
                                       checkpoint_key(row.pretrained)])
    except (OSError, TransferFastError):  # gone since: measuring it again names the problem
        return False
