"""Checkpoints opened for streaming: ranges of tensors read into the caller's buffers.

A scan never holds a whole fine-tuned checkpoint: it asks for element ranges of
one tensor at a time and reuses its buffers, so its memory stays bounded by what is
in flight, whatever the number of checkpoints. A .safetensors file is read with
`pread` from the offsets in its header (parsed here: no mapping, no page faults,
nothing left resident). A .pt/.pth/.bin file is opened with `torch.load(mmap=True,
weights_only=True)`; ranges are copied out of the map and its pages given back.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import sys
from pathlib import Path

import torch

from ..errors import TransferFastError
from .checkpoints import load_state, strip_module_prefix

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
    """madvise(DONTNEED) over the whole pages inside [address, address + length)."""
    if _LIBC is None:
        return
    first = (address + _PAGE - 1) // _PAGE * _PAGE
    last = (address + length) // _PAGE * _PAGE
    if last > first:
        _LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


class StreamedCheckpoint:
    """One checkpoint file: `shapes`, `meta` tensors for planning, `read` of ranges."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd: int | None = None
        self._offsets: dict[str, int] = {}  # safetensors: file offset of each tensor
        self._tensors: dict[str, torch.Tensor] = {}  # .pt: views of the torch.load map
        self._file_backed = False  # whether the .pt tensors live in a file map
        st = os.stat(self.path)
        # What results are keyed by, taken at open: a file replaced during the scan is
        # measured again next time rather than recorded under the new key.
        self.key = [str(self.path), st.st_size, st.st_mtime_ns]
        if self.path.suffix == ".safetensors":
            try:
                self._meta = self._open_safetensors(st.st_size)
            except Exception:
                self.close()  # no descriptor left behind by a bad file
                raise
        else:
            self._tensors = self._open_torch()
            self._meta = {n: t.to("meta") for n, t in self._tensors.items()}
        self._meta = strip_module_prefix(self._meta)
        self._tensors = strip_module_prefix(self._tensors)
        self._offsets = strip_module_prefix(self._offsets)
        self.shapes = {n: tuple(t.shape) for n, t in self._meta.items()}

    def _open_torch(self) -> dict[str, torch.Tensor]:
        try:
            obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            state = load_state(obj if isinstance(obj, dict) else {})
            self._file_backed = True
            return state
        except Exception:  # not mmap-able (legacy format) or bad: load_state explains
            return load_state(self.path)

    def _open_safetensors(self, size: int) -> dict[str, torch.Tensor]:
        fd = os.open(self.path, os.O_RDONLY)
        self._fd = fd
        head = os.pread(fd, 8, 0)
        if len(head) < 8:
            raise TransferFastError(f"{self.path}: truncated safetensors file (no header)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            raise TransferFastError(f"{self.path}: truncated safetensors header")
        try:
            header = json.loads(os.pread(fd, header_len, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise TransferFastError(f"{self.path}: unreadable safetensors header") from exc
        if not isinstance(header, dict):
            raise TransferFastError(f"{self.path}: unreadable safetensors header")
        data_start = 8 + header_len
        return {name: self._entry(name, info, data_start, size)
                for name, info in header.items() if name != "__metadata__"}

    def _entry(self, name: str, info, data_start: int, size: int) -> torch.Tensor:
        try:
            dtype = _DTYPES.get(info.get("dtype"))
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise TransferFastError(f"{self.path}: corrupt safetensors entry {name!r}") from exc
        if dtype is None:  # a dtype torch lacks: not floating, so never compared
            return torch.empty(shape, dtype=torch.uint8, device="meta")
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or data_start + end > size:
            raise TransferFastError(f"{self.path}: truncated or corrupt safetensors file "
                                    f"(tensor {name!r} lies past the end of the data)")
        self._offsets[name] = data_start + begin
        return torch.empty(shape, dtype=dtype, device="meta")

    def meta(self, name: str) -> torch.Tensor:
        """Shape and dtype, no data: what planning needs."""
        return self._meta[name]

    def read(self, name: str, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor `name` into `out`, a CPU uint8
        buffer of at least their size in bytes; returns them as a typed 1-D view of it."""
        dtype = self._meta[name].dtype
        nbytes = (end - start) * dtype.itemsize
        view = out[:nbytes]
        if name in self._offsets:
            got = os.preadv(self._fd, [view.numpy()], self._offsets[name] + start * dtype.itemsize)
            if got != nbytes:
                raise TransferFastError(f"{self.path}: file shorter than its header says "
                                        f"(changed during the scan?)")
            return view.view(dtype)
        whole = self._tensors[name]
        source = whole.reshape(-1)[start:end]
        typed = view.view(dtype)
        typed.copy_(source)
        if self._file_backed and whole.is_contiguous():  # source is then a view of the map
            _drop_pages(source.data_ptr(), nbytes)  # the page cache keeps them
        return typed

    def load(self, name: str) -> torch.Tensor:
        """The whole tensor, for the rare checks that need it (NaN/Inf naming)."""
        t = self._meta[name]
        buf = torch.empty(t.numel() * t.element_size(), dtype=torch.uint8)
        return self.read(name, 0, t.numel(), buf).view(t.shape)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tensors = {}
