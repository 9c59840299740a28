// Launcher of the channel_stats kernels. Plain C++, like the distance
// launcher: the glue and the .cu meet only here.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "element_dtype.h"

namespace transfer_fast {

// Shapes of one call: x is (N, C, S), or (N, S, C) with channels_last.
struct StatsShape {
  int64_t samples;   // N
  int64_t channels;  // C
  int64_t inner;     // S
  int64_t classes;   // K
  bool labelled;
  bool channels_last;
  int element_bytes;    // 2, 4 or 8
  bool vector_loads;    // channels first, rows 16-byte aligned: 16-byte loads
};

// How the one pass over x is cut, a function of the shape alone (so results are
// bitwise reproducible): every (sample, channel) splits its S positions into
// `pieces` runs of `piece` positions, each reduced to one float64 partial pair.
struct StatsPlan {
  int64_t pieces;           // P >= 1
  int64_t piece;            // positions per piece (the last may be shorter)
  int lanes;                // channels first: lanes reducing one piece (4..32)
  bool vector;              // channels first: 16-byte loads (aligned rows and pieces)
  int splits;               // merge: threads (in fixed ranges) per (class, channel)
  int64_t workspace_bytes;  // device scratch the launch needs (partials, class index)
};

StatsPlan plan_channel_stats(const StatsShape& shape);

// Enqueues the kernels on `stream` and returns the first launch error.
//   x:         elements of `dtype` in the layout of `shape`
//   shift:     float64 (C,) subtracted from every element before summing, or
//              null: then each channel's first element (sample 0, position 0)
//   labels:    int64 (N,) when shape.labelled, else null (one class); labels
//              outside [0, K) are skipped (the caller validates them)
//   workspace: plan.workspace_bytes of device memory, 16-byte aligned
//   count:     float64 (K,), mean, m2: float64 (K, C), fully overwritten: per
//              class the elements per channel; per (class, channel) the mean
//              and the centred sum of squares, zeros for empty classes.
// Every sum is added in an order fixed by the shape: no atomics, so results are
// bitwise reproducible.
cudaError_t launch_channel_stats(ElementDtype dtype, const void* x, const double* shift,
                                 const int64_t* labels, const StatsShape& shape,
                                 const StatsPlan& plan, void* workspace, double* count,
                                 double* mean, double* m2, cudaStream_t stream);

}  // namespace transfer_fast
