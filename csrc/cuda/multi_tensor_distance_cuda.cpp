// CUDA kernel of transfer_fast::multi_tensor_distance: checks the fast-route
// contract, packs the per-tensor metadata into one device buffer, and calls
// the nvcc-compiled launcher. All torch-facing code lives here so the .cu
// stays free of torch headers.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/distance_sums.h"
#include "multi_tensor_distance_kernel.h"

namespace transfer_fast {
namespace {

// The Python side sends anything else to the pure-torch fallback, so a
// mismatch here is a routing bug and deserves a loud error, not a slow path.
DistanceDtype to_distance_dtype(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return DistanceDtype::kFloat32;
    case at::kHalf: return DistanceDtype::kFloat16;
    case at::kBFloat16: return DistanceDtype::kBFloat16;
    case at::kDouble: return DistanceDtype::kFloat64;
    default: break;
  }
  TORCH_CHECK(false, "multi_tensor_distance (CUDA): expected float32, float16, bfloat16 or "
              "float64 tensors, got ", type);
}

void check_fast_route(const at::Tensor& x, const char* list, size_t index, const at::Tensor& ref) {
  TORCH_CHECK(x.defined(), "multi_tensor_distance (CUDA): ", list, "[", index, "] is undefined");
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), "multi_tensor_distance (CUDA): expected all "
              "tensors to have the dtype of anchors[0] (", ref.scalar_type(), "), got ",
              x.scalar_type(), " for ", list, "[", index, "]");
  TORCH_CHECK(x.device() == ref.device(), "multi_tensor_distance (CUDA): expected all tensors on "
              "the device of anchors[0] (", ref.device(), "), got ", x.device(), " for ", list, "[",
              index, "]");
  TORCH_CHECK(x.is_contiguous(), "multi_tensor_distance (CUDA): expected contiguous tensors, got "
              "non-contiguous ", list, "[", index, "] with sizes ", x.sizes(), " and strides ",
              x.strides());
}

}  // namespace

at::Tensor multi_tensor_distance_cuda(at::TensorList anchors, at::TensorList targets,
                                      int64_t num_tensors) {
  const int64_t T = num_tensors;
  TORCH_CHECK(T >= 0, "multi_tensor_distance (CUDA): expected num_tensors >= 0, got ", T);
  if (T == 0) {
    // Sets of zero tensors cannot be counted; only the all-empty call is meaningful.
    TORCH_CHECK(anchors.empty() && targets.empty(), "multi_tensor_distance (CUDA): num_tensors "
                "is 0 but got ", anchors.size(), " anchors and ", targets.size(), " targets");
    return at::zeros({0, 0, 0, kNumSums}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
  }
  const int64_t num_anchors = static_cast<int64_t>(anchors.size());
  const int64_t num_targets = static_cast<int64_t>(targets.size());
  TORCH_CHECK(num_anchors % T == 0, "multi_tensor_distance (CUDA): expected len(anchors) to be a "
              "multiple of num_tensors=", T, ", got ", num_anchors);
  TORCH_CHECK(num_targets % T == 0, "multi_tensor_distance (CUDA): expected len(targets) to be a "
              "multiple of num_tensors=", T, ", got ", num_targets);
  const int64_t A = num_anchors / T;
  const int64_t K = num_targets / T;
  TORCH_CHECK(A >= 1, "multi_tensor_distance (CUDA): expected at least one anchor set of ", T,
              " tensors, got an empty anchors list");
  TORCH_CHECK(K >= 1, "multi_tensor_distance (CUDA): expected at least one target set of ", T,
              " tensors, got an empty targets list");

  const at::Tensor& ref = anchors[0];
  TORCH_CHECK(ref.defined() && ref.is_cuda(), "multi_tensor_distance (CUDA): expected CUDA "
              "tensors, got anchors[0] on ", ref.defined() ? ref.device() : at::Device(at::kCPU));
  const DistanceDtype dtype = to_distance_dtype(ref.scalar_type());
  for (size_t j = 0; j < anchors.size(); ++j) check_fast_route(anchors[j], "anchors", j, ref);
  for (size_t j = 0; j < targets.size(); ++j) check_fast_route(targets[j], "targets", j, ref);
  // Every set must match set 0 of the anchors element for element (shapes may
  // differ: the sums run over the flattened tensors).
  for (int64_t t = 0; t < T; ++t) {
    const at::Tensor& base = anchors[t];
    for (int64_t s = 1; s < A + K; ++s) {
      const bool is_anchor = s < A;
      const int64_t j = (is_anchor ? s : s - A) * T + t;
      const at::Tensor& x = is_anchor ? anchors[j] : targets[j];
      TORCH_CHECK(x.numel() == base.numel(), "multi_tensor_distance (CUDA): tensor index ", t,
                  " has mismatched sizes: anchors[", t, "] has shape ", base.sizes(), " but ",
                  is_anchor ? "anchors[" : "targets[", j, "] has shape ", x.sizes(),
                  " (numel must match)");
    }
  }

  const c10::cuda::OptionalCUDAGuard guard(ref.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  int64_t num_chunks = 0;
  for (int64_t t = 0; t < T; ++t) num_chunks += (anchors[t].numel() + kChunkElems - 1) / kChunkElems;
  const DistanceMetaLayout layout{T, A + K, num_chunks};

  // One pinned buffer and one async copy on the current stream; the copy
  // records its use of the pinned block, so it is not recycled too early.
  at::Tensor meta_host =
      at::empty({layout.total()}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* m = meta_host.data_ptr<int64_t>();
  int64_t chunk = 0;
  for (int64_t t = 0; t < T; ++t) {
    const int64_t numel = anchors[t].numel();
    m[layout.numel_offset() + t] = numel;
    m[layout.chunk_begin_offset() + t] = chunk;
    for (int64_t start = 0; start < numel; start += kChunkElems, ++chunk) {
      m[layout.chunk_map_offset() + 2 * chunk] = t;
      m[layout.chunk_map_offset() + 2 * chunk + 1] = start;
    }
    for (int64_t s = 0; s < A + K; ++s) {
      const at::Tensor& x = s < A ? anchors[s * T + t] : targets[(s - A) * T + t];
      m[layout.ptr_offset() + s * T + t] =
          static_cast<int64_t>(reinterpret_cast<intptr_t>(x.const_data_ptr()));
    }
  }
  m[layout.chunk_begin_offset() + T] = chunk;
  TORCH_INTERNAL_ASSERT(chunk == num_chunks);

  const at::TensorOptions device_opts = ref.options();
  at::Tensor meta = at::empty({layout.total()}, device_opts.dtype(at::kLong));
  meta.copy_(meta_host, /*non_blocking=*/true);
  at::Tensor partials = at::empty({num_chunks, distance_num_slots(A, K)}, device_opts.dtype(at::kDouble));
  at::Tensor out = at::empty({A, K, T, kNumSums}, device_opts.dtype(at::kDouble));

  C10_CUDA_CHECK(launch_multi_tensor_distance(
      dtype, meta.const_data_ptr<int64_t>(), A, K, T, num_chunks,
      num_chunks > 0 ? partials.data_ptr<double>() : nullptr, out.data_ptr<double>(), stream));
  return out;
}

}  // namespace transfer_fast

TORCH_LIBRARY_IMPL(transfer_fast, CUDA, m) {
  m.impl("multi_tensor_distance", &transfer_fast::multi_tensor_distance_cuda);
}
