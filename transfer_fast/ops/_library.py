"""Loads the compiled library once and records which backends it provides, and why not."""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
import sys
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


OPS = ("multi_tensor_distance", "packed_distance", "packed_chunks", "channel_stats")
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
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


# A shape mismatch the kernel refuses with TORCH_CHECK: a C++ exception thrown in the
# library that must arrive in Python as a RuntimeError.
_PROBE = """
import torch
import transfer_fast._C
try:
    torch.ops.transfer_fast.multi_tensor_distance([torch.ones(2)], [torch.ones(3)], 1)
except RuntimeError:
    print("raised")
"""


@functools.cache
def exceptions_work(timeout: float = 120.0) -> tuple[bool, str]:
    """Whether an error raised inside the compiled library reaches Python as an exception.

    A library built with a compiler wrapper that breaks C++ exception handling turns
    every such error into a crash (SIGSEGV or SIGABRT). The probe runs in a child
    process (`sys.executable -c ...`), so a crash costs nothing here. Returns (ok, what
    happened); with no compiled library loaded there is nothing to break: (True, why).
    """
    if not loaded:
        return True, f"no compiled library loaded ({reason}): nothing to check"
    root = str(Path(__file__).resolve().parent.parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"the check could not run ({type(exc).__name__}: {exc})"
    if proc.returncode == 0 and "raised" in proc.stdout:
        return True, "C++ errors arrive as Python exceptions"
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name
        return False, (f"a C++ error killed the process ({name}): the library was built with "
                       "a compiler that breaks C++ exceptions; rebuild it with the system "
                       "compiler (CXX=g++ CC=gcc pip install --no-build-isolation -e .)")
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return False, f"the check failed (exit status {proc.returncode}: {last[:200]})"
