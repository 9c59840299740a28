// Fused distance sums between every anchor set and every target set, for all
// tensors of the sets, in one pass over memory (multi_tensor_apply style: a
// flat list of fixed-size chunks over all tensors, one block per chunk).
//
// Only CUDA headers and our own: this file must build with plain nvcc.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "../common/distance_sums.h"
#include "multi_tensor_distance_kernel.h"

namespace transfer_fast {
namespace {

// Fixed, like kChunkElems: the element-to-thread mapping and the reduction
// tree (hence the rounding) must not depend on the device or the launch.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// 16-byte loads issued per set before any is consumed, to keep enough bytes
// in flight for HBM; 4 x 16 B x (anchors + 1 target) stays within registers.
constexpr int kUnroll = 4;

static_assert(kChunkElems % (16 * kThreads) == 0,
              "chunk starts must keep 16-byte alignment for every dtype");
static_assert(kSumAbsDiff == 0 && kSumSqDiff == 1 && kSumDot == 2,
              "pair partials are stored in DistanceSum column order");

// Element types: how they are stored (Bits), what they are summed in (Acc),
// and how many fit in one 16-byte vector load.
struct F32 {
  using Bits = unsigned int;
  using Acc = float;
  static __device__ __forceinline__ Acc to_acc(Bits b) { return __uint_as_float(b); }
};
struct F16 {
  using Bits = unsigned short;
  using Acc = float;
  static __device__ __forceinline__ Acc to_acc(Bits b) { return __half2float(__ushort_as_half(b)); }
};
struct BF16 {
  using Bits = unsigned short;
  using Acc = float;
  static __device__ __forceinline__ Acc to_acc(Bits b) { return __bfloat162float(__ushort_as_bfloat16(b)); }
};
struct F64 {
  using Bits = unsigned long long;
  using Acc = double;
  static __device__ __forceinline__ Acc to_acc(Bits b) { return __longlong_as_double(static_cast<long long>(b)); }
};

template <class E>
constexpr int kVec = static_cast<int>(16 / sizeof(typename E::Bits));

// Explicit fma/abs so that the result does not depend on -fmad contraction.
__device__ __forceinline__ float mul_add(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double mul_add(double a, double b, double c) { return fma(a, b, c); }
__device__ __forceinline__ float abs_val(float x) { return fabsf(x); }
__device__ __forceinline__ double abs_val(double x) { return fabs(x); }

template <class E>
__device__ __forceinline__ void unpack(const uint4& r, typename E::Acc (&v)[kVec<E>]) {
  const unsigned int w[4] = {r.x, r.y, r.z, r.w};  // little-endian lanes
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (sizeof(typename E::Bits) == 2) {
      v[2 * j] = E::to_acc(static_cast<unsigned short>(w[j] & 0xffffu));
      v[2 * j + 1] = E::to_acc(static_cast<unsigned short>(w[j] >> 16));
    } else if constexpr (sizeof(typename E::Bits) == 4) {
      v[j] = E::to_acc(w[j]);
    } else if (j % 2 == 0) {
      v[j / 2] = E::to_acc((static_cast<unsigned long long>(w[j + 1]) << 32) | w[j]);
    }
  }
}

// Per-thread sums of one block's (anchor group x target group) tile. Every
// index is a compile-time constant after unrolling, so this lives in registers.
template <class E, int kMaxA, int kMaxG>
struct TileSums {
  using Acc = typename E::Acc;
  Acc pair[kMaxA][kMaxG][3] = {};  // |a-b|, (a-b)^2, a*b
  Acc asq[kMaxA] = {};
  Acc bsq[kMaxG] = {};

