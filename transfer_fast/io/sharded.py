"""Hugging Face folders and `*.index.json` files opened for streaming, shard by shard.

Each shard is a `StreamedCheckpoint` (safetensors shards through the validated pread
reader, .bin shards as .pt files), a tensor is read from the shard the index names,
and the folder as a whole offers the interface of one file. `open_streamed` picks the
reader of any checkpoint path; `checkpoint_key` is the identity a scan records for it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import TransferFastError, first_few
from . import hf
from .files import file_key
from .names import natural_key, strip_wrappers
from .streaming import StreamedCheckpoint


class ShardedCheckpoint:
    """A Hugging Face folder or `*.index.json`: every shard opened as a StreamedCheckpoint
    (safetensors shards through the validated pread reader, .bin shards as .pt files),
    each tensor read from the shard the index names. Same interface as one file.

    `key` is [resolved path of the folder or index, total bytes of the index and its
    shards, newest mtime_ns among them] (`checkpoint_key`), from the open descriptors.
    """

    def __init__(self, path: str | Path, *, entry: str | None = None):
        self.path = Path(path)
        index, files, weight_map = hf.resolve(self.path)
        st = os.stat(index)
        # A folder holding one checkpoint file has no index: that file is the whole of it.
        self._index = (index, st.st_size, st.st_mtime_ns) if weight_map is not None else None
        self._shards: list[StreamedCheckpoint] = []
        self._where: dict[str, tuple[StreamedCheckpoint, str]] = {}
        try:
            for file in files:
                self._shards.append(StreamedCheckpoint(file, entry=entry))
            self._names = self._lay_out(index, weight_map)
        except BaseException:
            self.close()
            raise
        self.shapes = {n: self._where[n][0].shapes[self._where[n][1]] for n in self._names}
        keys = [ck.key for ck in self._shards] + ([[*self._index]] if self._index else [])
        self.key = [str(self.path.resolve()), sum(k[1] for k in keys), max(k[2] for k in keys)]

    def _lay_out(self, index: Path, weight_map: dict[str, Path] | None) -> list[str]:
        """Each name's (shard, name in it), in natural order; a name the index gives a
        shard that lacks it is an error, tensors the index does not list are ignored."""
        wanted: dict[Path, set[str]] = {}
        for name, file in (weight_map or {}).items():
            wanted.setdefault(file, set()).add(name)
        for ck in self._shards:
            if weight_map is None:
                self._where.update((name, (ck, name)) for name in ck.shapes)
                continue
            listed = wanted.get(ck.path, set())
            # A shard drops the wrapper prefix its names all carry, as load_state does.
            expected = set(strip_wrappers(dict.fromkeys(sorted(listed))))
            lost = sorted(expected - set(ck.shapes))
            if lost:
                raise TransferFastError(f"{index}: {len(lost)} tensor(s) of the index are not "
                                        f"in their shard {ck.path.name}: {first_few(lost, 3)}")
            for name in ck.shapes:
                if name in expected:
                    self._where[name] = (ck, name)
        return sorted(self._where, key=natural_key)

    def meta(self, name: str) -> torch.Tensor:
        ck, stored = self._where[name]
        return ck.meta(stored)

    def read(self, name: str, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        ck, stored = self._where[name]
        return ck.read(stored, start, end, out)

    def read_many(self, reads: Sequence[tuple[str, int, int, torch.Tensor]]) -> None:
        by_shard: dict[int, tuple[StreamedCheckpoint, list]] = {}
        for name, start, end, out in reads:
            ck, stored = self._where[name]
            by_shard.setdefault(id(ck), (ck, []))[1].append((stored, start, end, out))
        for ck, part in by_shard.values():
            ck.read_many(part)

    def load(self, name: str) -> torch.Tensor:
        ck, stored = self._where[name]
        return ck.load(stored)

    def load_all(self) -> dict[str, torch.Tensor]:
        return {name: self.load(name) for name in self._names}

    def changed(self) -> str:
        """'' while the index and every shard are as they were opened; else why not."""
        if self._index is not None:
            index, size, mtime = self._index
            try:
                st = os.stat(index)
                now = (st.st_size, st.st_mtime_ns)
            except OSError:
                now = None
            if now != (size, mtime):
                return f"{index}: changed while the checkpoint was read; measure it again"
        return next((why for why in (ck.changed() for ck in self._shards) if why), "")

    def close(self) -> None:
        for ck in self._shards:
            ck.close()

    def __enter__(self) -> ShardedCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_streamed(path: str | Path, *, key: str | None = None
                  ) -> StreamedCheckpoint | ShardedCheckpoint:
    """The streaming reader of a checkpoint file, index file or model folder; `key` picks
    the wrapped state dict as load_state's does."""
    p = Path(path)
    if p.is_dir() or p.name.endswith(".index.json"):
        return ShardedCheckpoint(p, entry=key)
    return StreamedCheckpoint(p, entry=key)


def checkpoint_key(path: str | Path) -> list:
    """What identifies a checkpoint as read: [resolved path, size, mtime_ns] of a file;
    for a folder or index file, the bytes of the index and its shards together and the
    newest of their mtimes (what `ShardedCheckpoint.key` records)."""
    p = Path(path)
    if not (p.is_dir() or p.name.endswith(".index.json")):
        return file_key(p)
    index, files, _ = hf.resolve(p)
    stats = [os.stat(f) for f in dict.fromkeys((index, *files))]
    return [str(p.resolve()), sum(s.st_size for s in stats), max(s.st_mtime_ns for s in stats)]
