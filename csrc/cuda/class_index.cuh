// Step 2 of channel_stats for labelled calls: the samples of each class in
// ascending order, a stable counting sort in one block, without atomics.
// Included by channel_stats_kernel.cu only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace transfer_fast {
namespace stats {

constexpr int kIndexThreads = 1024;

// Step 2 (one block of kIndexThreads): members[starts[k] .. starts[k + 1]) are
// the samples of class k in ascending order; labels outside [0, K) belong to
// no class. Integer counts only, so the result is exact in any order.
__global__ void __launch_bounds__(kIndexThreads) class_index(
    const int64_t* __restrict__ labels, int64_t N, int64_t K, int64_t* __restrict__ counts,
    int64_t* __restrict__ rank, int64_t* __restrict__ starts, int64_t* __restrict__ members) {
  __shared__ long long warp_total[kIndexThreads / 32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  constexpr int kWarps = kIndexThreads / 32;
  for (int64_t k = tid; k < K; k += kIndexThreads) counts[k] = 0;
  __syncthreads();
  // Ranks: one warp walks the samples 32 at a time, in order. Lanes of one
  // class are ranked by lane after the class's members of earlier rounds; the
  // lowest of them then moves the class's count on.
  if (warp == 0) {
    for (int64_t base = 0; base < N; base += 32) {
      const int64_t n = base + lane;
      const long long y = n < N ? static_cast<long long>(labels[n]) : -1;
      const bool valid = y >= 0 && y < K;
      const unsigned same = __match_any_sync(0xffffffffu, valid ? y : -1LL);
      const unsigned lower = same & ((1u << lane) - 1u);
      const int64_t before = valid ? counts[y] : 0;
      if (valid) rank[n] = before + __popc(lower);
      __syncwarp();
      if (valid && lower == 0) counts[y] = before + __popc(same);
      __syncwarp();
    }
  }
  __syncthreads();
  // Starts: exclusive prefix sums of the counts, kIndexThreads classes a round.
  long long carry = 0;
  for (int64_t base = 0; base < K; base += kIndexThreads) {
    const int64_t k = base + tid;
    const long long v = k < K ? static_cast<long long>(counts[k]) : 0;
    long long inclusive = v;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const long long up = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += up;
    }
    if (lane == 31) warp_total[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      long long total = warp_total[lane];
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const long long up = __shfl_up_sync(0xffffffffu, total, offset);
        if (lane >= offset) total += up;
      }
      warp_total[lane] = total;  // inclusive over warps
    }
    __syncthreads();
    if (k < K) starts[k] = carry + (warp > 0 ? warp_total[warp - 1] : 0) + inclusive - v;
    carry += warp_total[kWarps - 1];
    __syncthreads();  // warp_total is rewritten by the next round
  }
  if (tid == 0) starts[K] = carry;
  __syncthreads();
  for (int64_t n = tid; n < N; n += kIndexThreads) {
    const int64_t y = labels[n];
    if (y >= 0 && y < K) members[starts[y] + rank[n]] = n;
  }
}

}  // namespace stats
}  // namespace transfer_fast