  __device__ __forceinline__ void add_pair(int i, int g, Acc a, Acc b) {
    const Acc d = a - b;
    pair[i][g][0] += abs_val(d);
    pair[i][g][1] = mul_add(d, d, pair[i][g][1]);
    pair[i][g][2] = mul_add(a, b, pair[i][g][2]);
  }
};

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Block b handles chunk b / num_groups for the (anchor group, target group)
// b % num_groups: up to kMaxA anchors x kMaxG targets. Capping the tile keeps
// the 3*kMaxA*kMaxG pair sums in registers for any A*K. Each target is read
// by one block per anchor group (once when A <= kMaxA); the anchors are read
// by the ceil(K/kMaxG) sibling blocks of the chunk, which have adjacent
// indices and so run together and share those reads through L2. Within a
// block each anchor vector is loaded once and reused for all its targets.
template <class E, int kMaxA, int kMaxG>
__global__ void __launch_bounds__(kThreads, 2)
distance_partials_kernel(const int64_t* __restrict__ numel, const int64_t* __restrict__ ptrs,
                         const int64_t* __restrict__ chunk_map, int64_t A, int64_t K, int64_t T,
                         int64_t num_target_groups, int64_t num_groups, int64_t num_slots,
                         double* __restrict__ partials) {
  using Bits = typename E::Bits;
  using Acc = typename E::Acc;
  constexpr int V = kVec<E>;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) / num_groups;
  const int64_t group = static_cast<int64_t>(blockIdx.x) - chunk * num_groups;
  const int64_t a0 = (group / num_target_groups) * kMaxA;
  const int64_t k0 = (group % num_target_groups) * kMaxG;
  const int na = static_cast<int>(A - a0 < kMaxA ? A - a0 : kMaxA);
  const int ng = static_cast<int>(K - k0 < kMaxG ? K - k0 : kMaxG);
  // Squares are per set, not per pair: give each a single writer block.
  const bool own_asq = k0 == 0;
  const bool own_bsq = a0 == 0;

  const int64_t t = chunk_map[2 * chunk];
  const int64_t start = chunk_map[2 * chunk + 1];
  const int64_t rest = numel[t] - start;
  const int64_t n = rest < kChunkElems ? rest : kChunkElems;

  const Bits* pa[kMaxA];
  const Bits* pb[kMaxG];
  uintptr_t addr_bits = 0;
#pragma unroll
  for (int i = 0; i < kMaxA; ++i) {
    pa[i] = i < na ? reinterpret_cast<const Bits*>(static_cast<uintptr_t>(ptrs[(a0 + i) * T + t])) + start : nullptr;
    addr_bits |= reinterpret_cast<uintptr_t>(pa[i]);
  }
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) {
    pb[g] = g < ng ? reinterpret_cast<const Bits*>(static_cast<uintptr_t>(ptrs[(A + k0 + g) * T + t])) + start : nullptr;
    addr_bits |= reinterpret_cast<uintptr_t>(pb[g]);
  }

