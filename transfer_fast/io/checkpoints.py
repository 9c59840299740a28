"""load_state: checkpoint, folder, module or mapping -> {name: tensor}; never runs pickled code.

Torch files are read with `torch.load(weights_only=True)`: only tensors, containers
and primitive values are rebuilt, plus the harmless classes training scripts store
beside the weights (`argparse.Namespace` of timm's `args`). Anything else is refused
and its code never runs. Sharded folders and index files are read shard by shard
(`open_checkpoint`).
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import TransferFastError, first_few
from . import hf
from .names import natural_key, strip_wrappers, wrapper_prefix
from .pickles import unsafe_global, unsafe_pickle_message
from .safetensors import load_file

StateSource = str | Path | nn.Module | Mapping
# Entries that wrap the model's state dict, in order of preference when several exist.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# Classes rebuilt by weights_only loading: constructing them runs none of the file's code.
_SAFE_GLOBALS = [argparse.Namespace]


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    state = load_file(path)  # validated header, pread: a bad or shrinking file is an error
    # The format stores names sorted as text; numeric order is closer to network order.
    return {name: state[name] for name in sorted(state, key=natural_key)}


def _load_error(path: Path, exc: Exception) -> TransferFastError:
    """One line for a failed torch.load; never torch's advice to disable weights_only."""
    if unsafe_global(exc):
        return TransferFastError(unsafe_pickle_message(path, exc))
    text = str(exc)
    detail = next((ln.strip() for ln in text.splitlines()
                   if "WeightsUnpickler error" in ln or "Unsupported operand" in ln), None)
    detail = detail or f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return TransferFastError(f"{path}: unreadable or truncated checkpoint, or not a torch "
                             f"checkpoint ({detail[:160]})")


def _safe_globals():
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    return allow(_SAFE_GLOBALS) if allow else contextlib.nullcontext()


def _load_torch(path: Path) -> object:
    with _safe_globals():
        try:
            # mmap keeps large checkpoints out of RAM until a tensor is touched; it
            # needs the zip format, so legacy files are read plainly below.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap can only be used" not in str(exc):
                raise _load_error(path, exc) from exc
        except Exception as exc:  # torch.load raises many types for corrupt input
            raise _load_error(path, exc) from exc
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise _load_error(path, exc) from exc


def _holds_tensors(obj: object) -> bool:
    return isinstance(obj, Mapping) and any(
        isinstance(v, torch.Tensor) or _holds_tensors(v) for v in obj.values())


def _state_entries(obj: Mapping) -> list[str]:
    """Entries that hold a state dict (not an optimizer's state)."""
    return [str(k) for k, v in obj.items()
            if _holds_tensors(v) and not (isinstance(v, Mapping) and "param_groups" in v)]


