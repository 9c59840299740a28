"""Checkpoints opened for streaming: ranges of tensors read into the caller's buffers.

A scan never holds a whole fine-tuned checkpoint: it asks for element ranges of
one tensor at a time and reuses its buffers, so its memory stays bounded by what is
in flight, whatever the number of checkpoints. Every read is a `pread` from the one
descriptor opened at the start, at offsets checked against the file's size:

- .safetensors: the offsets of the validated header (io/safetensors.py);
- .pt/.pth/.bin (zip format): the pickle is read by `torch.load(weights_only=True)`
  onto the meta device, which yields each storage's offset in the file and no data;
  the layout it gives is kept by the pickle's bytes, so files saved alike (the
  checkpoints of one scan) are unpickled once and only their zip directory is read;
- legacy (pre-zip) torch files, big-endian files and the odd tensor whose elements
  are not contiguous in its storage are read into memory whole;
- Hugging Face folders and `*.index.json` files: io/sharded.py opens each shard as one
  of the above.

There is no memory map, so a file truncated or rewritten under a scan gives a
TransferFastError naming it (a failed row), never a SIGBUS; `changed()` tells
whether the file was modified since it was opened.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import TransferFastError
from .checkpoints import load_state, strip_module_prefix
from .safetensors import open_regular, parse_header, pread_into

IOV_MAX = 1024  # buffers per preadv call (Linux's limit)
MAX_GAP = 256 << 10  # bytes between two wanted ranges still read in one call (into scratch)
_RUN_BYTES = 1 << 30  # bytes per preadv call: Linux moves at most ~2 GB per call
MAX_PICKLE_BYTES = 64 << 20  # a larger data.pkl is unpickled every time, not cached


@dataclass(frozen=True)
class _Span:
    """Where a contiguous tensor's elements lie in the file."""

    offset: int  # byte offset of element 0
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class _Stored:
    """Where a tensor of a torch zip file lies: its storage's record, and its view of it."""

    record: str  # the zip record holding the storage
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int  # storage offset, in elements
    nbytes: int  # the storage's size


_LAYOUTS: OrderedDict[tuple, dict[str, _Stored]] = OrderedDict()  # pickle bytes -> layout
_LAYOUTS_SIZE = 16
_LAYOUTS_LOCK = threading.Lock()


def _remember(key: tuple, layout: dict[str, _Stored]) -> None:
    with _LAYOUTS_LOCK:
        _LAYOUTS[key] = layout
        if len(_LAYOUTS) > _LAYOUTS_SIZE:
            _LAYOUTS.popitem(last=False)


def _torch_layout(state: Mapping[str, torch.Tensor], records: Mapping[str, tuple[int, int]]
                  ) -> dict[str, _Stored]:
    """Each tensor's _Stored from the meta state of a torch file (its storages carry
    `_checkpoint_offset`, the data offset of their record)."""
    by_offset = {offset: name for name, (offset, _) in records.items()}
    return {name: _Stored(by_offset.get(t.untyped_storage()._checkpoint_offset, ""), t.dtype,
                          tuple(t.shape), tuple(t.stride()), t.storage_offset(),
                          t.untyped_storage().nbytes())
            for name, t in state.items()}


