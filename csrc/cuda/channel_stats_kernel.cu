// Per (class, channel) statistics for channel_stats, with one read of x:
//   1. partials (the only pass over x): each (sample n, piece p, channel c) sums
//      d = x - shift and d^2 over its run of positions into a float64 pair at
//      partial[(n * P + p) * C + c]. Channels first, a group of lanes reduces
//      one contiguous run; channels last, a thread walks C-strided positions
//      and neighbouring threads read neighbouring channels: loads are coalesced
//      either way, 16 bytes wide where rows are aligned, and each lane keeps
//      several in flight (channel_stats_runs.cuh).
//   2. class_index (labelled calls only, one block): the samples of each class
//      in ascending order (a stable counting sort; class_index.cuh).
//   3. merge: per (class, channel), `splits` threads add fixed ranges of the
//      class's partials in sample order, one thread adds their results in split
//      order and finishes the statistics (channel_stats_finish.h, shared with
//      the CPU kernel).
// No atomics: every sum is added in an order fixed by the shape alone, so the
// results are bitwise reproducible. Only CUDA headers and our own: this file
// must build with plain nvcc.
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "../common/channel_stats_finish.h"
#include "channel_stats_kernel.h"
#include "channel_stats_runs.cuh"
#include "class_index.cuh"
#include "element_types.cuh"

