// Per (class, channel) shifted sums for channel_stats, in three steps:
//   1. one value pair per (sample, channel) row: sum d and sum d^2 over the
//      row's S positions, d = x - shift, in float64 (a warp per row when the
//      row is contiguous, a thread per row when channels are innermost, so
//      loads stay coalesced either way);
//   2. a thread per channel adds the rows of each sample, in sample order,
//      into the sums of the sample's class: deterministic without atomics,
//      and the cost does not grow with the number of classes;
//   3. a thread per (class, channel) turns the sums into the mean and the
//      centred sum of squares (channel_stats_finish.h, shared with the CPU).
// Only CUDA headers and our own: this file must build with plain nvcc.
#include <cuda_runtime.h>

#include <cstdint>

#include "../common/channel_stats_finish.h"
#include "channel_stats_kernel.h"
#include "element_types.cuh"

namespace transfer_fast {
namespace {

constexpr int kThreads = 256;

template <class E>
__device__ __forceinline__ double to_double(typename E::Bits v) {
  return static_cast<double>(to_acc(E{}, v));
}

// Step 1, (N, C, S): warp w of the grid takes rows w, w + warps, ...
template <class E>
__global__ void __launch_bounds__(kThreads) row_sums_channels_first(
    const typename E::Bits* __restrict__ x, const double* __restrict__ shift, int64_t rows, int64_t C,
    int64_t S, double* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32; r < rows;
       r += warps) {
    const typename E::Bits* row = x + r * S;
    const double sh = shift[r % C];
    double a = 0.0, b = 0.0;
    for (int64_t j = lane; j < S; j += 32) {
      const double v = to_double<E>(row[j]) - sh;
      a += v;
      b = fma(v, v, b);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      a += __shfl_down_sync(0xffffffffu, a, offset);
      b += __shfl_down_sync(0xffffffffu, b, offset);
    }
    if (lane == 0) {
      out[2 * r] = a;
      out[2 * r + 1] = b;
    }
  }
}

// Step 1, (N, S, C): thread i of the grid takes the row (n, c) = divmod(i, C)
// and walks its S positions, C elements apart; neighbouring threads read
// neighbouring channels.
template <class E>
__global__ void __launch_bounds__(kThreads) row_sums_channels_last(
    const typename E::Bits* __restrict__ x, const double* __restrict__ shift, int64_t rows, int64_t C,
    int64_t S, double* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; r < rows;
       r += stride) {
    const int64_t n = r / C, c = r % C;
    const typename E::Bits* p = x + n * S * C + c;
    const double sh = shift[c];
    double a = 0.0, b = 0.0;
    for (int64_t s = 0; s < S; ++s) {
      const double v = to_double<E>(p[s * C]) - sh;
      a += v;
      b = fma(v, v, b);
    }
    out[2 * r] = a;
    out[2 * r + 1] = b;
  }
}

// Step 2: thread c adds rows (n, c) for n = 0..N-1 into its class.
__global__ void __launch_bounds__(kThreads) class_sums(
    const double* __restrict__ rows, const int64_t* __restrict__ labels, int64_t N, int64_t C,
    int64_t K, double* __restrict__ s1, double* __restrict__ s2) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; c < C;
       c += stride) {
    for (int64_t n = 0; n < N; ++n) {
      const int64_t k = labels ? labels[n] : 0;
      if (k < 0 || k >= K) continue;
      s1[k * C + c] += rows[2 * (n * C + c)];
      s2[k * C + c] += rows[2 * (n * C + c) + 1];
    }
  }
}

// Elements per channel of each class: one thread, in sample order (N is small next
// to the N * C * S elements of step 1), also when there are no channels.
__global__ void class_counts(const int64_t* __restrict__ labels, int64_t N, int64_t S,
                             int64_t K, double* __restrict__ count) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t k = labels ? labels[n] : 0;
    if (k >= 0 && k < K) count[k] += static_cast<double>(S);
  }
}

// Step 3: sums -> mean and centred sum of squares, in place, per (class, channel).
__global__ void __launch_bounds__(kThreads) finish_stats(
    const double* __restrict__ count, const double* __restrict__ shift, int64_t K, int64_t C,
    double* __restrict__ s1, double* __restrict__ s2) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < K * C;
       i += stride) {
    finish_channel_stat(count[i / C], shift[i % C], s1[i], s2[i]);
  }
}

int grid_for(int64_t work_items, int items_per_block) {
  const int64_t blocks = (work_items + items_per_block - 1) / items_per_block;
  // Grid-stride loops cover the rest; 65535 blocks keep every GPU busy.
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

template <class E>
cudaError_t launch_rows(const void* x, const double* shift, int64_t N, int64_t C, int64_t S,
                        bool channels_last, double* out, cudaStream_t stream) {
  const int64_t rows = N * C;
  const auto* data = static_cast<const typename E::Bits*>(x);
  if (channels_last) {
    row_sums_channels_last<E><<<grid_for(rows, kThreads), kThreads, 0, stream>>>(
        data, shift, rows, C, S, out);
  } else {
    row_sums_channels_first<E><<<grid_for(rows, kThreads / 32), kThreads, 0, stream>>>(
        data, shift, rows, C, S, out);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_channel_stats(ElementDtype dtype, const void* x, const double* shift,
                                 const int64_t* labels, int64_t samples, int64_t channels,
                                 int64_t inner, int64_t num_classes, bool channels_last,
                                 double* row_sums, double* count, double* s1, double* s2,
                                 cudaStream_t stream) {
  const int64_t K = num_classes, C = channels;
  for (auto [ptr, n] : {std::pair<double*, int64_t>{count, K}, {s1, K * C}, {s2, K * C}}) {
    const cudaError_t err = cudaMemsetAsync(ptr, 0, n * sizeof(double), stream);
    if (err != cudaSuccess) return err;
  }
  // Zero sums are already finished stats: mean 0 and m2 0 for every class.
  if (samples == 0) return cudaSuccess;
  class_counts<<<1, 1, 0, stream>>>(labels, samples, inner, K, count);
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  if (C == 0) return cudaSuccess;
  const cudaError_t err = dispatch_element(dtype, [&](auto tag) {
    return launch_rows<decltype(tag)>(x, shift, samples, C, inner, channels_last, row_sums,
                                      stream);
  });
  if (err != cudaSuccess) return err;
  class_sums<<<grid_for(C, kThreads), kThreads, 0, stream>>>(row_sums, labels, samples, C, K,
                                                             s1, s2);
  if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  finish_stats<<<grid_for(K * C, kThreads), kThreads, 0, stream>>>(count, shift, K, C, s1, s2);
  return cudaGetLastError();
}

}  // namespace transfer_fast
