"""`transfer-fast rank`: which candidate backbone will transfer to this data set?

One pass of each candidate model over the data (on the GPU when present) feeds a
ScoreStats from the penultimate features and the model's own predictions: LogME,
H-score, regularised H-score, TransRate, NCE and LEEP per model, with its parameter
count as the obvious baseline. Every finished model is one journal line, so a rerun
skips what is done; `scores.csv` and `scores.png` are rewritten at the end.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import TransferFastError
from ..io import journal
from ..io.datasets import LoadedData, batches, load_dataset
from ..io.files import file_key, write_csv
from ..io.runfolder import claim
from ..measure.features import FeatureStats
from ..measure.score_stats import ScoreStats
from ..ops.devices import resolve_device
from ..report.figures import save_figure
from ..report.study_figures import scores_figure
from ..train.models import infer_in_channels, load_model
from .manifest_columns import RANK_RESERVED, check_user_columns

SCORES = ("logme", "hscore", "regularized_hscore", "transrate", "nce", "leep")
# TransRate keeps one D x D float64 Gram per class: above this it is skipped, not OOM.
MAX_CLASS_GRAM_BYTES = 1 << 30
MAX_MODELS = 100_000


@dataclass(frozen=True)
class Candidate:
    """One model to score: its checkpoint, architecture, label and the user's columns."""

    path: str
    arch: str
    label: str
    columns: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RankRecord:
    """The scores of one candidate (NaN where a score is undefined), or why it failed."""

    path: str
    label: str
    arch: str
    status: str
    error: str
    seconds: float
    samples: int
    params: int
    scores: dict


@dataclass(frozen=True)
class RankResult:
    out: Path
    records: list[RankRecord]
    table: Path
    figure: Path | None

    @property
    def failed(self) -> int:
        return sum(r.status != "ok" for r in self.records)