  TileSums<E, kMaxA, kMaxG> s;
  // Vector body only when every pointer of the tile is 16-byte aligned (a
  // storage offset can break that); otherwise everything goes to the scalar
  // loop below, which also takes the < V leftover elements of the last chunk.
  const int64_t nvec = (addr_bits % 16 == 0) ? n / V : 0;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);  // zero padding adds 0 to every sum
  for (int64_t row = tid; row < nvec; row += static_cast<int64_t>(kThreads) * kUnroll) {
    uint4 ar[kMaxA][kUnroll];
#pragma unroll
    for (int i = 0; i < kMaxA; ++i)
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = row + u * kThreads;
        ar[i][u] = (i < na && v < nvec) ? __ldg(reinterpret_cast<const uint4*>(pa[i]) + v) : zero;
      }
    if (own_asq) {
#pragma unroll
      for (int i = 0; i < kMaxA; ++i)
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          Acc a[V];
          unpack<E>(ar[i][u], a);
#pragma unroll
          for (int j = 0; j < V; ++j) s.asq[i] = mul_add(a[j], a[j], s.asq[i]);
        }
    }
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      if (g >= ng) continue;
      uint4 br[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = row + u * kThreads;
        br[u] = v < nvec ? __ldg(reinterpret_cast<const uint4*>(pb[g]) + v) : zero;
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        Acc b[V];
        unpack<E>(br[u], b);
        if (own_bsq) {
#pragma unroll
          for (int j = 0; j < V; ++j) s.bsq[g] = mul_add(b[j], b[j], s.bsq[g]);
        }
#pragma unroll
        for (int i = 0; i < kMaxA; ++i) {
          if (i >= na) continue;
          Acc a[V];
          unpack<E>(ar[i][u], a);
#pragma unroll
          for (int j = 0; j < V; ++j) s.add_pair(i, g, a[j], b[j]);
        }
      }
    }
  }
  for (int64_t e = nvec * V + tid; e < n; e += kThreads) {
    Acc a[kMaxA];
#pragma unroll
    for (int i = 0; i < kMaxA; ++i) {
      a[i] = i < na ? E::to_acc(__ldg(pa[i] + e)) : Acc(0);
      if (own_asq) s.asq[i] = mul_add(a[i], a[i], s.asq[i]);
    }
#pragma unroll
    for (int g = 0; g < kMaxG; ++g) {
      if (g >= ng) continue;
      const Acc b = E::to_acc(__ldg(pb[g] + e));
      if (own_bsq) s.bsq[g] = mul_add(b, b, s.bsq[g]);
#pragma unroll
      for (int i = 0; i < kMaxA; ++i)
        if (i < na) s.add_pair(i, g, a[i], b);
    }
  }

  // Block reduction: fixed shuffle tree per warp, then the warps in index
  // order in double. Every thread reaches the __syncthreads (no early exit).
  constexpr int kPairSlots = kMaxA * kMaxG * 3;
  constexpr int kBlockSlots = kPairSlots + kMaxA + kMaxG;
  __shared__ double warp_sums[kWarps][kBlockSlots];
  const int lane = tid % 32;
  const int warp = tid / 32;
  auto stash = [&](int slot, Acc v) {
    v = warp_sum(v);
    if (lane == 0) warp_sums[warp][slot] = static_cast<double>(v);
  };
#pragma unroll
  for (int i = 0; i < kMaxA; ++i)
#pragma unroll
    for (int g = 0; g < kMaxG; ++g)
#pragma unroll
      for (int c = 0; c < 3; ++c) stash((i * kMaxG + g) * 3 + c, s.pair[i][g][c]);
#pragma unroll
  for (int i = 0; i < kMaxA; ++i) stash(kPairSlots + i, s.asq[i]);
#pragma unroll
  for (int g = 0; g < kMaxG; ++g) stash(kPairSlots + kMaxA + g, s.bsq[g]);
  __syncthreads();

  for (int slot = tid; slot < kBlockSlots; slot += kThreads) {
    int64_t dst = -1;  // global slot, see distance_num_slots()
    if (slot < kPairSlots) {
      const int i = slot / (kMaxG * 3);
      const int g = (slot / 3) % kMaxG;
      if (i < na && g < ng) dst = ((a0 + i) * K + (k0 + g)) * 3 + slot % 3;
    } else if (slot < kPairSlots + kMaxA) {
      const int i = slot - kPairSlots;
      if (own_asq && i < na) dst = 3 * A * K + a0 + i;
    } else {
      const int g = slot - kPairSlots - kMaxA;
      if (own_bsq && g < ng) dst = 3 * A * K + A + k0 + g;
    }
    if (dst < 0) continue;
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w][slot];
    partials[chunk * num_slots + dst] = total;
  }
}

