"""The one reader of .safetensors headers: every field checked before a byte of data is used.

Layout of the format: 8 bytes little-endian N, N bytes of a JSON object
{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
then the data, whose offsets count from the end of the header. Measuring and
scanning both go through `read_header`, so they accept exactly the same files; the
checks are at least as strict as the safetensors library's own (it is handed a
file only after they pass), and a few go further (duplicate names, 4/6-bit types).
Data is read with `pread` into buffers the caller owns: no memory map, so a file
truncated under a reader gives an error, never a SIGBUS.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import TransferFastError

# The safetensors library refuses headers above 100 MB (its MAX_HEADER_SIZE): so do we,
# before reading or parsing them; the JSON therefore never exceeds that either.
MAX_HEADER_BYTES = 100_000_000
# Bits per element of every dtype the format names; those torch lacks, or with fewer
# than 8 bits (packed 4/6-bit floats, whose shapes do not count bytes), are refused.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
_TORCH_NAMES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
    "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu", "I16": "int16",
    "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
    "F32": "float32", "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64",
}
DTYPES: dict[str, torch.dtype] = {k: getattr(torch, v) for k, v in _TORCH_NAMES.items()
                                  if isinstance(getattr(torch, v, None), torch.dtype)}
_CHUNK = 1 << 30  # bytes per pread call: Linux moves at most ~2 GB per call


@dataclass(frozen=True)
class Header:
    """A validated header: tensors in file order; offsets absolute in the file."""

    path: Path
    names: tuple[str, ...]
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]
    offsets: dict[str, tuple[int, int]]  # absolute [begin, end) byte range of each tensor
    data_start: int  # 8 + header length
    file_size: int
    metadata: dict[str, str] = field(default_factory=dict)


def _bad(path, what: str) -> TransferFastError:
    return TransferFastError(f"{path}: not a valid safetensors file ({what})")


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise TransferFastError(f"name {dup!r} appears twice")
    return dict(pairs)


def _natural(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path, name: str, info, data_size: int) -> tuple[torch.dtype, tuple, tuple]:
    """(dtype, shape, (begin, end) relative to the data) of one header entry."""
    where = f"tensor {name!r}"
    if not isinstance(info, dict):
        raise _bad(path, f"{where}: entry is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise _bad(path, f"{where}: no {', '.join(missing)}")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in DTYPE_BITS:
        raise _bad(path, f"{where}: unknown dtype {code!r}")
    if code not in DTYPES or DTYPE_BITS[code] % 8:
        raise TransferFastError(f"{path}: tensor {name!r} has dtype {code}, which this "
                                "torch cannot hold as whole bytes")
    if not isinstance(shape, list) or not all(_natural(d) for d in shape):
        raise _bad(path, f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_natural(x) for x in offsets)):
        raise _bad(path, f"{where}: data_offsets {offsets!r} are not two non-negative integers")
    if math.prod(max(d, 1) for d in shape) * DTYPE_BITS[code] // 8 >= 2**63:
        raise _bad(path, f"{where}: shape {shape} overflows 64-bit sizes")  # even if empty
    begin, end = offsets
    if begin > end:
        raise _bad(path, f"{where}: data_offsets [{begin}, {end}] begin after they end")
    if end > data_size:
        raise TransferFastError(f"{path}: truncated safetensors file (tensor {name!r} ends "
                                f"at byte {end} of the data, which has {data_size})")
    nbytes = math.prod(shape) * DTYPE_BITS[code] // 8
    if end - begin != nbytes:
        raise _bad(path, f"{where}: shape {shape} of {code} needs {nbytes} bytes, "
                         f"data_offsets hold {end - begin}")
    return DTYPES[code], tuple(shape), (begin, end)


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of the regular file `path`. O_NONBLOCK keeps a FIFO or a
    device from blocking the open; anything but a regular file is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise TransferFastError(f"{path}: cannot open ({exc.strerror})") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TransferFastError(f"{path}: not a regular file")
    return fd


def parse_header(fd: int, path: str | Path, size: int | None = None) -> Header:
    """The validated header of the open file `fd` (named `path` in messages)."""
    size = os.fstat(fd).st_size if size is None else size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise _bad(path, f"{size} bytes, shorter than the 8-byte header length")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES:
        raise _bad(path, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + length > size:
        raise _bad(path, f"header of {length} bytes, but the file has {size} (truncated?)")
    raw = os.pread(fd, length, 8)
    if len(raw) != length:
        raise _bad(path, "file shorter than its header length (changed while read?)")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except TransferFastError as exc:
        raise _bad(path, f"header: {exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(path, f"header is not JSON: {str(exc)[:80]}") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ is not an object of strings")
    data_start = 8 + length
    data_size = size - data_start
    dtypes, shapes, offsets = {}, {}, {}
    for name, info in header.items():
        dtypes[name], shapes[name], offsets[name] = _entry(path, name, info, data_size)
    # Contiguous and covering: sorted by range, each tensor starts where the last ended.
    at = 0
    for name, (begin, end) in sorted(offsets.items(), key=lambda kv: kv[1]):
        if begin != at:
            why = "overlaps the tensor before it" if begin < at else "leaves a gap before it"
            raise _bad(path, f"tensor {name!r}: data_offsets [{begin}, {end}] {why}")
        at = end
    if at != data_size:
        raise _bad(path, f"{data_size - at} bytes after the last tensor's data")
    return Header(Path(path), tuple(header), dtypes, shapes,
                  {n: (data_start + b, data_start + e) for n, (b, e) in offsets.items()},
                  data_start, size, dict(metadata))


def read_header(path: str | Path) -> Header:
    """The validated header of the file at `path`; TransferFastError naming it otherwise."""
    path = Path(path)
    fd = open_regular(path)
    try:
        return parse_header(fd, path)
    finally:
        os.close(fd)


def pread_into(fd: int, out: torch.Tensor, offset: int, path: str | Path) -> None:
    """Fills the contiguous CPU tensor `out` with the file's bytes from `offset` on.

    Raises TransferFastError naming `path` when the file ends first (it was truncated
    or rewritten since its header was read)."""
    array = out.view(torch.uint8).reshape(-1).numpy()
    done = 0
    while done < len(array):
        got = os.preadv(fd, [array[done:done + _CHUNK]], offset + done)
        if got <= 0:
            raise TransferFastError(f"{path}: file shorter than its header says "
                                    "(truncated or rewritten while it was read)")
        done += got


def read_range(fd: int, header: Header, name: str, start: int, end: int,
               out: torch.Tensor) -> torch.Tensor:
    """Elements [start, end) of the flattened tensor `name` into `out`, a CPU uint8 buffer
    of at least their size in bytes; returns them as a typed 1-D view of it.

    Raises TransferFastError naming the file when it is shorter than its header says
    (truncated since it was opened)."""
    dtype = header.dtypes[name]
    begin, stop = header.offsets[name]
    size = dtype.itemsize
    if not 0 <= start <= end or begin + end * size > stop:
        raise ValueError(f"elements [{start}, {end}) outside tensor {name!r}")
    view = out[:(end - start) * size]
    pread_into(fd, view, begin + start * size, header.path)
    return view.view(dtype)


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file, in file order, after `read_header` validated it.

    The bytes are read with pread into fresh tensors rather than through the library's
    memory map: the validated offsets are the library's own, and a file cut short
    while it is read raises TransferFastError instead of killing the process. A file
    changed while it was read (size or modification time) is refused too.
    """
    return load_with_metadata(path)[0]


def load_with_metadata(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, `__metadata__`) of a .safetensors file, read as `load_file` does."""
    path = Path(path)
    fd = open_regular(path)
    try:
        before = os.fstat(fd)
        header = parse_header(fd, path, before.st_size)
        state = {}
        for name in header.names:
            begin, end = header.offsets[name]
            buf = torch.empty(end - begin, dtype=torch.uint8)
            numel = math.prod(header.shapes[name])
            state[name] = read_range(fd, header, name, 0, numel, buf).view(header.shapes[name])
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise TransferFastError(f"{path}: changed while it was read; read it again")
        return state, dict(header.metadata)
    finally:
        os.close(fd)
