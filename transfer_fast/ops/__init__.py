"""The only code that touches the compiled library: one routing function per op.

Each op chooses between the CUDA kernels, the CPU C++ kernels and the pure-torch
versions in `reference`; the rest of the package calls these functions only.
"""

from .dispatch import BACKENDS, KERNEL_DTYPES, backend_status, channel_stats, multi_tensor_distance
from .packed import PackedLayout, packed_distance

__all__ = ["BACKENDS", "KERNEL_DTYPES", "PackedLayout", "backend_status", "channel_stats",
           "multi_tensor_distance", "packed_distance"]
