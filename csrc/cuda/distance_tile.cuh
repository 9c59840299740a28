// Device code shared by the fused distance kernels of multi_tensor_distance
// and packed_distance (multi_tensor_apply lineage: a flat list of chunk rows
// over all tensors, one block per chunk and tile of sets, per-chunk partials,
// then a cleanup that adds each tensor's partials in row order, no atomics).
// The two ops differ only in their Source, which tells a block where its
// chunk starts in each set:
//   struct Source {
//     __device__ ChunkRef chunk(int64_t row) const;  // size 0: nothing to read
//     template <class Bits> __device__ const Bits* start(const ChunkRef&, int64_t set) const;
//   };  // sets 0..A-1 are the anchors, A..A+K-1 the targets
// Only CUDA headers and our own: the including .cu builds with plain nvcc.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../common/distance_sums.h"
#include "element_types.cuh"

namespace transfer_fast {
namespace {

// Fixed, like kChunkElems: the element-to-thread mapping and the reduction
// tree (hence the rounding) must not depend on the device or the launch.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 16-byte loads per set issued before any is consumed, to cover HBM latency.
constexpr int kUnroll = 4;
// Tile caps: 2 anchors (the usual A) x 8 targets is 48 float pair sums; the
// double path takes 4 targets for the same register bytes. Both fit the 128
// registers of 2 blocks/SM without spills on sm_80 and sm_90.
constexpr int kTileAnchors = 2;
template <class E>
constexpr int kTileTargets = sizeof(typename E::Bits) == 8 ? 4 : 8;

static_assert(kChunkElems % (16 * kThreads) == 0,
              "chunk starts must keep 16-byte alignment for every dtype");

struct ChunkRef {
  int64_t tensor;
  int64_t begin;
  int64_t size;
};

template <class E>
constexpr int kVec = static_cast<int>(16 / sizeof(typename E::Bits));  // elements per 16 B

// Explicit fma/abs so that the result does not depend on -fmad contraction.
__device__ __forceinline__ float mul_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double mul_add(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float abs_val(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_val(double x) { return fabs(x); }

template <class E>
__device__ __forceinline__ void unpack(const uint4& r, typename E::Acc (&v)[kVec<E>]) {
  const unsigned int w[4] = {r.x, r.y, r.z, r.w};  // little-endian: low half first
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (sizeof(typename E::Bits) == 2) {
      v[2 * j] = to_acc(E{}, static_cast<unsigned short>(w[j] & 0xffffu));
      v[2 * j + 1] = to_acc(E{}, static_cast<unsigned short>(w[j] >> 16));
    } else if constexpr (sizeof(typename E::Bits) == 4) {
      v[j] = to_acc(E{}, w[j]);
    } else if (j % 2 == 0) {
      v[j / 2] = to_acc(E{}, (static_cast<unsigned long long>(w[j + 1]) << 32) | w[j]);
    }
  }
}

// kUnroll vectors of one set; zeros past the end add 0 to every sum.
__device__ __forceinline__ void load_row(uint4 (&r)[kUnroll], const void* p, int64_t row,
                                         int64_t nvec) {
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t v = row + static_cast<int64_t>(u) * kThreads;
    r[u] = v < nvec ? __ldg(static_cast<const uint4*>(p) + v) : make_uint4(0u, 0u, 0u, 0u);
  }
}

// Per-thread sums of one block's tile of kMaxA anchors x kMaxG targets, flat:
// 3 per pair, then a^2 per anchor, then b^2 per target. After unrolling every
// index is a constant, so the array stays in registers.
template <class E, int kMaxA, int kMaxG>
struct TileSums {
  using Acc = typename E::Acc;
  static constexpr int kPairs = 3 * kMaxA * kMaxG;
  static constexpr int kSlots = kPairs + kMaxA + kMaxG;
  Acc v[kSlots] = {};
  __device__ __forceinline__ void pair(int i, int g, Acc a, Acc b) {
    Acc* p = v + 3 * (i * kMaxG + g);
    const Acc d = a - b;
    p[kSumAbsDiff] += abs_val(d);
    p[kSumSqDiff] = mul_add(d, d, p[kSumSqDiff]);
    p[kSumDot] = mul_add(a, b, p[kSumDot]);
  }
  __device__ __forceinline__ void square(int slot, Acc x) { v[slot] = mul_add(x, x, v[slot]); }
  __device__ __forceinline__ void squares(int slot, const uint4& r) {
    Acc x[kVec<E>];
    unpack<E>(r, x);
    for (int j = 0; j < kVec<E>; ++j) square(slot, x[j]);
  }
};

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Block b handles chunk row b / num_groups for tile b % num_groups (up to
// kMaxA anchors x kMaxG targets). Capping the tile bounds registers for any
// A*K; looping over all targets inside a block instead would re-read the
// 64K-element anchor chunk per target after it has left L1. A target is read
// by one block per anchor group (once when A <= kMaxA); the sibling blocks of
// a chunk have adjacent indices, run together and share anchors via L2.
template <class E, int kMaxA, int kMaxG, class Source>
__global__ void __launch_bounds__(kThreads, 2)
distance_partials_kernel(Source src, SlotLayout slots, int64_t num_target_groups,
                         int64_t num_groups, double* __restrict__ partials) {
  using Acc = typename E::Acc;
  using Bits = typename E::Bits;
  using Sums = TileSums<E, kMaxA, kMaxG>;
  constexpr int V = kVec<E>;
  const int64_t A = slots.anchors, K = slots.targets;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) / num_groups;
  const int64_t group = static_cast<int64_t>(blockIdx.x) - chunk * num_groups;
  const int64_t a0 = (group / num_target_groups) * kMaxA;
  const int64_t k0 = (group % num_target_groups) * kMaxG;
  const int na = static_cast<int>(A - a0 < kMaxA ? A - a0 : kMaxA);
  const int ng = static_cast<int>(K - k0 < kMaxG ? K - k0 : kMaxG);
  // Squares are per set, not per pair: give each exactly one writer block.
  const bool own_asq = k0 == 0;
  const bool own_bsq = a0 == 0;
  const ChunkRef ref = src.chunk(chunk);
  const int64_t n = ref.size;
  const Bits* p[kMaxA + kMaxG];  // anchors of the tile, then its targets
  uintptr_t addr_bits = 0;
  for (int j = 0; j < kMaxA + kMaxG; ++j) {
    const bool used = j < kMaxA ? j < na : j - kMaxA < ng;
    const int64_t set = j < kMaxA ? a0 + j : A + k0 + (j - kMaxA);
    p[j] = used ? src.template start<Bits>(ref, set) : nullptr;
    addr_bits |= reinterpret_cast<uintptr_t>(p[j]);
  }
  Sums s;
  // Vector body only when every pointer of the tile is 16-byte aligned (a
  // storage offset can break that); otherwise the scalar loop below does the
  // whole chunk. It always takes the < V leftover elements of a tensor's end.
  const int64_t nvec = addr_bits % 16 == 0 ? n / V : 0;
  for (int64_t row = tid; row < nvec; row += static_cast<int64_t>(kThreads) * kUnroll) {
    uint4 ar[kMaxA][kUnroll];  // each anchor vector is loaded once per tile
#pragma unroll
    for (int i = 0; i < kMaxA; ++i) {
      load_row(ar[i], p[i], row, i < na ? nvec : 0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (own_asq) s.squares(Sums::kPairs + i, ar[i][u]);
    }
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      if (g >= ng) continue;
      uint4 br[kUnroll];
      load_row(br, p[kMaxA + g], row, nvec);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (own_bsq) s.squares(Sums::kPairs + kMaxA + g, br[u]);
        Acc b[V];
        unpack<E>(br[u], b);
#pragma unroll
        for (int i = 0; i < kMaxA; ++i) {
          if (i >= na) continue;
          Acc a[V];
          unpack<E>(ar[i][u], a);
#pragma unroll
          for (int j = 0; j < V; ++j) s.pair(i, g, a[j], b[j]);
        }
      }
    }
  }
  for (int64_t e = nvec * V + tid; e < n; e += kThreads) {
    Acc a[kMaxA];
#pragma unroll
    for (int i = 0; i < kMaxA; ++i) {
      a[i] = i < na ? to_acc(E{}, __ldg(p[i] + e)) : Acc(0);
      if (own_asq) s.square(Sums::kPairs + i, a[i]);
    }
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      if (g >= ng) continue;
      const Acc b = to_acc(E{}, __ldg(p[kMaxA + g] + e));
      if (own_bsq) s.square(Sums::kPairs + kMaxA + g, b);
#pragma unroll
      for (int i = 0; i < kMaxA; ++i)
        if (i < na) s.pair(i, g, a[i], b);
    }
  }
  // Block reduction: a fixed shuffle tree per warp, then the warps in index
  // order in double. No thread returns early, so all reach __syncthreads.
  __shared__ double warp_sums[kWarps][Sums::kSlots];
#pragma unroll
  for (int slot = 0; slot < Sums::kSlots; ++slot) {
    const Acc v = warp_sum(s.v[slot]);
    if (tid % 32 == 0) warp_sums[tid / 32][slot] = static_cast<double>(v);
  }
  __syncthreads();
  for (int slot = tid; slot < Sums::kSlots; slot += kThreads) {
    // Tile slot -> slot of the chunk's row of partials (SlotLayout).
    const int i = slot / (3 * kMaxG), g = slot / 3 % kMaxG;  // when a pair slot
    const int sa = slot - Sums::kPairs, sb = sa - kMaxA;     // when a square slot
    int64_t dst = -1;
    if (slot < Sums::kPairs) {
      if (i < na && g < ng) dst = slots.pair(a0 + i, k0 + g, slot % 3);
    } else if (sb < 0) {
      if (own_asq && sa < na) dst = slots.anchor_sq(a0 + sa);
    } else if (own_bsq && sb < ng) {
      dst = slots.target_sq(k0 + sb);
    }
    if (dst < 0) continue;
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][slot];
    partials[chunk * slots.size() + dst] = total;
  }
}

