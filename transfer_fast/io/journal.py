"""Append-only JSON-lines journals: one record per finished item, crash-safe.

Each record is one line written with a single `write` and fsynced, so a kill loses at
most the item in flight, and a torn last line (no newline) is simply not a record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import TransferFastError

# A journal line longer than this is not one we wrote (records are a few KB).
MAX_LINE_BYTES = 16 << 20


def append(path: str | Path, record: dict) -> None:
    """Appends `record` as one JSON line, flushed and fsynced."""
    line = (json.dumps(record, allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str | Path) -> list[dict]:
    """Every complete record of the journal (none when it does not exist).

    Raises:
        TransferFastError: naming the file and line when a complete line is not a JSON
            object (the journal was edited or belongs to something else).
    """
    path = Path(path)
    if not path.exists():
        return []
    if path.stat().st_size > MAX_LINE_BYTES * 1024:
        raise TransferFastError(f"{path}: {path.stat().st_size} bytes is too large for a journal")
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    complete = lines[:-1]  # what follows the last newline is a torn write
    records = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise TransferFastError(f"{path}:{number}: not a journal record ({exc}); delete "
                                    "the run folder to start fresh") from exc
        if not isinstance(record, dict):
            raise TransferFastError(f"{path}:{number}: not a journal record (a "
                                    f"{type(record).__name__}, expected an object)")
        records.append(record)
    return records
