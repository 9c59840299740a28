// Launcher of the channel_stats kernels. Plain C++, like the distance
// launcher: the glue and the .cu meet only here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "element_dtype.h"

namespace transfer_fast {

// Enqueues the kernels on `stream` and returns the first launch error.
//   x:        (N, C, S) or, with channels_last, (N, S, C) elements of `dtype`
//   shift:    float64 (C,) subtracted from every element before summing
//   labels:   int64 (N,) or null (every sample in class 0); labels outside
//             [0, num_classes) are skipped (the caller validates them)
//   row_sums: device workspace of 2 * N * C doubles, fully overwritten
//   count:    float64 (K,), s1, s2: float64 (K, C), fully overwritten: per
//             class the elements per channel; per (class, channel) the mean
//             (s1) and the centred sum of squares (s2), zeros for empty classes
// Each (class, channel) sum is added in sample order by one thread: no
// atomics, so results are bitwise reproducible.
cudaError_t launch_channel_stats(ElementDtype dtype, const void* x, const double* shift,
                                 const int64_t* labels, int64_t samples, int64_t channels,
                                 int64_t inner, int64_t num_classes, bool channels_last,
                                 double* row_sums, double* count, double* s1, double* s2,
                                 cudaStream_t stream);

}  // namespace transfer_fast
