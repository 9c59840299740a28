// Layout of the per-(anchor, target, tensor) sums shared by every backend.
// Kept free of torch and CUDA headers so the .cu kernels and the CPU kernels
// agree on it without including each other.
#pragma once

#include <cstdint>

namespace transfer_fast {

// Index of each sum in the last dimension of the op's (A, K, T, 5) result.
enum DistanceSum : int {
  kSumAbsDiff = 0,   // sum |a - b|
  kSumSqDiff = 1,    // sum (a - b)^2
  kSumDot = 2,       // sum a * b
  kSumAnchorSq = 3,  // sum a^2
  kSumTargetSq = 4,  // sum b^2
  kNumSums = 5,
};

// Elements per work item. Fixed (never derived from the thread or block
// count) so that partial sums, and therefore results, are identical whatever
// the parallelism.
constexpr int64_t kChunkElems = 1 << 16;

}  // namespace transfer_fast
