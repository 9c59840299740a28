"""The run folder of a scan: a crash-safe journal per rank, and the tables made from it.

Each finished checkpoint is one `ScanRecord` written as a JSON line to
`journal.rank<R>.jsonl` with a single write, flushed and fsynced: a `kill -9` loses
at most the checkpoints in flight, and a last line without its newline (a torn
write) is not a record. Any other line that is not a record means the folder is
corrupt, and that is reported naming the file and line. `results.csv`,
`summary.csv` and `excluded.csv` are views of the journals in manifest order,
replaced atomically, so a resumed run writes the same tables as an uninterrupted one.
"""

from __future__ import annotations

import csv
import math
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..errors import TransferFastError, first_few
from ..io import journal
from ..io.files import write_csv
from ..io.runfolder import Claim, claim

JOURNAL_FORMAT = 2  # in config.json: a folder written by another format is refused
RESULT_COLUMNS = ("group", "d_random", "d_pretrained", "T")
SUMMARY_COLUMNS = ("overall_T", "status", "error", "seconds", "excluded")
EXCLUDED_COLUMNS = ("tensor", "reason")
STATUSES = ("ok", "failed")


@dataclass
class ScanRow:
    """One checkpoint to measure. `path` is absolute as the user named it (the tables
    show it); `resolved` (symlinks followed) is what records are keyed by."""

    path: str
    resolved: str
    random: str | None
    pretrained: str | None
    columns: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, path, random=None, pretrained=None, columns=None) -> ScanRow:
        absolute = lambda p: os.path.abspath(p) if p else None  # noqa: E731
        return cls(absolute(path), str(Path(path).resolve()), absolute(random),
                   absolute(pretrained), dict(columns or {}))


@dataclass
class ScanRecord:
    """One measured (or failed) checkpoint, as journaled.

    `key` and `anchors` are [resolved path, size, mtime_ns] of the checkpoint and of
    θr, θA when it was read; `options` the measurement options (metric, preset) the
    numbers depend on. A record is reused only when all three still match.
    """

    path: str
    key: list
    anchors: list
    status: str
    error: str = ""
    seconds: float = 0.0
    groups: list[str] = field(default_factory=list)
    d_random: list[float] = field(default_factory=list)
    d_pretrained: list[float] = field(default_factory=list)
    T: list[float] = field(default_factory=list)
    overall: float = math.nan
    options: dict = field(default_factory=dict)
    excluded: dict[str, str] = field(default_factory=dict)  # tensor -> why left out
    time: int = 0  # ns since the epoch: the latest record of a path wins

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, obj) -> ScanRecord:
        """A record from a journal line; ValueError saying what is wrong with its shape."""
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        missing = sorted({"path", "key", "anchors", "status"} - set(obj))
        if unknown or missing:
            raise ValueError(f"unknown fields {unknown}" if unknown else f"no {missing}")
        record = cls(**obj)
        try:
            record._check()
        except TypeError:  # e.g. len() of a number where a list belongs
            raise ValueError("fields of the wrong type") from None
        return record

    def _check(self) -> None:
        def number(x) -> bool:
            return isinstance(x, int | float) and not isinstance(x, bool)

        def key(k) -> bool:
            return (isinstance(k, list) and len(k) == 3 and isinstance(k[0], str)
                    and all(isinstance(v, int) and not isinstance(v, bool) for v in k[1:]))

        problems = [
            (isinstance(self.path, str), "path is not a string"),
            (key(self.key), "key is not [path, size, mtime]"),
            (isinstance(self.anchors, list) and all(map(key, self.anchors)),
             "anchors are not a list of [path, size, mtime]"),
            (self.status in STATUSES, f"status {self.status!r} is not one of {STATUSES}"),
            (isinstance(self.error, str), "error is not a string"),
            (number(self.seconds) and number(self.overall) and isinstance(self.time, int),
             "seconds, overall or time is not a number"),
            (isinstance(self.groups, list) and all(isinstance(g, str) for g in self.groups),
             "groups are not a list of strings"),
            (all(isinstance(v, list) and len(v) == len(self.groups) and all(map(number, v))
                 for v in (self.d_random, self.d_pretrained, self.T)),
             "d_random, d_pretrained and T are not one number per group"),
            (isinstance(self.options, dict), "options are not an object"),
            (isinstance(self.excluded, dict)
             and all(isinstance(v, str) for v in self.excluded.values()),
             "excluded is not an object of strings"),
        ]
        bad = [why for ok, why in problems if not ok]
        if bad:
            raise ValueError(bad[0])


def record_options(opts: dict) -> dict:
    """The options a record's numbers depend on (not the backend: all agree); the
    planning options only when set, so folders made before they existed stay valid."""
    out = {"metric": opts["metric"], "preset": opts["preset"]}
    for name in ("groups", "classifier", "key", "strict"):
        if opts.get(name):
            out[name] = opts[name]
    return out


def failed_record(row: ScanRow, error: str, opts: dict, anchors: list | None = None
                  ) -> ScanRecord:
    """A checkpoint that could not be measured; retried by the next run."""
    return ScanRecord(row.resolved, [row.resolved, -1, -1], anchors or [], "failed",
                      error=error.splitlines()[0] if error else "failed",
                      options=record_options(opts))