namespace transfer_fast {
namespace {

using stats::add_run;
using stats::add_vectors;
using stats::class_index;
using stats::kIndexThreads;
using stats::to_double;

constexpr int kThreads = 256;
constexpr int kMergeChannels = 32;
constexpr int kMaxSplits = 32;
constexpr int64_t kPieceAlign = 8;  // pieces start on whole 16-byte vectors
constexpr int kMergeUnroll = 4;  // loads in flight per merge thread (1024-thread blocks)
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;  // grid-stride loops cover the rest
// Lanes (channels first) or threads (channels last) that keep a large GPU's
// memory busy; positions are cut into pieces only when the (sample, channel)
// rows alone give fewer, and never into runs shorter than kMinRun per lane.
constexpr int64_t kTargetLanes = int64_t{1} << 20;
constexpr int64_t kTargetThreads = int64_t{1} << 18;
constexpr int64_t kMinRun = 16;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t clamp(int64_t v, int64_t lo, int64_t hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Step 1, (N, C, S): a group of G lanes per (row, piece), row = n * C + c.
// shift_out (when the caller gave no shift) receives the value each channel
// used: its first element, taken by the group of sample 0, piece 0.
template <class E, int G, bool kVector>
__global__ void __launch_bounds__(kThreads) partials_channels_first(
    const typename E::Bits* __restrict__ x, const double* __restrict__ shift, int64_t N,
    int64_t C, int64_t S, int64_t P, int64_t piece, double2* __restrict__ out,
    double* __restrict__ shift_out) {
  constexpr int kGroups = 32 / G;
  const int lane = threadIdx.x % G;
  const int group = (threadIdx.x % 32) / G;
  const int64_t items = N * C * P;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kThreads / 32);
  // The bound is the warp's, so every lane reaches the shuffles below.
  for (int64_t first = warp * kGroups; first < items; first += warps * kGroups) {
    const int64_t w = first + group;
    const int64_t row = w / P, p = w - row * P;
    double a = 0.0, b = 0.0;
    if (w < items) {
      const int64_t begin = p * piece, end = begin + piece < S ? begin + piece : S;
      if (begin < end) {
        const int64_t c = row % C;
        const double sh = shift != nullptr ? shift[c] : to_double<E>(x[c * S]);
        if (shift_out != nullptr && row < C && p == 0 && lane == 0) shift_out[c] = sh;
        if constexpr (kVector) {
          add_vectors<E>(x + row * S, begin, end, lane, G, sh, a, b);
        } else {
          add_run<E>(x + row * S, 1, begin + lane, end, G, sh, a, b);
        }
      }
    }
#pragma unroll
    for (int offset = G / 2; offset > 0; offset /= 2) {
      a += __shfl_down_sync(kFullMask, a, offset, G);
      b += __shfl_down_sync(kFullMask, b, offset, G);
    }
    if (w < items && lane == 0) {
      const int64_t n = row / C, c = row - n * C;
      out[(n * P + p) * C + c] = make_double2(a, b);
    }
  }
}

// Step 1, (N, S, C): thread i takes (n * P + p, c) = divmod(i, C) and walks
// its piece's positions, C elements apart.
template <class E>
__global__ void __launch_bounds__(kThreads) partials_channels_last(
    const typename E::Bits* __restrict__ x, const double* __restrict__ shift, int64_t N,
    int64_t C, int64_t S, int64_t P, int64_t piece, double2* __restrict__ out,
    double* __restrict__ shift_out) {
  const int64_t items = N * P * C;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < items;
       i += stride) {
    const int64_t t = i / C, c = i - t * C;
    const int64_t n = t / P, p = t - n * P;
    const int64_t begin = p * piece, end = begin + piece < S ? begin + piece : S;
    double a = 0.0, b = 0.0;
    if (begin < end) {
      const double sh = shift != nullptr ? shift[c] : to_double<E>(x[c]);
      if (shift_out != nullptr && t == 0) shift_out[c] = sh;
      add_run<E>(x + n * S * C + c, C, begin, end, 1, sh, a, b);
    }
    out[i] = make_double2(a, b);
  }
}

// Step 3: block (kMergeChannels, splits) per (channel tile, class). Split y
// adds the partials of members [lo + len * y / splits, lo + len * (y + 1) /
// splits) of the class, kMergeUnroll members at a time, pieces in order; split 0
// then adds the other splits' sums in order and finishes.
template <bool kLabelled>
__global__ void __launch_bounds__(kMergeChannels * kMaxSplits) merge_classes(
    const double2* __restrict__ partial, const int64_t* __restrict__ starts,
    const int64_t* __restrict__ members, int64_t N, int64_t C, int64_t S, int64_t P, int64_t K,
    const double* __restrict__ shift, double* __restrict__ count, double* __restrict__ mean,
    double* __restrict__ m2) {
  __shared__ double2 split_sums[kMaxSplits][kMergeChannels];
  const int splits = static_cast<int>(blockDim.y), y = threadIdx.y, x = threadIdx.x;
  const int64_t tiles = C > 0 ? ceil_div(C, kMergeChannels) : 1;
  for (int64_t k = blockIdx.y; k < K; k += gridDim.y) {
    const int64_t lo = kLabelled ? starts[k] : 0, hi = kLabelled ? starts[k + 1] : N;
    const int64_t len = hi - lo;
    const int64_t first = lo + len * y / splits, last = lo + len * (y + 1) / splits;
    const double elements = static_cast<double>(len) * static_cast<double>(S);
    if (blockIdx.x == 0 && x == 0 && y == 0) count[k] = elements;
    for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int64_t c = tile * kMergeChannels + x;
      double a = 0.0, b = 0.0;
      if (c < C) {
        for (int64_t j = first; j < last; j += kMergeUnroll) {
          int64_t n[kMergeUnroll];
#pragma unroll
          for (int u = 0; u < kMergeUnroll; ++u) {
            n[u] = j + u < last ? (kLabelled ? members[j + u] : j + u) : -1;
          }
          for (int64_t p = 0; p < P; ++p) {
            double2 v[kMergeUnroll];
#pragma unroll
            for (int u = 0; u < kMergeUnroll; ++u) {
              v[u] = n[u] >= 0 ? partial[(n[u] * P + p) * C + c] : make_double2(0.0, 0.0);
            }
#pragma unroll
            for (int u = 0; u < kMergeUnroll; ++u) {
              a += v[u].x;
              b += v[u].y;
            }
          }
        }
      }
      split_sums[y][x] = make_double2(a, b);
      __syncthreads();
      if (y == 0 && c < C) {
        for (int s = 1; s < splits; ++s) {
          a += split_sums[s][x].x;
          b += split_sums[s][x].y;
        }
        finish_channel_stat(elements, elements > 0 ? shift[c] : 0.0, a, b);
        mean[k * C + c] = a;
        m2[k * C + c] = b;
      }
      __syncthreads();  // split_sums is rewritten for the next tile
    }
  }
}

