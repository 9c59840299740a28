// Launcher of the fused multi-tensor distance kernels. Plain C++ on purpose:
// the torch glue (.cpp) and the kernels (.cu) meet only here, so the .cu never
// needs torch headers and nvcc can compile it alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "element_dtype.h"

namespace transfer_fast {

// Layout of the single int64 metadata buffer the glue fills on the host
// (pinned) and copies to the device. One buffer, one copy: with A + K ~ 34
// sets the pointer table is too large for kernel arguments.
//
//   [numel_offset(),       + T)            numel of tensor t
//   [ptr_offset(),         + S*T)          data pointer of (set s, tensor t)
//                                          at s*T + t; sets 0..A-1 are the
//                                          anchors, A..A+K-1 the targets
//   [chunk_begin_offset(), + T+1)          first chunk of tensor t; entry T
//                                          is the total chunk count, so
//                                          tensor t owns [begin[t], begin[t+1])
//   [chunk_map_offset(),   + 2*chunks)     chunk c: (tensor index, first
//                                          element); chunks of one tensor are
//                                          consecutive and in element order
//
// Pointers are stored as the int64 bit pattern of the address.
struct DistanceMetaLayout {
  int64_t num_tensors;  // T
  int64_t num_sets;     // S = A + K
  int64_t num_chunks;

  int64_t numel_offset() const { return 0; }
  int64_t ptr_offset() const { return num_tensors; }
  int64_t chunk_begin_offset() const {
    return ptr_offset() + num_sets * num_tensors;
  }
  int64_t chunk_map_offset() const {
    return chunk_begin_offset() + num_tensors + 1;
  }
  int64_t total() const { return chunk_map_offset() + 2 * num_chunks; }
};

// Number of partial sums each chunk produces: 3 per (anchor, target) pair
// (|a-b|, (a-b)^2, a*b), then one a^2 per anchor, then one b^2 per target.
inline int64_t distance_num_slots(int64_t num_anchor_sets,
                                  int64_t num_target_sets) {
  return 3 * num_anchor_sets * num_target_sets + num_anchor_sets +
         num_target_sets;
}

// Enqueues both kernels on `stream` and returns the first launch error.
//   meta:     device copy of the buffer described by DistanceMetaLayout
//   partials: device workspace of num_chunks * distance_num_slots(A, K)
//             doubles, fully overwritten (may be null when num_chunks == 0)
//   out:      device float64 (A, K, T, 5) result, fully overwritten
// Nothing is accumulated with atomics, so results are bitwise reproducible
// for the same inputs.
cudaError_t launch_multi_tensor_distance(ElementDtype dtype,
                                         const int64_t* meta,
                                         int64_t num_anchor_sets,
                                         int64_t num_target_sets,
                                         int64_t num_tensors,
                                         int64_t num_chunks, double* partials,
                                         double* out, cudaStream_t stream);

}  // namespace transfer_fast
