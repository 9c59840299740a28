// Launcher of the fused multi-tensor distance kernels. Plain C++ on purpose:
// the torch glue (.cpp) and the kernels (.cu) meet only here, so the .cu never
// needs torch headers and nvcc can compile it alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "element_dtype.h"

namespace transfer_fast {

// Enqueues both kernels on `stream` and returns the first launch error.
//   ptrs:     device int64 (A + K) * T: the address of (set s, tensor t) at
//             s * T + t; sets 0..A-1 are the anchors, A..A+K-1 the targets
//   rows:     device int64 (num_rows, 3) chunk rows (distance_sums.h), begin
//             and end counted from each tensor's first element
//   partials: device workspace of num_rows * SlotLayout{A, K}.size()
//             doubles, fully overwritten (may be null when num_rows == 0)
//   out:      device float64 (A, K, T, 5) result, fully overwritten
// Nothing is accumulated with atomics, so results are bitwise reproducible
// for the same inputs.
cudaError_t launch_multi_tensor_distance(ElementDtype dtype, const int64_t* ptrs,
                                         const int64_t* rows, int64_t num_anchor_sets,
                                         int64_t num_target_sets, int64_t num_tensors,
                                         int64_t num_rows, double* partials, double* out,
                                         cudaStream_t stream);

}  // namespace transfer_fast