template <class E, int G>
void launch_channels_first(int blocks, cudaStream_t stream, bool vector,
                           const typename E::Bits* x, const double* shift, int64_t N, int64_t C,
                           int64_t S, int64_t P, int64_t piece, double2* out,
                           double* shift_out) {
  if (vector) {
    partials_channels_first<E, G, true><<<blocks, kThreads, 0, stream>>>(
        x, shift, N, C, S, P, piece, out, shift_out);
  } else {
    partials_channels_first<E, G, false><<<blocks, kThreads, 0, stream>>>(
        x, shift, N, C, S, P, piece, out, shift_out);
  }
}

template <class E>
cudaError_t launch_partials(const void* x, const double* shift, const StatsShape& s,
                            const StatsPlan& plan, double2* out, double* shift_out,
                            cudaStream_t stream) {
  const auto* data = static_cast<const typename E::Bits*>(x);
  const int64_t N = s.samples, C = s.channels, S = s.inner, P = plan.pieces;
  const int64_t threads = N * C * P * (s.channels_last ? 1 : plan.lanes);
  const int blocks = static_cast<int>(clamp(ceil_div(threads, kThreads), 1, kMaxBlocks));
  if (s.channels_last) {
    partials_channels_last<E><<<blocks, kThreads, 0, stream>>>(data, shift, N, C, S, P,
                                                               plan.piece, out, shift_out);
    return cudaGetLastError();
  }
  const bool vector = plan.vector && s.element_bytes == static_cast<int>(sizeof(*data));
  switch (plan.lanes) {
    case 4: launch_channels_first<E, 4>(blocks, stream, vector, data, shift, N, C, S, P,
                                        plan.piece, out, shift_out); break;
    case 8: launch_channels_first<E, 8>(blocks, stream, vector, data, shift, N, C, S, P,
                                        plan.piece, out, shift_out); break;
    case 16: launch_channels_first<E, 16>(blocks, stream, vector, data, shift, N, C, S, P,
                                          plan.piece, out, shift_out); break;
    case 32: launch_channels_first<E, 32>(blocks, stream, vector, data, shift, N, C, S, P,
                                          plan.piece, out, shift_out); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Workspace regions, in order: partials (double2), the shift used (C), then
// for labelled calls counts (K), ranks (N), starts (K + 1), members (N).
struct Workspace {
  double2* partial;
  double* shift_used;
  int64_t* counts;
  int64_t* rank;
  int64_t* starts;
  int64_t* members;
  int64_t bytes;
};

Workspace carve(const StatsShape& s, int64_t pieces, void* base) {
  char* p = static_cast<char*>(base);
  Workspace w{};
  int64_t offset = 0;
  auto take = [&](int64_t bytes) {
    char* at = p == nullptr ? nullptr : p + offset;
    offset += ceil_div(bytes, 16) * 16;
    return at;
  };
  w.partial = reinterpret_cast<double2*>(take(s.samples * pieces * s.channels * 16));
  w.shift_used = reinterpret_cast<double*>(take(s.channels * 8));
  if (s.labelled) {
    w.counts = reinterpret_cast<int64_t*>(take(s.classes * 8));
    w.rank = reinterpret_cast<int64_t*>(take(s.samples * 8));
    w.starts = reinterpret_cast<int64_t*>(take((s.classes + 1) * 8));
    w.members = reinterpret_cast<int64_t*>(take(s.samples * 8));
  }
  w.bytes = offset;
  return w;
}

}  // namespace

StatsPlan plan_channel_stats(const StatsShape& s) {
  StatsPlan plan{1, s.inner, 1, false, 1, 0};
  plan.vector = s.vector_loads && !s.channels_last && s.element_bytes > 0 &&
                (s.inner * s.element_bytes) % 16 == 0;
  // A lane's units of work: elements, or 16-byte vectors of them.
  const int64_t units = plan.vector ? s.inner * s.element_bytes / 16 : s.inner;
  if (!s.channels_last) {
    plan.lanes = units >= 128 ? 32 : (units >= 64 ? 16 : (units >= 32 ? 8 : 4));
  }
  const int64_t per_piece = s.samples * s.channels * plan.lanes;
  if (per_piece > 0 && s.inner > 0) {
    const int64_t target = s.channels_last ? kTargetThreads : kTargetLanes;
    const int64_t most = units / (plan.lanes * kMinRun);
    const int64_t pieces = clamp(ceil_div(target, per_piece), 1, most < 1 ? 1 : most);
    if (pieces > 1) {  // whole vectors per piece; the last piece may be shorter
      plan.piece = ceil_div(ceil_div(s.inner, pieces), kPieceAlign) * kPieceAlign;
      plan.pieces = ceil_div(s.inner, plan.piece);
    }
  }
  // Partials each merge thread would add alone; splitting shortens the chain of
  // dependent additions when a class has many samples.
  const int64_t work =
      (s.labelled ? s.samples / (s.classes > 0 ? s.classes : 1) : s.samples) * plan.pieces;
  plan.splits = 1;
  while (plan.splits < kMaxSplits && work >= 16 * plan.splits) plan.splits *= 2;
  plan.workspace_bytes = s.samples > 0 ? carve(s, plan.pieces, nullptr).bytes : 0;
  return plan;
}

cudaError_t launch_channel_stats(ElementDtype dtype, const void* x, const double* shift,
                                 const int64_t* labels, const StatsShape& s,
                                 const StatsPlan& plan, void* workspace, double* count,
                                 double* mean, double* m2, cudaStream_t stream) {
  const int64_t N = s.samples, C = s.channels, K = s.classes;
  if (N == 0) {  // zero sums are already finished statistics: zeros for every class
    for (auto [ptr, n] : {std::pair<double*, int64_t>{count, K}, {mean, K * C}, {m2, K * C}}) {
      if (n == 0) continue;
      const cudaError_t err = cudaMemsetAsync(ptr, 0, n * sizeof(double), stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  const Workspace w = carve(s, plan.pieces, workspace);
  if (s.labelled) {
    class_index<<<1, kIndexThreads, 0, stream>>>(labels, N, K, w.counts, w.rank, w.starts,
                                                 w.members);
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  double* shift_out = shift == nullptr ? w.shift_used : nullptr;
  if (C > 0) {
    const cudaError_t err = dispatch_element(dtype, [&](auto tag) {
      return launch_partials<decltype(tag)>(x, shift, s, plan, w.partial, shift_out, stream);
    });
    if (err != cudaSuccess) return err;
  }
  const dim3 block(kMergeChannels, static_cast<unsigned>(plan.splits));
  const dim3 grid(static_cast<unsigned>(clamp(ceil_div(C, kMergeChannels), 1, 65535)),
                  static_cast<unsigned>(clamp(K, 1, 65535)));
  const double* used = shift != nullptr ? shift : w.shift_used;
  if (s.labelled) {
    merge_classes<true><<<grid, block, 0, stream>>>(w.partial, w.starts, w.members, N, C,
                                                    s.inner, plan.pieces, K, used, count,
                                                    mean, m2);
  } else {
    merge_classes<false><<<grid, block, 0, stream>>>(w.partial, nullptr, nullptr, N, C,
                                                     s.inner, plan.pieces, K, used, count,
                                                     mean, m2);
  }
  return cudaGetLastError();
}

}  // namespace transfer_fast