def read_manifest(manifest: str | Path, random=None, pretrained=None):
    """Rows of a manifest CSV (`path`, optional `random`/`pretrained`, user columns);
    relative paths are taken from the manifest's folder. Returns (rows, user columns)."""
    manifest = Path(manifest)
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns, records = list(reader.fieldnames or []), list(reader)
    except OSError as exc:
        raise TransferFastError(f"{manifest}: cannot read the manifest ({exc.strerror})") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise TransferFastError(f"{manifest}: not a UTF-8 CSV file ({exc})") from exc
    if "path" not in columns:
        raise TransferFastError(f"{manifest}: no 'path' column (columns: {columns})")
    user_columns = [c for c in columns if c not in ("path", "random", "pretrained")]
    empty = [str(i + 2) for i, rec in enumerate(records) if not (rec["path"] or "").strip()]
    if empty:
        raise TransferFastError(f"{manifest}: empty path on line(s) {', '.join(empty)}")

    def cell(rec, column, default=None):
        value = (rec.get(column) or "").strip()
        return manifest.parent / value if value else default

    rows = [ScanRow.of(cell(rec, "path"), cell(rec, "random", random),
                       cell(rec, "pretrained", pretrained),
                       {c: (rec.get(c) or "").strip() for c in user_columns})
            for rec in records]
    return rows, user_columns


def validate_rows(rows: list[ScanRow]) -> None:
    """Every problem of the input at once, before anything is computed."""
    problems = []
    seen, dupes = set(), []
    for row in rows:  # two names of one file (a symlink) are one checkpoint
        if row.resolved in seen:
            dupes.append(row.path)
        seen.add(row.resolved)
    if not rows:
        problems.append("no fine-tuned checkpoints given")
    if dupes:
        problems.append(f"duplicated paths: {first_few(dupes)}")
    for role in ("random", "pretrained"):
        lacking = [row.path for row in rows if getattr(row, role) is None]
        if lacking:
            problems.append(f"no {role} set for {first_few(lacking, 3)}: give --{role} or a "
                            f"'{role}' column")
    named = {p for row in rows for p in (row.path, row.random, row.pretrained) if p is not None}
    missing = sorted(p for p in named if not Path(p).exists())
    if missing:
        problems.append(f"{len(missing)} file(s) do not exist: {first_few(missing)}")
    odd = sorted(p for p in named  # a folder is a Hugging Face checkpoint
                 if Path(p).exists() and not (Path(p).is_file() or Path(p).is_dir()))
    if odd:
        problems.append(f"not regular files or folders: {first_few(odd)}")
    if problems:
        raise TransferFastError("bad scan input: " + "; ".join(problems))


class RunFolder:
    """A scan's output folder, bound to the options (`config`) that made it."""

    def __init__(self, out: str | Path, config: dict, rank: int = 0):
        self.out = Path(out)
        self.config = {"journal_format": JOURNAL_FORMAT, **config}
        self.journal = self.out / f"journal.rank{rank}.jsonl"
        self._claim: Claim | None = None

    def prepare(self) -> None:
        """Creates and locks the folder and records the config; refuses a folder in use
        by another scan or made with other options."""
        self._claim = claim(self.out, self.config)

    def release(self) -> None:
        """Lets the next scan of this folder in."""
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    def outputs(self) -> list[Path]:
        """Every file a scan may write here (to refuse one that is an input)."""
        names = ("config.json", "results.csv", "summary.csv", "excluded.csv",
                 "T_heatmap.png", "T_curves.png", "pairwise.csv", "pairwise.png", ".lock")
        return [self.out / n for n in names] + list(self.out.glob("journal.rank*.jsonl"))

    def records(self) -> dict[str, ScanRecord]:
        """The latest record of every checkpoint (by resolved path), from every rank's
        journal; TransferFastError naming the file and line of anything corrupt."""
        latest: dict[str, ScanRecord] = {}
        for path in sorted(self.out.glob("journal.rank*.jsonl")):
            for number, raw in journal.read(path, "scan record"):
                try:
                    record = ScanRecord.from_json(raw)
                except (ValueError, TypeError, KeyError, AttributeError) as exc:
                    raise TransferFastError(
                        f"{path}: line {number} is not a scan record ({str(exc)[:80]}): the "
                        "run folder is corrupt; choose another --out or delete that file"
                    ) from None
                old = latest.get(record.path)
                if old is None or record.time >= old.time:
                    latest[record.path] = record
        return latest

    def append(self, record: ScanRecord) -> None:
        """Adds one finished checkpoint to this rank's journal, durably (one write)."""
        record.time = time.time_ns()
        journal.append(self.journal, record.to_json())

    def write_tables(self, rows: Iterable[ScanRow], user_columns: list[str],
                     records: dict[str, ScanRecord]) -> tuple[Path, Path]:
        """results.csv, summary.csv and excluded.csv of `records` for the manifest `rows`,
        in their order; every tensor a measurement left out is listed in excluded.csv."""
        results, summary, excluded = [], [], []
        for row in rows:
            record = records.get(row.resolved)
            if record is None:
                continue
            user = [row.path, *(row.columns.get(c, "") for c in user_columns)]
            summary.append(user + [repr(record.overall), record.status, record.error,
                                   f"{record.seconds:.3f}", len(record.excluded)])
            for g, dr, da, t in zip(record.groups, record.d_random, record.d_pretrained,
                                    record.T):
                results.append(user + [g, repr(dr), repr(da), repr(t)])
            excluded += [user + [name, why] for name, why in record.excluded.items()]
        head = ["path", *user_columns]
        paths = [self.out / n for n in ("results.csv", "summary.csv", "excluded.csv")]
        write_csv(paths[0], head + list(RESULT_COLUMNS), results)
        write_csv(paths[1], head + list(SUMMARY_COLUMNS), summary)
        write_csv(paths[2], head + list(EXCLUDED_COLUMNS), excluded)
        return paths[0], paths[1]
