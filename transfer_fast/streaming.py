"""Checkpoints opened for streaming: tensors as views of the file, pages given back after use.

A .safetensors file is memory-mapped (parsed here rather than through safe_open so
that the scan can give pages back) and each tensor is a zero-copy view of the map.
.pt/.pth/.bin files are read with `torch.load(mmap=True, weights_only=True)`, whose
tensors are views of a private file map too. `release` drops the pages of a range
the scan is done with: they stay in the page cache, and the resident memory of a
scan stays bounded by what is in flight, whatever the number of checkpoints.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import sys
import warnings
from pathlib import Path

import torch

from .checkpoints import load_state, strip_module_prefix
from .errors import TransferFastError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux: for a clean file map it only drops the process's page tables
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None


def _drop_pages(address: int, length: int) -> None:
    """madvise(DONTNEED) over whole pages covering [address, address + length)."""
    if _LIBC is None:
        return
    first = address // _PAGE * _PAGE
    last = (address + length + _PAGE - 1) // _PAGE * _PAGE
    _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


class MappedCheckpoint:
    """One checkpoint file: `shapes`, flat views by name, and `release` of used ranges."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map: mmap.mmap | None = None
        self._file_backed = False  # whether `release` may drop pages (never for heap memory)
        if self.path.suffix == ".safetensors":
            tensors = self._open_safetensors()
        else:
            tensors = self._open_torch()
        # What the results are keyed by, taken at open: a file replaced during the scan
        # is measured again next time rather than recorded with the new key.
        st = os.stat(self.path)
        self.key = [str(self.path), st.st_size, st.st_mtime_ns]
        self._tensors = strip_module_prefix(tensors)
        self.shapes = {n: tuple(t.shape) for n, t in self._tensors.items()}

    def _open_torch(self) -> dict[str, torch.Tensor]:
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            state = load_state(obj if isinstance(obj, dict) else {})
            self._file_backed = True
            return state
        except Exception:  # not mmap-able (legacy format) or bad: load_state explains
            return load_state(self.path)

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
        if not isinstance(header, dict):
            raise TransferFastError(f"{self.path}: unreadable safetensors header")
        data_start = 8 + header_len
        tensors = {}
        with warnings.catch_warnings():  # the map is read-only on purpose
            warnings.simplefilter("ignore", UserWarning)
            for name, info in header.items():
                if name != "__metadata__":
                    tensors[name] = self._view(name, info, data_start, size)
        self._file_backed = True
        return tensors

    def _view(self, name: str, info, data_start: int, size: int) -> torch.Tensor:
        try:
            dtype = _DTYPES.get(info.get("dtype"))
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise TransferFastError(f"{self.path}: corrupt safetensors entry {name!r}") from exc
        if dtype is None:  # a dtype torch cannot view: not floating, so never compared
            return torch.empty(shape, dtype=torch.uint8, device="meta")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or data_start + end > size:
            raise TransferFastError(f"{self.path}: truncated or corrupt safetensors file "
                                    f"(tensor {name!r} lies past the end of the data)")
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
        in the page cache, the process no longer counts them as resident. Whole pages
        are dropped; a neighbour's page is simply read again from the cache if needed."""
        if not self._file_backed:
            return
        t = self._tensors[name]
        _drop_pages(t.data_ptr() + start * t.element_size(), (end - start) * t.element_size())

    def close(self) -> None:
        # Never munmap here: torch views keep the map alive until the last one is freed.
        self._tensors = {}
        self._map = None
