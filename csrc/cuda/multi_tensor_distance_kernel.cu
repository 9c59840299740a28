// Fused distance sums between every anchor set and every target set, for all
// tensors of the sets, in one pass over memory (multi_tensor_apply lineage: a
// flat list of fixed-size chunks over all tensors, one block per chunk tile).
// Only CUDA headers and our own: this file must build with plain nvcc.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../common/distance_sums.h"
#include "multi_tensor_distance_kernel.h"

#define DEVICE_INLINE __device__ __forceinline__

namespace transfer_fast {
namespace {

// Fixed, like kChunkElems: the element-to-thread mapping and the reduction
// tree (hence the rounding) must not depend on the device or the launch.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 16-byte loads per set issued before any is consumed, to cover HBM latency.
constexpr int kUnroll = 4;

static_assert(kChunkElems % (16 * kThreads) == 0,
              "chunk starts must keep 16-byte alignment for every dtype");
static_assert(kSumAbsDiff == 0 && kSumSqDiff == 1 && kSumDot == 2,
              "pair partials are stored in DistanceSum column order");

// Element types: storage bits and accumulation type. 16-bit types sum in
// float, exact enough over one thread's share of a chunk; partials are double.
struct F32 { using Bits = unsigned int; using Acc = float; };
struct F16 { using Bits = unsigned short; using Acc = float; };
struct BF16 { using Bits = unsigned short; using Acc = float; };
struct F64 { using Bits = unsigned long long; using Acc = double; };
DEVICE_INLINE float to_acc(F32, unsigned int b) { return __uint_as_float(b); }
DEVICE_INLINE float to_acc(F16, unsigned short b) { return __half2float(__ushort_as_half(b)); }
DEVICE_INLINE float to_acc(BF16, unsigned short b) {
  return __bfloat162float(__ushort_as_bfloat16(b));
}
DEVICE_INLINE double to_acc(F64, unsigned long long b) { return __longlong_as_double(b); }

template <class E>
constexpr int kVec = static_cast<int>(16 / sizeof(typename E::Bits));  // elements per 16 B

// Explicit fma/abs so that the result does not depend on -fmad contraction.
DEVICE_INLINE float mul_add(float a, float b, float c) { return fmaf(a, b, c); }
DEVICE_INLINE double mul_add(double a, double b, double c) { return fma(a, b, c); }
DEVICE_INLINE float abs_val(float x) { return fabsf(x); }
DEVICE_INLINE double abs_val(double x) { return fabs(x); }

template <class E>
DEVICE_INLINE void unpack(const uint4& r, typename E::Acc (&v)[kVec<E>]) {
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
DEVICE_INLINE void load_row(uint4 (&r)[kUnroll], const void* p, int64_t row, int64_t nvec) {
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
  DEVICE_INLINE void pair(int i, int g, Acc a, Acc b) {
    Acc* p = v + 3 * (i * kMaxG + g);
    const Acc d = a - b;
    p[0] += abs_val(d);
    p[1] = mul_add(d, d, p[1]);
    p[2] = mul_add(a, b, p[2]);
  }
  DEVICE_INLINE void square(int slot, Acc x) { v[slot] = mul_add(x, x, v[slot]); }
  DEVICE_INLINE void squares(int slot, const uint4& r) {
    Acc x[kVec<E>];
    unpack<E>(r, x);
    for (int j = 0; j < kVec<E>; ++j) square(slot, x[j]);
  }
};

template <class T>
DEVICE_INLINE T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Block b handles chunk b / num_groups for tile b % num_groups (up to kMaxA
// anchors x kMaxG targets). Capping the tile bounds registers for any A*K;
// looping over all targets inside a block instead would re-read the 64K-element
// anchor chunk per target after it has left L1. A target is read by one block
// per anchor group (once when A <= kMaxA); the ceil(K / kMaxG) sibling blocks
// of a chunk have adjacent indices, run together and share anchors via L2.
template <class E, int kMaxA, int kMaxG>
__global__ void __launch_bounds__(kThreads, 2)
distance_partials_kernel(const int64_t* __restrict__ numel, const int64_t* __restrict__ ptrs,
                         const int64_t* __restrict__ chunk_map, int64_t A, int64_t K, int64_t T,
                         int64_t num_target_groups, int64_t num_groups, int64_t num_slots,
                         double* __restrict__ partials) {
  using Acc = typename E::Acc;
  using Sums = TileSums<E, kMaxA, kMaxG>;
  constexpr int V = kVec<E>;
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
  const int64_t t = chunk_map[2 * chunk];
  const int64_t start = chunk_map[2 * chunk + 1];
  const int64_t n = numel[t] - start < kChunkElems ? numel[t] - start : kChunkElems;
  const typename E::Bits* p[kMaxA + kMaxG];  // anchors of the tile, then its targets
  uintptr_t addr_bits = 0;
  for (int j = 0; j < kMaxA + kMaxG; ++j) {
    const bool used = j < kMaxA ? j < na : j - kMaxA < ng;
    const int64_t set = j < kMaxA ? a0 + j : A + k0 + (j - kMaxA);
    p[j] = used ? reinterpret_cast<const typename E::Bits*>(ptrs[set * T + t]) + start : nullptr;
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
    // Tile slot -> slot in the chunk's row of partials (see distance_num_slots()).
    const int i = slot / (3 * kMaxG), g = slot / 3 % kMaxG;  // when a pair slot
    const int sa = slot - Sums::kPairs, sb = sa - kMaxA;     // when a square slot
    int64_t dst = -1;
    if (slot < Sums::kPairs) {
      if (i < na && g < ng) dst = 3 * ((a0 + i) * K + (k0 + g)) + slot % 3;
    } else if (sb < 0) {
      if (own_asq && sa < na) dst = 3 * A * K + a0 + sa;
    } else if (own_bsq && sb < ng) {
      dst = 3 * A * K + A + k0 + sb;
    }
    if (dst < 0) continue;
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][slot];
    partials[chunk * num_slots + dst] = total;
  }
}

// One thread per (tensor, slot) adds the tensor's chunk partials in chunk order
// (deterministic, no atomics), then scatters into (A, K, T, 5), squares to every
// pair of their set. Adjacent threads read adjacent slots: loads coalesce.
__global__ void __launch_bounds__(kThreads)
distance_cleanup_kernel(const double* __restrict__ partials,
                        const int64_t* __restrict__ chunk_begin, int64_t A, int64_t K, int64_t T,
                        int64_t num_slots, double* __restrict__ out) {
  const int64_t pair_slots = 3 * A * K;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
       idx < T * num_slots; idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = idx / num_slots;
    const int64_t slot = idx - t * num_slots;
    double sum = 0.0;
    for (int64_t c = chunk_begin[t]; c < chunk_begin[t + 1]; ++c)
      sum += partials[c * num_slots + slot];
    auto at = [&](int64_t i, int64_t k, int col) -> double& {
      return out[((i * K + k) * T + t) * kNumSums + col];
    };
    if (slot < pair_slots) {
      at(slot / 3 / K, slot / 3 % K, static_cast<int>(slot % 3)) = sum;
    } else if (slot < pair_slots + A) {
      for (int64_t k = 0; k < K; ++k) at(slot - pair_slots, k, kSumAnchorSq) = sum;
    } else {
      for (int64_t i = 0; i < A; ++i) at(i, slot - pair_slots - A, kSumTargetSq) = sum;
    }
  }
}

// Tile caps: 2 anchors (the usual A) x 8 targets is 48 float pair sums; the
// double path takes 4 targets for the same register bytes. Both fit the
// 128 registers of 2 blocks/SM without spills on sm_80 and sm_90.
template <class E, int kMaxA, int kMaxG>
cudaError_t launch_partials(const int64_t* meta, const DistanceMetaLayout& layout, int64_t A,
                            int64_t K, double* partials, cudaStream_t stream) {
  if (layout.num_chunks == 0) return cudaSuccess;
  const int64_t num_target_groups = (K + kMaxG - 1) / kMaxG;
  const int64_t num_groups = (A + kMaxA - 1) / kMaxA * num_target_groups;
  if (layout.num_chunks > INT_MAX / num_groups) return cudaErrorInvalidConfiguration;
  const auto blocks = static_cast<unsigned int>(layout.num_chunks * num_groups);
  distance_partials_kernel<E, kMaxA, kMaxG><<<blocks, kThreads, 0, stream>>>(
      meta + layout.numel_offset(), meta + layout.ptr_offset(), meta + layout.chunk_map_offset(),
      A, K, layout.num_tensors, num_target_groups, num_groups, distance_num_slots(A, K),
      partials);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_multi_tensor_distance(ElementDtype dtype, const int64_t* meta,
                                         int64_t num_anchor_sets, int64_t num_target_sets,
                                         int64_t num_tensors, int64_t num_chunks,
                                         double* partials, double* out, cudaStream_t stream) {
  const int64_t A = num_anchor_sets, K = num_target_sets, T = num_tensors;
  if (A < 1 || K < 1 || T < 0 || num_chunks < 0) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  const DistanceMetaLayout layout{T, A + K, num_chunks};
  cudaError_t (*launch)(const int64_t*, const DistanceMetaLayout&, int64_t, int64_t, double*,
                        cudaStream_t) = nullptr;
  switch (dtype) {
    case ElementDtype::kFloat32: launch = launch_partials<F32, 2, 8>; break;
    case ElementDtype::kFloat16: launch = launch_partials<F16, 2, 8>; break;
    case ElementDtype::kBFloat16: launch = launch_partials<BF16, 2, 8>; break;
    case ElementDtype::kFloat64: launch = launch_partials<F64, 2, 4>; break;
  }
  if (launch == nullptr) return cudaErrorInvalidValue;  // not an ElementDtype
  const cudaError_t err = launch(meta, layout, A, K, partials, stream);
  if (err != cudaSuccess) return err;

  // Grid-stride loop: a small grid, and no sum order depends on the grid size.
  const int64_t needed = (T * distance_num_slots(A, K) + kThreads - 1) / kThreads;
  const auto blocks = static_cast<unsigned int>(needed < 65535 ? needed : 65535);
  distance_cleanup_kernel<<<blocks, kThreads, 0, stream>>>(
      partials, meta + layout.chunk_begin_offset(), A, K, T, distance_num_slots(A, K), out);
  return cudaGetLastError();
}

}  // namespace transfer_fast