// One thread per (tensor, slot) finds the tensor's first row (rows are sorted
// by tensor), adds its rows' partials in row order (deterministic, no
// atomics), then scatters into (A, K, T, 5), squares to every pair of their
// set. Tensors without rows get zeros, so `out` is always fully written.
__global__ void __launch_bounds__(kThreads)
distance_cleanup_kernel(const int64_t* __restrict__ rows, int64_t num_rows,
                        const double* __restrict__ partials, SlotLayout slots, int64_t T,
                        double* __restrict__ out) {
  const int64_t S = slots.size();
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < T * S;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = idx / S;
    const int64_t slot = idx - t * S;
    int64_t lo = 0, hi = num_rows;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (rows[mid * kRowWidth + kRowTensor] < t) lo = mid + 1;
      else hi = mid;
    }
    double sum = 0.0;
    for (int64_t c = lo; c < num_rows && rows[c * kRowWidth + kRowTensor] == t; ++c)
      sum += partials[c * S + slot];
    for_each_output(slots, T, t, slot, [&](int64_t index) { out[index] = sum; });
  }
}

template <class E, class Source>
cudaError_t launch_partials(const Source& src, const SlotLayout& slots, int64_t num_rows,
                            double* partials, cudaStream_t stream) {
  constexpr int kMaxG = kTileTargets<E>;
  const int64_t num_target_groups = (slots.targets + kMaxG - 1) / kMaxG;
  const int64_t num_groups = (slots.anchors + kTileAnchors - 1) / kTileAnchors * num_target_groups;
  if (num_rows > INT_MAX / num_groups) return cudaErrorInvalidConfiguration;
  const auto blocks = static_cast<unsigned int>(num_rows * num_groups);
  distance_partials_kernel<E, kTileAnchors, kMaxG><<<blocks, kThreads, 0, stream>>>(
      src, slots, num_target_groups, num_groups, partials);
  return cudaGetLastError();
}

