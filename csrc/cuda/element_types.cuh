// Element types of the CUDA kernels: storage bits, accumulation type, and the
// one switch from the runtime ElementDtype to a compile-time tag, used by
// every launcher. Only CUDA headers: nvcc compiles the kernels alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <utility>

#include "element_dtype.h"

namespace transfer_fast {

// 16-bit types sum in float, exact enough over one thread's share of a chunk
// or row; whatever crosses threads is double.
struct F32 { using Bits = unsigned int; using Acc = float; };
struct F16 { using Bits = unsigned short; using Acc = float; };
struct BF16 { using Bits = unsigned short; using Acc = float; };
struct F64 { using Bits = unsigned long long; using Acc = double; };

__device__ __forceinline__ float to_acc(F32, unsigned int b) { return __uint_as_float(b); }
__device__ __forceinline__ float to_acc(F16, unsigned short b) {
  return __half2float(__ushort_as_half(b));
}
__device__ __forceinline__ float to_acc(BF16, unsigned short b) {
  return __bfloat162float(__ushort_as_bfloat16(b));
}
__device__ __forceinline__ double to_acc(F64, unsigned long long b) {
  return __longlong_as_double(static_cast<long long>(b));
}

// Calls f(tag) with the tag of `dtype` and returns its result;
// cudaErrorInvalidValue for a value outside ElementDtype.
template <class F>
cudaError_t dispatch_element(ElementDtype dtype, F&& f) {
  switch (dtype) {
    case ElementDtype::kFloat32: return std::forward<F>(f)(F32{});
    case ElementDtype::kFloat16: return std::forward<F>(f)(F16{});
    case ElementDtype::kBFloat16: return std::forward<F>(f)(BF16{});
    case ElementDtype::kFloat64: return std::forward<F>(f)(F64{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace transfer_fast
