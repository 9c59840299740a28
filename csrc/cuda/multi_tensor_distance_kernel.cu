// Fused distance sums between every anchor set and every target set, for a
// list of separate tensors: the Source of distance_tile.cuh reads each
// tensor's address from a device pointer table.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/distance_sums.h"
#include "distance_tile.cuh"
#include "multi_tensor_distance_kernel.h"

namespace transfer_fast {
namespace {

struct TensorListSource {
  const int64_t* ptrs;  // (set, tensor) at set * T + tensor, as int64 bits
  const int64_t* rows;
  int64_t num_tensors;

  __device__ ChunkRef chunk(int64_t c) const {
    const int64_t* r = rows + c * kRowWidth;
    return {r[kRowTensor], r[kRowBegin], r[kRowEnd] - r[kRowBegin]};
  }
  template <class Bits>
  __device__ const Bits* start(const ChunkRef& ref, int64_t set) const {
    return reinterpret_cast<const Bits*>(ptrs[set * num_tensors + ref.tensor]) + ref.begin;
  }
};

}  // namespace

cudaError_t launch_multi_tensor_distance(ElementDtype dtype, const int64_t* ptrs,
                                         const int64_t* rows, int64_t num_anchor_sets,
                                         int64_t num_target_sets, int64_t num_tensors,
                                         int64_t num_rows, double* partials, double* out,
                                         cudaStream_t stream) {
  const TensorListSource src{ptrs, rows, num_tensors};
  return launch_distance(dtype, src, SlotLayout{num_anchor_sets, num_target_sets}, num_tensors,
                         rows, num_rows, partials, out, stream);
}

}  // namespace transfer_fast
