"""The resume state of a training run: every RNG state, and the state file itself (written
atomically through io.files, read back with weights_only=True)."""

from __future__ import annotations

import random as pyrandom
from pathlib import Path

import numpy as np
import torch

from ..errors import TransferFastError
from ..io.files import atomic_write


def rng_state(generator: torch.Generator | None) -> dict:
    """Every random source a training step may draw from (numpy's key as a tensor:
    the resume state is loaded with weights_only=True)."""
    _, keys, *rest = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": pyrandom.getstate(),
            "numpy": [torch.from_numpy(keys.astype(np.int64)), *rest],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data": generator.get_state() if generator is not None else None}


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    pyrandom.setstate(state["python"])
    keys, *rest = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), *rest))
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None:
        generator.set_state(state["data"])


def save_resume(path: Path, state: dict) -> None:
    """Replaces the resume state file atomically: a kill leaves the old one or the new one."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_resume(path: Path) -> dict:
    """The resume state saved by save_resume (tensors and plain types only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable or foreign file: the run cannot go on from it
        raise TransferFastError(f"{path}: unreadable resume state ({exc}); delete it to start "
                                "this run fresh") from exc