// Enqueues both kernels for A x K sets of T tensors described by `num_rows`
// chunk rows. partials: num_rows * slots.size() doubles (null when there are
// no rows), out: float64 (A, K, T, 5); both fully overwritten.
template <class Source>
cudaError_t launch_distance(ElementDtype dtype, const Source& src, const SlotLayout& slots,
                            int64_t T, const int64_t* rows, int64_t num_rows, double* partials,
                            double* out, cudaStream_t stream) {
  if (slots.anchors < 1 || slots.targets < 1 || T < 0 || num_rows < 0) {
    return cudaErrorInvalidValue;
  }
  if (T == 0) return cudaSuccess;
  if (num_rows > 0) {
    const cudaError_t err = dispatch_element(dtype, [&](auto tag) {
      return launch_partials<decltype(tag)>(src, slots, num_rows, partials, stream);
    });
    if (err != cudaSuccess) return err;
  }
  // Grid-stride loop: a small grid, and no sum order depends on the grid size.
  const int64_t needed = (T * slots.size() + kThreads - 1) / kThreads;
  const auto blocks = static_cast<unsigned int>(needed < 65535 ? needed : 65535);
  distance_cleanup_kernel<<<blocks, kThreads, 0, stream>>>(rows, num_rows, partials, slots, T,
                                                           out);
  return cudaGetLastError();
}

}  // namespace
}  // namespace transfer_fast
