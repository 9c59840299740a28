"""Every RNG state a training run resumes (its files are written through io.files)."""

from __future__ import annotations

import random as pyrandom

import numpy as np
import torch


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