class StreamedCheckpoint:
    """One checkpoint file: `shapes`, `meta` tensors for planning, `read` of ranges.

    `key` ([resolved path, size, mtime_ns], taken from the open descriptor) is what
    results are recorded under; a file replaced during the scan is measured again
    next time rather than recorded under the new key. `entry` picks the wrapped state
    dict of a torch file that holds several (load_state's `key`)."""

    def __init__(self, path: str | Path, *, entry: str | None = None):
        self.path = Path(path)
        self._entry = entry
        self._file = os.fdopen(open_regular(self.path), "rb")  # closed by close()
        self._fd = self._file.fileno()
        self._spans: dict[str, _Span] = {}
        self._memory: dict[str, torch.Tensor] = {}  # tensors read whole
        self._pending: dict[str, tuple[int, _Stored]] = {}  # strided: (storage offset, where)
        try:
            st = os.fstat(self._fd)
            self.key = [str(self.path.resolve()), st.st_size, st.st_mtime_ns]
            if self.path.suffix == ".safetensors":
                meta = self._open_safetensors(st.st_size)
            else:
                meta = self._open_torch(st.st_size)
        except BaseException:
            self.close()  # no descriptor left behind by a bad file
            raise
        self._meta = meta
        self.shapes = {n: tuple(t.shape) for n, t in meta.items()}

    # -- opening ------------------------------------------------------------------------

    def _open_safetensors(self, size: int) -> dict[str, torch.Tensor]:
        header = parse_header(self._fd, self.path, size)
        # DataParallel's 'module.' prefix goes, as load_state drops it (the .pt routes
        # below go through load_state itself).
        names = dict(zip(strip_module_prefix(dict.fromkeys(header.names)), header.names))
        meta = {}
        for name, stored in names.items():
            dtype, shape = header.dtypes[stored], header.shapes[stored]
            meta[name] = torch.empty(shape, dtype=dtype, device="meta")
            self._spans[name] = _Span(header.offsets[stored][0], dtype, meta[name].numel())
        return meta

    def _open_torch(self, size: int) -> dict[str, torch.Tensor]:
        if not zipfile.is_zipfile(self._file) or not self._little_endian():
            return self._open_in_memory()
        records = self._stored_records()
        pickle = records.get("data.pkl")
        # The pickle alone fixes every tensor's record, dtype, shape and strides: files
        # saved alike (every checkpoint of a scan) are unpickled once.
        cache_key = (os.pread(self._fd, pickle[1], pickle[0]), self._entry) \
            if pickle and pickle[1] <= MAX_PICKLE_BYTES else None
        layout = _LAYOUTS.get(cache_key) if cache_key else None
        if layout is None:
            self._file.seek(0)
            state = self._meta_state()
            if state is None:  # a torch that gives no storage offsets: read it whole
                return self._open_in_memory()
            layout = _torch_layout(state, records)
            if cache_key:
                _remember(cache_key, layout)
        for name, t in layout.items():
            base, stored = records.get(t.record, (0, -1))
            item = t.dtype.itemsize
            span = (t.offset + sum((n - 1) * st for n, st in zip(t.shape, t.stride)) + 1) * item \
                if math.prod(t.shape) else 0
            if t.record not in records or (span and (min(t.stride, default=1) < 0
                                                     or span > t.nbytes or t.nbytes > stored
                                                     or base + t.nbytes > size)):
                raise TransferFastError(f"{self.path}: tensor {name!r} lies outside the data "
                                        "stored in the file (truncated or corrupt)")
            meta = torch.empty_strided(t.shape, t.stride, dtype=t.dtype, device="meta")
            if meta.is_contiguous():
                self._spans[name] = _Span(base + t.offset * item, t.dtype, meta.numel())
            else:
                self._pending[name] = (base, t)
        return {n: torch.empty_strided(t.shape, t.stride, dtype=t.dtype, device="meta")
                for n, t in layout.items()}

    def _little_endian(self) -> bool:
        """Whether the zip's storages are in this machine's byte order (pread cannot swap)."""
        try:
            self._file.seek(0)
            reader = torch._C.PyTorchFileReader(self._file)
            order = (reader.get_record("byteorder").decode() if reader.has_record("byteorder")
                     else "little")
        except Exception:  # a bad zip: the loader names the problem
            return True
        return order == sys.byteorder

    def _stored_records(self) -> dict[str, tuple[int, int]]:
        """{record name: (data offset, bytes)} of the zip's uncompressed records, named
        without the archive's root folder (torch.save names it after the file); a
        compressed tensor record read as raw bytes would be measured wrong, so it is
        refused."""
        self._file.seek(0)
        records = {}
        try:
            with zipfile.ZipFile(self._file) as z:
                for info in z.infolist():
                    if info.compress_type != zipfile.ZIP_STORED:
                        if "/data/" in f"/{info.filename}":
                            raise TransferFastError(f"{self.path}: record {info.filename} is "
                                                    "compressed; torch.save never does that")
                        continue
                    self._file.seek(info.header_offset + 26)
                    lengths = self._file.read(4)
                    records[info.filename.partition("/")[2]] = (
                        info.header_offset + 30 + int.from_bytes(lengths[:2], "little")
                        + int.from_bytes(lengths[2:], "little"), info.file_size)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise TransferFastError(f"{self.path}: unreadable or truncated checkpoint "
                                    f"({exc})") from exc
        return records

    def _meta_state(self) -> dict[str, torch.Tensor] | None:
        """{name: meta tensor} whose storages carry `_checkpoint_offset` (no data read), or
        None when this torch gives no offsets; raises naming the file when it is bad."""
        for mode in ("meta", "fake"):
            self._file.seek(0)
            try:
                if mode == "meta":
                    obj = torch.load(self._file, map_location="meta", weights_only=True)
                else:
                    from torch._subclasses.fake_tensor import FakeTensorMode

                    with FakeTensorMode():
                        obj = torch.load(self._file, weights_only=True)
                state = load_state(obj if isinstance(obj, Mapping) else {}, key=self._entry)
            except Exception:  # load_state(path) below names the problem
                continue
            if all(hasattr(t.untyped_storage(), "_checkpoint_offset") for t in state.values()):
                return state
        load_state(self.path, key=self._entry)  # the one-line reason for a bad file
        return None

    def _open_in_memory(self) -> dict[str, torch.Tensor]:
        """Legacy or big-endian torch files: read whole from the open descriptor, no map."""
        self._file.seek(0)
        try:
            obj = torch.load(self._file, map_location="cpu", weights_only=True)
            self._memory = load_state(obj if isinstance(obj, Mapping) else {}, key=self._entry)
        except Exception:
            load_state(self.path, key=self._entry)  # raises the one-line reason naming the file
            raise
        return {n: t.to("meta") for n, t in self._memory.items()}

    # -- reading ------------------------------------------------------------------------

    def meta(self, name: str) -> torch.Tensor:
        """Shape and dtype, no data: what planning needs."""
        return self._meta[name]

    def read(self, name: str, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor `name` into `out`, a CPU uint8
        buffer of at least their size in bytes; returns them as a typed 1-D view of it.

        Raises TransferFastError naming the file when it shrank since it was opened."""
        if name in self._pending:
            self._memory[name] = self._read_strided(name)
        dtype = self._meta[name].dtype
        nbytes = (end - start) * dtype.itemsize
        view = out[:nbytes]
        span = self._spans.get(name)
        if span is None:
            typed = view.view(dtype)
            typed.copy_(self._memory[name].reshape(-1)[start:end])
            return typed
        if not 0 <= start <= end <= span.numel:
            raise ValueError(f"elements [{start}, {end}) outside tensor {name!r}")
        pread_into(self._fd, view, span.offset + start * dtype.itemsize, self.path)
        return view.view(dtype)

    def read_many(self, reads: Sequence[tuple[str, int, int, torch.Tensor]]) -> None:
        """`read(name, start, end, out)` for every request, with as few system calls as
        the file allows: ranges close together in the file (at most MAX_GAP bytes apart)
        are read by one `preadv` into their buffers, the gaps into a scratch buffer.

        Raises TransferFastError naming the file when it shrank since it was opened."""
        ranges = []  # (offset in the file, bytes, out)
        for name, start, end, out in reads:
            span = self._spans.get(name)
            if span is None or name in self._pending:
                self.read(name, start, end, out)
                continue
            if not 0 <= start <= end <= span.numel:
                raise ValueError(f"elements [{start}, {end}) outside tensor {name!r}")
            size = span.dtype.itemsize
            if end > start:
                ranges.append((span.offset + start * size, (end - start) * size, out))
        ranges.sort(key=lambda r: r[0])
        scratch = None
        i = 0
        while i < len(ranges):
            first, at, buffers, j = ranges[i][0], ranges[i][0], [], i
            while j < len(ranges) and len(buffers) < IOV_MAX - 1:
                offset, nbytes, out = ranges[j]
                gap = offset - at
                if not 0 <= gap <= MAX_GAP or at + nbytes - first > _RUN_BYTES and buffers:
                    break
                if gap:
                    if scratch is None:
                        scratch = np.empty(MAX_GAP, dtype=np.uint8)
                    buffers.append(scratch[:gap])
                buffers.append(out[:nbytes].numpy())
                at, j = offset + nbytes, j + 1
            if os.preadv(self._fd, buffers, first) != at - first:
                for offset, nbytes, out in ranges[i:j]:  # short: the file shrank
                    pread_into(self._fd, out[:nbytes], offset, self.path)
            i = j

    def _read_strided(self, name: str) -> torch.Tensor:
        base, t = self._pending.pop(name)
        raw = torch.empty(t.nbytes, dtype=torch.uint8)
        pread_into(self._fd, raw, base, self.path)
        return raw.view(t.dtype).as_strided(t.shape, t.stride, t.offset).contiguous()

    def load(self, name: str) -> torch.Tensor:
        """The whole tensor, for the rare checks that need it (NaN/Inf naming)."""
        t = self._meta[name]
        buf = torch.empty(t.numel() * t.element_size(), dtype=torch.uint8)
        return self.read(name, 0, t.numel(), buf).view(t.shape)

    def load_all(self) -> dict[str, torch.Tensor]:
        """Every tensor, in the file's order, read into memory."""
        return {name: self.load(name) for name in self._meta}

    def changed(self) -> str:
        """'' while the file is as it was opened; else why it is not (for a failed row)."""
        if self._fd is None:
            return ""
        st = os.fstat(self._fd)
        if [st.st_size, st.st_mtime_ns] != self.key[1:]:
            return (f"{self.path}: changed while it was read (size {self.key[1]} -> "
                    f"{st.st_size}); measure it again once it is complete")
        return ""

    def close(self) -> None:
        if self._fd is not None:
            self._file.close()
            self._fd = None
        self._memory = {}

    def __enter__(self) -> StreamedCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
