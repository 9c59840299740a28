// Fused distance sums for sets packed into flat buffers: the Source of
// distance_tile.cuh finds a chunk at a fixed stride per set, so the work map
// is the only metadata, built once per layout and kept on the device.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/distance_sums.h"
#include "distance_tile.cuh"
#include "packed_distance_kernel.h"

namespace transfer_fast {
namespace {

struct PackedSource {
  const char* anchors;
  const char* targets;
  int64_t num_anchor_sets;
  int64_t length;  // L: elements per set
  int64_t num_tensors;
  const int64_t* rows;

  __device__ ChunkRef chunk(int64_t c) const {
    const int64_t* r = rows + c * kRowWidth;
    const int64_t t = r[kRowTensor], begin = r[kRowBegin], end = r[kRowEnd];
    const bool readable = t >= 0 && t < num_tensors && begin >= 0 && begin <= end &&
                          end <= length && end - begin <= kChunkElems;
    return readable ? ChunkRef{t, begin, end - begin} : ChunkRef{t, 0, 0};
  }
  template <class Bits>
  __device__ const Bits* start(const ChunkRef& ref, int64_t set) const {
    const bool anchor = set < num_anchor_sets;
    const int64_t index = (anchor ? set : set - num_anchor_sets) * length + ref.begin;
    return reinterpret_cast<const Bits*>(anchor ? anchors : targets) + index;
  }
};

}  // namespace

cudaError_t launch_packed_distance(ElementDtype dtype, const void* anchors, const void* targets,
                                   int64_t num_anchor_sets, int64_t num_target_sets,
                                   int64_t length, int64_t num_tensors, const int64_t* rows,
                                   int64_t num_rows, double* partials, double* out,
                                   cudaStream_t stream) {
  const PackedSource src{static_cast<const char*>(anchors), static_cast<const char*>(targets),
                         num_anchor_sets, length, num_tensors, rows};
  return launch_distance(dtype, src, SlotLayout{num_anchor_sets, num_target_sets}, num_tensors,
                         rows, num_rows, partials, out, stream);
}

}  // namespace transfer_fast
