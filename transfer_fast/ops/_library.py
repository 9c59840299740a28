"""Loads the compiled library once and records which backends it provides, and why not."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("transfer_fast")

loaded = False
reason = ""
try:
    if os.environ.get("TRANSFER_FAST_DISABLE_EXT") == "1":
        raise ImportError("disabled by TRANSFER_FAST_DISABLE_EXT=1")
    from .. import _C  # noqa: F401  (loading registers the ops)

    loaded = True
except (ImportError, OSError) as exc:  # a missing or unloadable .so
    reason = f"{type(exc).__name__}: {exc}"
    log.warning("transfer_fast: compiled kernels unavailable (%s); using pure torch", reason)


OPS = ("multi_tensor_distance", "packed_distance", "channel_stats")
# Registrations happen once, when the library loads, so the table is made once here. A
# plain set lookup (not a call into torch._C) keeps the routing traceable by
# torch.compile(fullgraph=True).
_REGISTERED = frozenset(
    (key, op) for key in ("CPU", "CUDA") for op in OPS
    if loaded and torch._C._dispatch_has_kernel(f"transfer_fast::{op}")
    and torch._C._dispatch_has_kernel_for_dispatch_key(f"transfer_fast::{op}", key))


def has_kernel(dispatch_key: str, op: str = "multi_tensor_distance") -> bool:
    """Whether the compiled library registered `op` for 'CPU' or 'CUDA'."""
    return (dispatch_key, op) in _REGISTERED


def build_info() -> dict:
    """What setup.py decided when it built the library (empty when never built here)."""
    path = Path(__file__).parent.parent / "_build_info.json"
    return json.loads(path.read_text()) if path.exists() else {}
