"""load_state: checkpoint, module or mapping -> ordered {name: tensor}; never runs pickled code."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import TransferFastError, first_few
from ..measure.plan import natural_key

StateSource = str | Path | nn.Module | Mapping
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")


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


def _load_error(path: Path, exc: Exception) -> TransferFastError:
    """One line for a failed torch.load; never torch's advice to disable weights_only."""
    text = str(exc)
    if "Unsupported global" in text:
        what = next((ln.split("GLOBAL", 1)[1].split(" was not")[0].strip()
                     for ln in text.splitlines() if "GLOBAL" in ln), "an object")
        return TransferFastError(
            f"{path}: refused to load: the checkpoint holds {what}, which only arbitrary "
            "unpickling could create, and running its code is unsafe (weights_only=True). "
            "Re-save it as a state_dict or .safetensors.")
    detail = next((ln.strip() for ln in text.splitlines()
                   if "WeightsUnpickler error" in ln or "Unsupported operand" in ln), None)
    detail = detail or f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
    return TransferFastError(f"{path}: unreadable or truncated checkpoint, or not a torch "
                             f"checkpoint ({detail[:160]})")


def _load_torch(path: Path) -> object:
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


def _unwrap(obj: object, origin: str) -> dict[str, torch.Tensor]:
    """The state dict inside {'state_dict': ...} / {'model': ...} style wrappers."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in _WRAPPER_KEYS if _holds_tensors(obj.get(k))), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise TransferFastError(f"{origin}: expected a state dict, got {type(obj).__name__}")
    state = {str(k): v.detach() for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        nested = [str(k) for k, v in obj.items() if _holds_tensors(v)]
        hint = (f"; tensors sit in nested entries {first_few(nested)}: pass the one holding "
                "the parameters") if nested else ""
        raise TransferFastError(f"{origin}: holds no tensors{hint}")
    return strip_module_prefix(state)


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DataParallel / DistributedDataParallel prefix every name with 'module.'."""
    if state and all(name.startswith("module.") for name in state):
        return {name[len("module."):]: v for name, v in state.items()}
    return state


def load_state(src: StateSource) -> dict[str, torch.Tensor]:
    """Ordered {name: tensor} from a path (.pt/.pth/.bin/.safetensors), a module or a mapping.

    Files are read with `weights_only=True`: a checkpoint that needs arbitrary
    unpickling is refused, its code never runs. Raises TransferFastError naming the
    file for missing, unreadable, truncated or tensor-less input.
    """
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.exists():
            raise TransferFastError(f"{path}: file not found")
        if not path.is_file():
            raise TransferFastError(f"{path}: not a file")
        if path.stat().st_size == 0:
            raise TransferFastError(f"{path}: empty file")
        obj = _load_safetensors(path) if path.suffix == ".safetensors" else _load_torch(path)
        return _unwrap(obj, str(path))
    if isinstance(src, (nn.Module, Mapping)):
        return _unwrap(src, type(src).__name__)
    raise TransferFastError(
        f"cannot load parameters from a {type(src).__name__}: expected a path, an nn.Module "
        "or a mapping of names to tensors"
    )
