"""Checkpoints opened for streaming: tensors as views of the file, pages given back after use.

A .safetensors file is memory-mapped and each tensor is a zero-copy view of the
map; `release` drops the pages of a range the scan is done with, so the resident
memory of a scan stays bounded by what is in flight, whatever the number of
checkpoints. .pt/.pth/.bin files are read with `torch.load(mmap=True,
weights_only=True)`; their pages are released when the checkpoint is closed.
"""

from __future__ import annotations

import json
import mmap
import struct
import warnings
from pathlib import Path

import torch

from .checkpoints import load_state
from .errors import TransferFastError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_PAGE = mmap.PAGESIZE


class MappedCheckpoint:
    """One checkpoint file: `shapes`, flat views by name, and `release` of used ranges."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map: mmap.mmap | None = None
        self._offsets: dict[str, int] = {}  # byte offset in the file, safetensors only
        if self.path.suffix == ".safetensors":
            self._tensors = self._open_safetensors()
        else:
            self._tensors = load_state(self.path)
        self.shapes = {n: tuple(t.shape) for n, t in self._tensors.items()}

    def _open_safetensors(self) -> dict[str, torch.Tensor]:
        if not self.path.is_file():
            raise TransferFastError(f"{self.path}: file not found")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise TransferFastError(f"{self.path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise TransferFastError(f"{self.path}: truncated safetensors header")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise TransferFastError(f"{self.path}: unreadable safetensors header") from exc
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        data_start = 8 + header_len
        tensors = {}
        with warnings.catch_warnings():  # the map is read-only on purpose
            warnings.simplefilter("ignore", UserWarning)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                tensors[name] = self._view(name, info, data_start, size)
        return tensors

    def _view(self, name: str, info: dict, data_start: int, size: int) -> torch.Tensor:
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise TransferFastError(f"{self.path}: tensor {name!r} has unsupported dtype "
                                    f"{info.get('dtype')!r}")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or data_start + end > size:
            raise TransferFastError(f"{self.path}: truncated or corrupt safetensors file "
                                    f"(tensor {name!r} lies past the end of the data)")
        self._offsets[name] = data_start + begin
        if numel == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=numel,
                                offset=data_start + begin).view(shape)

    def tensor(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def prefetch(self) -> None:
        """Asks the kernel to read the file ahead while other work runs."""
        if self._map is not None and hasattr(mmap, "MADV_WILLNEED"):
            self._map.madvise(mmap.MADV_WILLNEED)

    def release(self, name: str, start: int, end: int) -> None:
        """Gives back the pages of elements [start, end) of `name`: the file keeps them
        in the page cache, the process no longer counts them as resident."""
        if self._map is None or name not in self._offsets or not hasattr(mmap, "MADV_DONTNEED"):
            return
        itemsize = self._tensors[name].element_size()
        first = self._offsets[name] + start * itemsize
        last = self._offsets[name] + end * itemsize
        # Outward to whole pages: a neighbour's page given back is read again from the
        # page cache if needed, never lost (the map is a clean, read-only file map).
        first = first // _PAGE * _PAGE
        last = (last + _PAGE - 1) // _PAGE * _PAGE
        if last > first:
            self._map.madvise(mmap.MADV_DONTNEED, first, last - first)

    def close(self) -> None:
        self._tensors = {}
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # a caller still holds a view; the map closes with it
                pass
            self._map = None