def read_manifest(path: str | Path, arch: str | None) -> list[Candidate]:
    """Candidates from a CSV with a `path` column, optional `arch` and `label` columns, and
    any columns of the user's (relative paths are taken from the manifest's folder)."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TransferFastError(f"{path}: unreadable manifest ({exc})") from exc
    if not rows or "path" not in rows[0]:
        raise TransferFastError(f"{path}: a manifest needs a 'path' column and one row or more")
    check_user_columns([k for k in rows[0] if k not in ("path", "arch", "label")],
                       RANK_RESERVED, path)
    out = []
    for i, row in enumerate(rows, 2):
        model_arch = row.get("arch") or arch
        if not model_arch:
            raise TransferFastError(f"{path}:{i}: no arch (an 'arch' column or --arch)")
        model = Path(row["path"])
        model = model if model.is_absolute() else path.parent / model
        extra = {k: v for k, v in row.items() if k not in ("path", "arch", "label")}
        out.append(Candidate(str(model), model_arch, row.get("label") or model.name, extra))
    return out


def candidates_from_paths(paths: list[str], arch: str | None) -> list[Candidate]:
    if not arch:
        raise TransferFastError("give --arch for model paths (or an 'arch' manifest column)")
    return [Candidate(str(p), arch, Path(p).name) for p in paths]


def rank(candidates: list[Candidate], data: str | Path, *, out: str | Path,
         batch_size: int = 64, image_size: int | None = None, device: str | None = None,
         backend: str = "auto", plots: bool = True, progress: bool = True) -> RankResult:
    """Scores every candidate on `data` (an image folder or an .npz) into the run folder.

    Args:
        candidates: from `read_manifest` or `candidates_from_paths`.
        data: the downstream data set with its labels.
        out: the run folder; rerunning it skips the candidates already scored.
    Returns:
        RankResult with one RankRecord per candidate, in the given order.
    Raises:
        TransferFastError: bad data, duplicate candidates, or a folder made with other
            options. A candidate that cannot be loaded or run becomes a failed record.
    """
    if not candidates or len(candidates) > MAX_MODELS:
        raise TransferFastError(f"give 1 to {MAX_MODELS} candidate models, got {len(candidates)}")
    seen = [str(Path(c.path).resolve()) for c in candidates]
    if len(set(seen)) != len(seen):
        raise TransferFastError("a candidate model is listed twice")
    out = Path(out)
    options = {"data": str(Path(data).resolve()), "batch_size": batch_size,
               "image_size": image_size}
    device = resolve_device(device, what="--device")
    with claim(out, options):
        return _rank(candidates, data, out, image_size, batch_size, device, backend, plots,
                     progress)


def _rank(candidates, data, out: Path, image_size, batch_size, device, backend, plots,
          progress) -> RankResult:
    done = {r["key"][0]: r for _, r in journal.read(out / "journal.jsonl", "rank record")}
    cache: dict[int | None, LoadedData] = {}
    records = []
    for c in tqdm(candidates, desc="models", unit="model", disable=None if progress else True):
        key = file_key(c.path) if Path(c.path).exists() else [str(Path(c.path).resolve())]
        old = done.get(key[0])
        if old is not None and old["key"] == key and old["record"]["status"] == "ok":
            records.append(RankRecord(**old["record"]))
            continue
        record = _score_one(c, data, cache, image_size, batch_size, device, backend, progress)
        journal.append(out / "journal.jsonl", {"key": key, "record": asdict(record)})
        records.append(record)
    table = _write_table(out / "scores.csv", candidates, records)
    figure = None
    if plots and any(r.status == "ok" for r in records):
        ok = [r for r in records if r.status == "ok"]
        figure = save_figure(scores_figure([r.label for r in ok],
                                           {s: [r.scores[s] for r in ok] for s in SCORES}),
                             out / "scores.png")
    return RankResult(out, records, table, figure)


def _data_for(model: torch.nn.Module, data, cache: dict, image_size) -> LoadedData:
    channels = infer_in_channels(model.state_dict())
    if channels not in cache:
        cache[channels] = load_dataset(data, image_size=image_size, channels=channels)
    return cache[channels]


def _score_one(c: Candidate, data, cache, image_size, batch_size, device, backend,
               progress) -> RankRecord:
    start = time.perf_counter()
    try:
        model = load_model(c.arch, c.path).to(device)
        loaded = _data_for(model, data, cache, image_size)
        classes = len(loaded.classes)
        with FeatureStats(model, [], num_classes=classes, backend=backend) as probe:
            head = probe.penultimate
        if head is None:
            raise TransferFastError(f"{c.path}: {c.arch} has no nn.Linear head, so it has no "
                                    "penultimate features to score")
        dim = model.get_submodule(head).in_features
        scores = ScoreStats(dim, classes, device=device,
                            per_class_gram=classes * dim * dim * 8 <= MAX_CLASS_GRAM_BYTES)
        with FeatureStats(model, [], num_classes=classes, backend=backend, scores=scores,
                          source_probs=True) as stats:
            stats.accumulate(batches(loaded, batch_size), progress=progress,
                             desc=Path(c.path).name)
        values = {k: scores.compute().get(k, float("nan")) for k in SCORES}
        params = sum(p.numel() for p in model.parameters())
        return RankRecord(c.path, c.label, c.arch, "ok", "", time.perf_counter() - start,
                          stats.samples, params, values)
    except (TransferFastError, OSError, RuntimeError) as exc:
        error = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RankRecord(c.path, c.label, c.arch, "failed", error,
                          time.perf_counter() - start, 0, 0, dict.fromkeys(SCORES, float("nan")))


def _write_table(path: Path, candidates: list[Candidate], records: list[RankRecord]) -> Path:
    user = list(dict.fromkeys(k for c in candidates for k in c.columns))
    header = [*user, "path", "label", "arch", "N", "params", *SCORES, "status", "error",
              "seconds"]
    rows = [[*(c.columns.get(k, "") for k in user), r.path, r.label, r.arch, r.samples,
             r.params, *(repr(float(r.scores[s])) for s in SCORES), r.status, r.error,
             f"{r.seconds:.3f}"] for c, r in zip(candidates, records)]
    return write_csv(path, header, rows)

