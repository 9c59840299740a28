"""Claiming a run folder: one run at a time, and only under the options that made it.

`claim(out, config)` takes an exclusive, non-blocking `flock` on `out/.lock` (the
holder's pid written inside), then compares `config` with the marker file
(config.json) the folder was made with, or writes it. A second run on the same
folder fails at once, naming the folder and the pid that holds it; the kernel drops
the lock when its holder exits, even by `kill -9`, so a stale lock never blocks.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from collections.abc import Mapping
from pathlib import Path

from ..errors import TransferFastError
from .files import json_safe, write_json

LOCK_NAME = ".lock"
_FRESH = "to start fresh, choose another --out or delete that folder"


class Claim:
    """A held run folder; `release()` (or leaving a `with` block) lets the next run in."""

    def __init__(self, out: Path, marker: Path, lock):
        self.out, self.marker, self._lock = out, marker, lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the descriptor drops the flock
            self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _lock(out: Path):
    """The open lock file, locked; TransferFastError naming the folder and holder."""
    path = out / LOCK_NAME
    try:
        lock = open(path, "a+")  # held until Claim.release()
    except OSError as exc:
        raise TransferFastError(f"{out}: cannot write the run folder ({exc.strerror})") from exc
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.seek(0)
        holder = lock.read(32).strip()
        lock.close()
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise TransferFastError(f"{out}: in use by another run{pid}; wait for it to "
                                    "finish or choose another --out") from None
        raise TransferFastError(f"{out}: cannot lock the run folder ({exc.strerror})") from exc
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def _canonical(config: Mapping) -> dict:
    """config as it reads back from JSON (tuples as lists, inf as a string)."""
    return json.loads(json.dumps(json_safe(dict(config))))


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _differences(old, new, where: str = "") -> list[str]:
    """'key: old then, new now' for every differing leaf (nested objects by dotted key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in list(new) + [k for k in old if k not in new]
                for d in _differences(old.get(k), new.get(k), f"{where}{k}.")]
    if old == new:
        return []
    return [f"{where.rstrip('.')}: {_short(old)} then, {_short(new)} now"]


def read_marker(marker: Path) -> dict:
    """The JSON object in `marker`; TransferFastError naming it when it is not one."""
    try:
        old = json.loads(marker.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise TransferFastError(f"{marker}: unreadable ({exc.strerror})") from exc
    except (UnicodeDecodeError, ValueError, RecursionError):
        old = None
    if not isinstance(old, dict):
        raise TransferFastError(f"{marker}: corrupt (not a JSON object); {_FRESH}")
    return old


def claim(out: str | Path, config: Mapping, *, marker: str = "config.json",
          require_empty: bool = False) -> Claim:
    """Locks `out` for this run and binds it to `config` (a JSON-able mapping).

    Args:
        out: the run folder; created when missing.
        config: the options results in the folder depend on; a folder made with
            other values is refused, naming each difference.
        marker: the file in `out` that records `config`.
        require_empty: refuse a folder without `marker` that already holds files
            (so a run never mixes its outputs with unrelated ones).
    Returns:
        The held Claim; release it when the run ends (the lock also goes with the process).
    Raises:
        TransferFastError naming the folder or file: another run holds it, it cannot be
        written, its marker is corrupt or records other options.
    """
    out = Path(out)
    marker_path = out / marker
    wanted = _canonical(config)
    if require_empty and not marker_path.exists() and out.is_dir() and any(
            p.name != LOCK_NAME for p in out.iterdir()):
        raise TransferFastError(f"{out} is not empty and holds no run of this kind: choose "
                                "another --out (or an empty folder)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TransferFastError(f"{out}: cannot write the run folder ({exc.strerror})") from exc
    held = Claim(out, marker_path, _lock(out))
    try:
        if marker_path.exists():
            old = read_marker(marker_path)
            diff = _differences(old, wanted)
            if diff:
                raise TransferFastError(f"{out} holds a run of another config, made with "
                                        f"other options ({'; '.join(diff)}); {_FRESH}")
        else:
            write_json(marker_path, wanted)
    except BaseException:
        held.release()
        raise
    return held
