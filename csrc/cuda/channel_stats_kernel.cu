// Per (class, channel) statistics for channel_stats, with one read of x:
//   1. partials (the only pass over x): each (sample n, piece p, channel c) sums
//      d = x - shift and d^2 over its run of positions into a float64 pair at
//      partial[(n * P + p) * C + c]. Channels first, a group of lanes reduces
//      one contiguous run; channels last, a thread walks C-strided positions
//      and neighbouring threads read neighbouring channels: loads are coalesced
//      either way, and each lane keeps 8 loads in flight.
//   2. class_index (labelled calls only, one block): the samples of each class
//      in ascending order (a stable counting sort: class starts and members).
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
#include "element_types.cuh"

namespace transfer_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kIndexThreads = 1024;
constexpr int kMergeChannels = 32;
constexpr int kMaxSplits = 32;
constexpr int kUnroll = 8;       // loads in flight per lane of the pass over x
constexpr int kMergeUnroll = 4;  // and per merge thread (1024-thread blocks: few registers)
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

template <class E>
__device__ __forceinline__ double to_double(typename E::Bits v) {
  return static_cast<double>(to_acc(E{}, v));
}

// Adds d = p[j * stride] - sh and d^2 for j = j0, j0 + step, ... < end into
// (a, b), kUnroll loads at a time; missing lanes of the last round add zeros,
// which change no sum.
template <class E>
__device__ __forceinline__ void add_run(const typename E::Bits* __restrict__ p, int64_t stride,
                                        int64_t j, int64_t end, int64_t step, double sh,
                                        double& a, double& b) {
  for (; j < end; j += kUnroll * step) {
    double v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = j + u * step;
      v[u] = i < end ? to_double<E>(p[i * stride]) - sh : 0.0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      a += v[u];
      b = fma(v[u], v[u], b);
    }
  }
}

// Step 1, (N, C, S): a group of G lanes per (row, piece), row = n * C + c.
// shift_out (when the caller gave no shift) receives the value each channel
// used: its first element, taken by the group of sample 0, piece 0.
template <class E, int G>
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
        add_run<E>(x + row * S, 1, begin + lane, end, G, sh, a, b);
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
      const unsigned same = __match_any_sync(kFullMask, valid ? y : -1LL);
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
      const long long up = __shfl_up_sync(kFullMask, inclusive, offset);
      if (lane >= offset) inclusive += up;
    }
    if (lane == 31) warp_total[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      long long total = warp_total[lane];
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const long long up = __shfl_up_sync(kFullMask, total, offset);
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
  switch (plan.lanes) {
    case 4: partials_channels_first<E, 4><<<blocks, kThreads, 0, stream>>>(
                data, shift, N, C, S, P, plan.piece, out, shift_out); break;
    case 8: partials_channels_first<E, 8><<<blocks, kThreads, 0, stream>>>(
                data, shift, N, C, S, P, plan.piece, out, shift_out); break;
    case 16: partials_channels_first<E, 16><<<blocks, kThreads, 0, stream>>>(
                 data, shift, N, C, S, P, plan.piece, out, shift_out); break;
    case 32: partials_channels_first<E, 32><<<blocks, kThreads, 0, stream>>>(
                 data, shift, N, C, S, P, plan.piece, out, shift_out); break;
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
  StatsPlan plan{1, s.inner, 1, 1, 0};
  if (!s.channels_last) {
    plan.lanes = s.inner >= 128 ? 32 : (s.inner >= 64 ? 16 : (s.inner >= 32 ? 8 : 4));
  }
  const int64_t per_piece = s.samples * s.channels * plan.lanes;
  if (per_piece > 0 && s.inner > 0) {
    const int64_t target = s.channels_last ? kTargetThreads : kTargetLanes;
    const int64_t most = s.inner / (plan.lanes * kMinRun);
    const int64_t pieces = clamp(ceil_div(target, per_piece), 1, most < 1 ? 1 : most);
    plan.piece = ceil_div(s.inner, pieces);
    plan.pieces = ceil_div(s.inner, plan.piece);
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
