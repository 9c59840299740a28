"""The only code that touches the compiled library: one routing function per op.

Each op chooses between the CUDA kernels, the CPU C++ kernels and the pure-torch
versions (`fallback`, and `reference` for what the fallback does not take); the
rest of the package calls these functions only.
"""

from .dispatch import (
    BACKENDS,
    KERNEL_DTYPES,
    SUM_NAMES,
    backend_status,
    channel_stats,
    multi_tensor_distance,
)
from .packed import PackedLayout, packed_distance

__all__ = ["BACKENDS", "KERNEL_DTYPES", "SUM_NAMES", "PackedLayout", "backend_status",
           "channel_stats", "multi_tensor_distance", "packed_distance"]