def _unwrap(obj: object, origin: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict inside {'state_dict': ...} / {'model': ...} style wrappers, or `key`'s,
    with the wrapper prefixes every name carries removed."""
    return strip_wrappers(_unwrap_raw(obj, origin, key))


def _unwrap_raw(obj: object, origin: str, key: str | None = None) -> dict[str, torch.Tensor]:
    """`_unwrap` keeping the names as stored. A mapping that holds tensors itself ignores
    `key` unless it has that entry."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if key is not None and isinstance(obj, Mapping) and (
            key in obj or not any(isinstance(v, torch.Tensor) for v in obj.values())):
        if not _holds_tensors(obj.get(key)):
            raise TransferFastError(f"{origin}: no state dict under key {key!r}; entries "
                                    f"holding one: {first_few(_state_entries(obj)) or 'none'}")
        obj = obj[key]
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if _holds_tensors(obj.get(k))), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise TransferFastError(f"{origin}: expected a state dict, got {type(obj).__name__}")
    state = {str(k): v.detach() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        nested = _state_entries(obj)
        hint = (f"; tensors sit in nested entries {first_few(nested)}: pick one with key="
                f"{nested[0]!r}") if nested else ""
        raise TransferFastError(f"{origin}: holds no tensors{hint}")
    return state


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel's 'module.' and torch.compile's '_orig_mod.' when every name has them."""
    return strip_wrappers(state)


def load_state(src: StateSource, *, key: str | None = None) -> dict[str, torch.Tensor]:
    """Ordered {name: tensor} from a checkpoint, a module or a mapping.

    Args:
        src: a file (.pt/.pth/.bin/.safetensors), an index file (`*.index.json`) or a
            Hugging Face model folder (one file or shards, read shard by shard), an
            nn.Module, or a mapping of names to tensors.
        key: the entry holding the wanted state dict in a checkpoint that wraps several
            (`state_dict_ema`, `model_ema`, ...); by default 'state_dict',
            'model_state_dict', 'model' or 'module', whichever holds tensors first. A plain
            state dict ignores it.
    Returns:
        {name: tensor} with the `module.` / `_orig_mod.` prefix every name carries removed.
    Raises:
        TransferFastError naming the file for missing, unreadable, truncated, unsafe or
        tensor-less input, or an ambiguous wrapper (listing the candidate keys).
    """
    if isinstance(src, (str, Path)):
        path, _, weight_map = hf.resolve(src)
        if weight_map is not None:
            return open_checkpoint(path, key=key).load()
        if path.suffix == ".safetensors":
            return strip_wrappers(_load_safetensors(path))
        return _unwrap(_load_torch(path), str(path), key)
    if isinstance(src, (nn.Module, Mapping)):
        return _unwrap(src, type(src).__name__, key)
    raise TransferFastError(
        f"cannot load parameters from a {type(src).__name__}: expected a path, an nn.Module "
        "or a mapping of names to tensors"
    )


class Checkpoint:
    """A checkpoint opened for reading: names, shapes and dtypes now, tensors shard by shard.

    Attributes:
        path: the file or index read (a folder resolves to its file or index).
        files: the shard files, in order (one for a single-file checkpoint).
        names: the tensor names in network-like (numeric-aware) order, wrappers removed.
        shapes, dtypes: per name; dtype None for a type torch lacks (never compared).
    Only the safetensors headers are read to list a checkpoint; a torch file is opened
    memory-mapped (its pickle is parsed, its tensor data not read).
    """

    def __init__(self, path: str | Path, *, key: str | None = None):
        self.path, files, weight_map = hf.resolve(path)
        self.key = key
        self.files = tuple(files)
        stored: dict[str, tuple[Path, torch.dtype | None, tuple[int, ...]]] = {}
        for file in self.files:
            for name, (dtype, shape) in self._describe(file).items():
                if weight_map is None or weight_map.get(name) == file:
                    stored[name] = (file, dtype, shape)
        if weight_map is not None:
            lost = [n for n in weight_map if n not in stored]
            if lost:
                raise TransferFastError(f"{self.path}: {len(lost)} tensor(s) of the index are "
                                        f"not in their shard: {first_few(lost, 3)}")
        cut = len(wrapper_prefix(stored))
        order = sorted(stored, key=natural_key)
        self.names = tuple(n[cut:] for n in order)
        self._stored = dict(zip(self.names, order))
        self._file = {n: stored[s][0] for n, s in self._stored.items()}
        self.dtypes = {n: stored[s][1] for n, s in self._stored.items()}
        self.shapes = {n: stored[s][2] for n, s in self._stored.items()}

    def _describe(self, file: Path) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
        if file.suffix == ".safetensors":
            return hf.read_safetensors_header(file)
        return {n: (t.dtype, tuple(t.shape)) for n, t in self._read_torch(file).items()}

    def _read_torch(self, file: Path) -> dict[str, torch.Tensor]:
        return _unwrap_raw(_load_torch(file), str(file), self.key)

    def __len__(self) -> int:
        return len(self.names)

    def meta(self) -> dict[str, torch.Tensor]:
        """{name: tensor on the meta device}: shapes and dtypes without data, for make_plan."""
        return {n: torch.empty(self.shapes[n], dtype=self.dtypes[n] or torch.uint8,
                               device="meta") for n in self.names}

    def shards(self, names: Sequence[str] | None = None) -> list[tuple[Path, list[str]]]:
        """[(shard file, the wanted names it holds)], shards without wanted names left out."""
        wanted = self.names if names is None else names
        unknown = [n for n in wanted if n not in self._file]
        if unknown:
            raise TransferFastError(f"{self.path}: no tensor named {first_few(unknown, 3)}")
        by_file: dict[Path, list[str]] = {}
        for n in wanted:
            by_file.setdefault(self._file[n], []).append(n)
        return [(f, by_file[f]) for f in self.files if f in by_file]

    def load_shard(self, file: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """The tensors `names` (all in shard `file`) read from that one shard."""
        if file.suffix == ".safetensors":
            state = load_file(file)
            return {n: state[self._stored[n]] for n in names}
        state = self._read_torch(file)
        return {n: state[self._stored[n]] for n in names}

    def iter_shards(self, names: Sequence[str] | None = None
                    ) -> Iterator[dict[str, torch.Tensor]]:
        """The wanted tensors one shard at a time: at most one shard is held at once."""
        for file, in_file in self.shards(names):
            yield self.load_shard(file, in_file)

    def load(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """{name: tensor} for `names` (default: every tensor of a dtype torch knows), in order."""
        if names is None:
            names = [n for n in self.names if self.dtypes[n] is not None]
        loaded: dict[str, torch.Tensor] = {}
        for part in self.iter_shards(names):
            loaded.update(part)
        return {n: loaded[n] for n in names}


def open_checkpoint(path: str | Path, *, key: str | None = None) -> Checkpoint:
    """`Checkpoint` for a file, index file or model folder: list first, load shard by shard."""
    return Checkpoint(path, key=key)
