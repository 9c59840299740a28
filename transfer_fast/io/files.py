"""Every output file is written here: to a temporary file beside it, fsynced, then renamed.

A kill, a full disk or a file-size limit therefore leaves the previous good file or
the new one, never a truncated mix; an error names the file. Also the one definition
of a file's identity (`file_key`) and of JSON without inf/nan (`json_safe`).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from ..errors import TransferFastError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """write(tmp) into a temporary file in path's folder, fsync, rename over `path`.

    Args:
        path: the output file; its folder is created when missing.
        write: fills the temporary file whose path it is given.
    Returns:
        `path` as a Path.
    Raises:
        TransferFastError: naming `path` when the folder cannot be made or the write
            fails (a full disk, a file-size limit, a format the writer lacks); the old
            file is left as it was and no temporary file remains.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, ValueError) as exc:  # ValueError: e.g. a figure format matplotlib lacks
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise TransferFastError(f"{path}: cannot write ({reason.splitlines()[0]})") from exc
    finally:
        with contextlib.suppress(OSError):  # e.g. the folder is a file: keep the first error
            tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """`text` as UTF-8, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def json_safe(x):
    """Strict JSON has no inf/nan: they are written as the strings "inf", "-inf", "nan"."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Mapping):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def write_json(path: str | Path, obj) -> Path:
    """`obj` as indented strict JSON (inf/nan as strings), atomically."""
    return write_text(path, json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")


def csv_text(rows: Iterable[Iterable]) -> str:
    """Rows as CSV text with '\\n' line ends."""
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def write_csv(path: str | Path, header: Iterable[str], rows: Iterable[Iterable]) -> Path:
    """A header line and rows as CSV, atomically."""
    return write_text(path, csv_text([list(header), *rows]))


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """A .safetensors file of contiguous CPU copies (safetensors refuses tied or strided
    tensors), atomically."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
           for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=dict(metadata or {})))


def file_key(path: str | Path) -> list:
    """What identifies a finished input file: its resolved path, size and modification time."""
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def refuse_overwriting_inputs(outputs: Iterable[str | Path | None],
                              inputs: Iterable[str | Path | None]) -> None:
    """Raises TransferFastError when an output path is one of the input files."""
    def resolved(paths):
        return {Path(p).resolve(): p for p in paths if p not in (None, "-")}

    clash = resolved(outputs).keys() & resolved(inputs).keys()
    if clash:
        raise TransferFastError(f"{sorted(map(str, clash))[0]}: refusing to overwrite an input "
                                f"file with an output")
