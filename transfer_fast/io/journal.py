"""Append-only JSON-lines journals: one record per finished item, crash-safe.

Each record is one line written with a single `write` and fsynced, so a kill loses at
most the item in flight; a torn last line (no newline) is not a record, and the next
append cuts it first so that every record starts on a line of its own. Used by the
scan's per-rank journals and by `rank`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import TransferFastError

_FRESH = "the run folder is corrupt; choose another --out or delete that file"


def _cut_torn_tail(fd: int) -> None:
    """Truncates a last line without its newline (a write a kill interrupted)."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return
    data = os.pread(fd, size, 0)
    os.ftruncate(fd, data.rfind(b"\n") + 1)


def append(path: str | Path, record: dict) -> None:
    """Appends `record` as one JSON line, flushed and fsynced.

    Raises:
        TransferFastError: naming the journal when it cannot be written.
    """
    line = (json.dumps(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _cut_torn_tail(fd)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise TransferFastError(f"{path}: cannot write ({exc.strerror})") from exc


def read(path: str | Path, what: str = "journal record") -> list[tuple[int, dict]]:
    """(line number, record) of every complete line (none when the file does not exist).

    Raises:
        TransferFastError: naming the file and line when a complete line is not UTF-8 or
            not a JSON object (`what` names what it should have been).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise TransferFastError(f"{path}: unreadable ({exc.strerror})") from exc
    records = []
    for number, line in enumerate(data.split(b"\n")[:-1], 1):  # after the last \n: torn
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise TransferFastError(f"{path}: line {number} is not UTF-8 text: {_FRESH}") from None
        except (ValueError, RecursionError) as exc:
            raise TransferFastError(f"{path}: line {number} is not a {what} "
                                    f"({str(exc)[:80]}): {_FRESH}") from None
        if not isinstance(record, dict):
            raise TransferFastError(f"{path}: line {number} is not a {what} (a "
                                    f"{type(record).__name__}): {_FRESH}")
        records.append((number, record))
    return records
