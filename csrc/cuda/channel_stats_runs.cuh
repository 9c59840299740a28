// The inner loops of channel_stats' pass over x: a run of elements of one
// (sample, channel) row, shifted, summed and squared in float64, with many
// loads in flight per lane. Included by channel_stats_kernel.cu only.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "element_types.cuh"

namespace transfer_fast {
namespace stats {

constexpr int kUnroll = 8;     // loads in flight per lane, element by element
constexpr int kVecUnroll = 4;  // 16-byte loads in flight per lane

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

// Adds the 16 bytes of elements in v, like add_run.
template <class E>
__device__ __forceinline__ void add_vector(const uint4& v, double sh, double& a, double& b) {
  using Bits = typename E::Bits;
  constexpr int kElems = 16 / sizeof(Bits);
  union {
    uint4 vector;
    Bits elements[kElems];
  } bits;
  bits.vector = v;
#pragma unroll
  for (int k = 0; k < kElems; ++k) {
    const double d = to_double<E>(bits.elements[k]) - sh;
    a += d;
    b = fma(d, d, b);
  }
}

// add_run over [begin, end) of a 16-byte aligned row with 16-byte loads:
// vector j = first + lane, first + lane + G, ..., kVecUnroll loads at a time.
// begin and end are whole vectors (the plan's pieces and S are).
template <class E>
__device__ __forceinline__ void add_vectors(const typename E::Bits* __restrict__ row,
                                            int64_t begin, int64_t end, int lane, int G,
                                            double sh, double& a, double& b) {
  constexpr int64_t kElems = 16 / sizeof(typename E::Bits);
  const uint4* __restrict__ p = reinterpret_cast<const uint4*>(row);
  const int64_t last = end / kElems;
  for (int64_t j = begin / kElems + lane; j < last; j += kVecUnroll * G) {
    uint4 v[kVecUnroll];
#pragma unroll
    for (int u = 0; u < kVecUnroll; ++u) {
      v[u] = j + u * G < last ? p[j + u * G] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int u = 0; u < kVecUnroll; ++u) {
      if (j + u * G < last) add_vector<E>(v[u], sh, a, b);
    }
  }
}

}  // namespace stats
}  // namespace transfer_fast
