"""The run folder of a scan: a crash-safe journal per rank, and the tables made from it.

Each finished checkpoint is one JSON line appended to `journal.rank<R>.jsonl` with a
single write, flushed and fsynced: a `kill -9` loses at most the checkpoints in
flight, and a torn last line is simply not a record. `results.csv` and
`summary.csv` are views of the journals in manifest order, replaced atomically, so
a resumed run writes the same tables as an uninterrupted one.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from ..errors import TransferFastError
from ..io.files import atomic_write

RESULT_COLUMNS = ("group", "d_random", "d_pretrained", "T")
SUMMARY_COLUMNS = ("overall_T", "status", "error", "seconds")


def file_key(path: str | Path) -> list:
    """What identifies a finished checkpoint: its path, size and modification time."""
    st = os.stat(path)
    return [str(path), st.st_size, st.st_mtime_ns]


class RunFolder:
    """A scan's output folder, bound to the options (`config`) that made it."""

    def __init__(self, out: str | Path, config: dict, rank: int = 0):
        self.out = Path(out)
        self.config = config
        self.journal = self.out / f"journal.rank{rank}.jsonl"
        self._repaired = False

    def prepare(self) -> None:
        """Creates the folder and records the config; refuses a folder made differently."""
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_text("")
            probe.unlink()
        except OSError as exc:
            raise TransferFastError(f"{self.out}: cannot write the run folder "
                                    f"({exc.strerror})") from exc
        path = self.out / "config.json"
        if path.exists():
            try:
                old = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise TransferFastError(f"{path}: unreadable; to start fresh, choose another "
                                        "--out or delete that folder") from exc
            diff = [f"{k}: {old.get(k)!r} then, {v!r} now" for k, v in self.config.items()
                    if old.get(k) != v]
            if diff:
                raise TransferFastError(
                    f"{self.out} holds a scan made with other options ({'; '.join(diff)}); "
                    "to start fresh, choose another --out or delete that folder")
        else:
            _replace(path, json.dumps(self.config, indent=2) + "\n")

    def records(self) -> dict[str, dict]:
        """The latest record of every checkpoint path, from the journals of all ranks."""
        latest: dict[str, dict] = {}
        for journal in sorted(self.out.glob("journal.rank*.jsonl")):
            with open(journal) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # the torn last line of a killed run
                    path = record["key"][0]
                    if path not in latest or record["time"] >= latest[path]["time"]:
                        latest[path] = record
        return latest

    def _repair(self) -> None:
        """Cuts a torn last line (a killed write) so the next record starts on its own line."""
        self._repaired = True
        if not self.journal.exists():
            return
        with open(self.journal, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, record: dict) -> None:
        """Adds one finished checkpoint to this rank's journal, durably."""
        if not self._repaired:
            self._repair()
        record["time"] = time.time_ns()
        line = json.dumps(record) + "\n"
        with open(self.journal, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def write_tables(self, rows: Iterable[dict], user_columns: list[str],
                     records: dict[str, dict]) -> tuple[Path, Path]:
        """results.csv and summary.csv of `records` for the manifest `rows`, in their order."""
        results, summary = [], []
        for row in rows:
            record = records.get(str(row["path"]))
            if record is None:
                continue
            user = [row["path"], *(row["columns"].get(c, "") for c in user_columns)]
            s = record["summary"]
            summary.append(user + [repr(s["overall_T"]), s["status"], s["error"],
                                   f"{s['seconds']:.3f}"])
            for g, dr, da, t in zip(record["groups"], record["d_random"],
                                    record["d_pretrained"], record["T"]):
                results.append(user + [g, repr(dr), repr(da), repr(t)])
        head = ["path", *user_columns]
        results_path, summary_path = self.out / "results.csv", self.out / "summary.csv"
        _replace(results_path, _csv([head + list(RESULT_COLUMNS), *results]))
        _replace(summary_path, _csv([head + list(SUMMARY_COLUMNS), *summary]))
        return results_path, summary_path


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _replace(path: Path, text: str) -> None:
    """Writes `text` to `path` atomically: readers see the old file or the new one."""
    atomic_write(path, lambda tmp: tmp.write_text(text))
