"""load_state: checkpoint, module or mapping -> ordered {name: tensor}; never runs pickled code."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import TransferFastError
from .layers import natural_key

StateSource = str | Path | nn.Module | Mapping
_WRAPPER_KEYS = ("state_dict", "model")


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise TransferFastError(
            f"{path}: unreadable or truncated safetensors file ({exc})") from exc
    # The format stores names sorted as text; numeric order is closer to network order.
    return {name: state[name] for name in sorted(state, key=natural_key)}


def _load_torch(path: Path) -> object:
    try:
        # mmap keeps large checkpoints out of RAM until a tensor is touched; it
        # needs the zip format, so legacy files are read plainly below.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise TransferFastError(
            f"{path}: refused to load: the checkpoint holds pickled objects other than tensors "
            "and plain containers, and running its code is unsafe (weights_only=True). Re-save "
            "it as a state_dict or .safetensors."
        ) from exc
    except RuntimeError as exc:
        if "mmap" not in str(exc) and "zip" not in str(exc).lower():
            raise TransferFastError(f"{path}: unreadable or truncated checkpoint ({exc})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TransferFastError(f"{path}: refused to load: not a plain tensor checkpoint "
                                f"(weights_only=True): {exc}") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise TransferFastError(f"{path}: unreadable or truncated checkpoint ({exc})") from exc


def _unwrap(obj: object, origin: str) -> dict[str, torch.Tensor]:
    """Finds the state dict inside {'state_dict': ...} / {'model': ...} wrappers."""
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        obj = inner
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise TransferFastError(f"{origin}: expected a state dict, got {type(obj).__name__}")
    state = {str(k): v.detach() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise TransferFastError(f"{origin}: holds no tensors")
    # DataParallel / DistributedDataParallel prefix every name with 'module.'.
    if all(name.startswith("module.") for name in state):
        state = {name[len("module."):]: v for name, v in state.items()}
    return state


def load_state(src: StateSource) -> dict[str, torch.Tensor]:
    """Ordered {name: tensor} from a path (.pt/.pth/.bin/.safetensors), a module or a mapping.

    Files are read with `weights_only=True`: a checkpoint that needs arbitrary
    unpickling is refused, its code never runs. Raises TransferFastError naming the
    file for missing, unreadable, truncated or tensor-less input.
    """
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise TransferFastError(f"{path}: file not found")
        obj = _load_safetensors(path) if path.suffix == ".safetensors" else _load_torch(path)
        return _unwrap(obj, str(path))
    if isinstance(src, (nn.Module, Mapping)):
        return _unwrap(src, type(src).__name__)
    raise TransferFastError(
        f"cannot load parameters from a {type(src).__name__}: expected a path, an nn.Module "
        "or a mapping of names to tensors"
    )
