"""What a training run writes: atomic files, checkpoints, and every RNG state it resumes."""

from __future__ import annotations

import json
import os
import random as pyrandom
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp), fsync, rename over `path`: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:  # a failed write (a full disk) leaves no stray temporary behind
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def save_state(state: dict[str, torch.Tensor], path: Path) -> None:
    # A copy per tensor: safetensors refuses tied (shared) tensors and strided layouts.
    cpu = {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
           for k, v in state.items()}
    atomic_write(path, lambda p: save_file(cpu, str(p)))


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
