"""Hugging Face style checkpoints: folders, index files and safetensors headers, read safely.

A checkpoint path is one of
  - a file: .safetensors, or .pt/.pth/.bin (torch.save);
  - an index file `*.index.json` whose `weight_map` names each tensor's shard file;
  - a folder holding `model.safetensors`, or `model-0000x-of-0000y.safetensors` shards with
    `model.safetensors.index.json`, or `pytorch_model.bin`, or `pytorch_model-*.bin` shards
    with `pytorch_model.bin.index.json` (safetensors preferred when both are there); a
    folder with exactly one checkpoint file of another name works too.
Every size read from a file (index JSON, safetensors header) is bounded before it is
read; shard names must be plain file names beside the index, never paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import TransferFastError, first_few
from .safetensors import read_header

MAX_INDEX_BYTES = 64 << 20  # an index of a million tensors is ~60 MB
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar")
# In order of preference: the first present wins.
_FOLDER_FILES = ("model.safetensors.index.json", "model.safetensors",
                 "pytorch_model.bin.index.json", "pytorch_model.bin")


def read_safetensors_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """{name: (dtype, shape)} in file order from a .safetensors header, no tensor read
    (validated by io.safetensors: bounded, offsets in range and contiguous, known dtypes)."""
    header = read_header(path)
    return {name: (header.dtypes[name], header.shapes[name]) for name in header.names}


def read_index(path: Path) -> dict[str, Path]:
    """{tensor name: shard file} from a `*.index.json`; the shards must exist beside it."""
    size = path.stat().st_size
    if size > MAX_INDEX_BYTES:
        raise TransferFastError(f"{path}: index file of {size} bytes, more than the "
                                f"{MAX_INDEX_BYTES >> 20} MiB an index needs")
    try:
        index = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TransferFastError(f"{path}: unreadable index file ({exc})") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise TransferFastError(f"{path}: not a checkpoint index (no 'weight_map' of tensor "
                                "names to shard files)")
    shards: dict[str, Path] = {}
    for file in set(weight_map.values()):
        if not isinstance(file, str) or Path(file).name != file or file in ("", ".", ".."):
            raise TransferFastError(f"{path}: shard {file!r} is not a plain file name beside "
                                    "the index")
        shards[file] = path.parent / file
    missing = sorted(f for f, p in shards.items() if not p.is_file())
    if missing:
        raise TransferFastError(f"{path}: {len(missing)} shard file(s) missing: "
                                f"{first_few(missing, 3)}")
    return {str(name): shards[file] for name, file in weight_map.items()}


def _folder_file(folder: Path) -> Path:
    """The checkpoint file or index inside a model folder."""
    for name in _FOLDER_FILES:
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for kinds in ((".index.json",), (".safetensors",), TORCH_SUFFIXES):
        found = [p for p in files if p.name.endswith(kinds)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise TransferFastError(f"{folder}: several checkpoints "
                                    f"({first_few([p.name for p in found], 3)}): pass one file")
    raise TransferFastError(f"{folder}: no checkpoint in the folder (expected "
                            f"{', '.join(_FOLDER_FILES)} or one .safetensors/.pt/.bin file)")


def resolve(path: str | Path) -> tuple[Path, list[Path], dict[str, Path] | None]:
    """(the file named, its shard files in order, {name: shard} or None for one file).

    `path` may be a checkpoint file, an index file or a model folder. Raises
    TransferFastError for a missing, empty or unrecognised path.
    """
    path = Path(path)
    if not path.exists():
        raise TransferFastError(f"{path}: file not found")
    if path.is_dir():
        path = _folder_file(path)
    if not path.is_file():
        raise TransferFastError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise TransferFastError(f"{path}: empty file")
    if path.name.endswith(".index.json"):
        weight_map = read_index(path)
        shards = sorted(set(weight_map.values()), key=lambda p: p.name)
        return path, shards, weight_map
    return path, [path], None
