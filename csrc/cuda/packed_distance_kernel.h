// Launcher of the packed distance kernels: plain C++, so the torch glue and
// the nvcc-compiled .cu meet only here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "element_dtype.h"

namespace transfer_fast {

// Enqueues both kernels on `stream` and returns the first launch error.
//   anchors:  device (A, L) elements of `dtype`, row i is anchor set i
//   targets:  device (K, L) elements of `dtype`
//   rows:     device int64 (num_rows, 3) chunk rows (distance_sums.h) with
//             begin and end counted from a set's first element. A row that
//             names a tensor outside [0, T) or elements outside [0, L), or
//             more than kChunkElems of them, is read as empty: the kernel
//             cannot raise, but it never reads outside the buffers.
//   partials: device workspace of num_rows * SlotLayout{A, K}.size()
//             doubles, fully overwritten (may be null when num_rows == 0)
//   out:      device float64 (A, K, T, 5), fully overwritten
// Bitwise reproducible; for the same values and chunk rows of the same sizes,
// bitwise equal to launch_multi_tensor_distance.
cudaError_t launch_packed_distance(ElementDtype dtype, const void* anchors, const void* targets,
                                   int64_t num_anchor_sets, int64_t num_target_sets,
                                   int64_t length, int64_t num_tensors, const int64_t* rows,
                                   int64_t num_rows, double* partials, double* out,
                                   cudaStream_t stream);

}  // namespace transfer_fast