// One thread per (tensor, slot): adds that tensor's chunk partials in chunk
// order (deterministic, no atomics) and scatters into (A, K, T, 5); squares
// are broadcast to every pair that uses the set. Adjacent threads read
// adjacent slots of the same chunk, so the loads coalesce. A tensor without
// chunks (numel 0) gets zeros.
__global__ void __launch_bounds__(kThreads)
distance_cleanup_kernel(const double* __restrict__ partials, const int64_t* __restrict__ chunk_begin,
                        int64_t A, int64_t K, int64_t T, int64_t num_slots, double* __restrict__ out) {
  const int64_t total = T * num_slots;
  const int64_t pair_slots = 3 * A * K;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t t = idx / num_slots;
    const int64_t slot = idx - t * num_slots;
    double sum = 0.0;
    for (int64_t c = chunk_begin[t]; c < chunk_begin[t + 1]; ++c) sum += partials[c * num_slots + slot];
    if (slot < pair_slots) {
      const int64_t pair = slot / 3;  // i * K + k
      out[(pair * T + t) * kNumSums + slot % 3] = sum;
    } else if (slot < pair_slots + A) {
      const int64_t i = slot - pair_slots;
      for (int64_t k = 0; k < K; ++k) out[((i * K + k) * T + t) * kNumSums + kSumAnchorSq] = sum;
    } else {
      const int64_t k = slot - pair_slots - A;
      for (int64_t i = 0; i < A; ++i) out[((i * K + k) * T + t) * kNumSums + kSumTargetSq] = sum;
    }
  }
}

// Tile caps: 2 anchors (the usual A) x 8 targets is 48 float pair sums; the
// double path halves the targets to hold the same register budget (no spills
// under -Xptxas -v on sm_80/sm_90).
template <class E, int kMaxA, int kMaxG>
cudaError_t launch_partials(const int64_t* meta, const DistanceMetaLayout& layout, int64_t A,
                            int64_t K, int64_t num_slots, double* partials, cudaStream_t stream) {
  if (layout.num_chunks == 0) return cudaSuccess;
  const int64_t num_target_groups = (K + kMaxG - 1) / kMaxG;
  const int64_t num_groups = ((A + kMaxA - 1) / kMaxA) * num_target_groups;
  if (layout.num_chunks > INT_MAX / num_groups) return cudaErrorInvalidConfiguration;
  const unsigned int blocks = static_cast<unsigned int>(layout.num_chunks * num_groups);
  distance_partials_kernel<E, kMaxA, kMaxG><<<blocks, kThreads, 0, stream>>>(meta + layout.numel_offset(), meta + layout.ptr_offset(), meta + layout.chunk_map_offset(), A, K, layout.num_tensors, num_target_groups, num_groups, num_slots, partials);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_multi_tensor_distance(DistanceDtype dtype, const int64_t* meta,
                                         int64_t num_anchor_sets, int64_t num_target_sets,
                                         int64_t num_tensors, int64_t num_chunks, double* partials,
                                         double* out, cudaStream_t stream) {
  const int64_t A = num_anchor_sets;
  const int64_t K = num_target_sets;
  const int64_t T = num_tensors;
  if (A < 1 || K < 1 || T < 0 || num_chunks < 0) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  const DistanceMetaLayout layout{T, A + K, num_chunks};
  const int64_t num_slots = distance_num_slots(A, K);
  cudaError_t err = cudaErrorInvalidValue;
  switch (dtype) {
    case DistanceDtype::kFloat32: err = launch_partials<F32, 2, 8>(meta, layout, A, K, num_slots, partials, stream); break;
    case DistanceDtype::kFloat16: err = launch_partials<F16, 2, 8>(meta, layout, A, K, num_slots, partials, stream); break;
    case DistanceDtype::kBFloat16: err = launch_partials<BF16, 2, 8>(meta, layout, A, K, num_slots, partials, stream); break;
    case DistanceDtype::kFloat64: err = launch_partials<F64, 2, 4>(meta, layout, A, K, num_slots, partials, stream); break;
  }
  if (err != cudaSuccess) return err;

  // A grid-stride loop keeps the grid small; the sum order is per thread, so
  // the grid size does not affect the result.
  const int64_t needed = (T * num_slots + kThreads - 1) / kThreads;
  const unsigned int blocks = static_cast<unsigned int>(needed < 65535 ? needed : 65535);
  distance_cleanup_kernel<<<blocks, kThreads, 0, stream>>>(partials, meta + layout.chunk_begin_offset(), A, K, T, num_slots, out);
  return cudaGetLastError();
}

}  // namespace transfer_fast
