// CUDA kernel of transfer_fast::multi_tensor_distance: checks the fast-route
// contract, packs the per-tensor metadata into one device buffer, and calls
// the nvcc-compiled launcher. All torch-facing code lives here so the .cu
// stays free of torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/distance_sums.h"
#include "../common/input_checks.h"
#include "element_dtype_glue.h"
#include "multi_tensor_distance_kernel.h"

namespace transfer_fast {
at::Tensor multi_tensor_distance_cuda(at::TensorList anchors, at::TensorList targets,
                                      int64_t num_tensors) {
  // Shared with the CPU kernel so both backends refuse the same inputs with
  // the same messages: one supported dtype, contiguous, one CUDA device,
  // list lengths a positive multiple of num_tensors, matching numels per index.
  const SetCounts sets = check_distance_inputs(anchors, targets, num_tensors, at::kCUDA);
  const int64_t T = num_tensors;
  if (T == 0) {
    // Only reachable with both lists empty, so no tensor names a device.
    return at::zeros({0, 0, 0, kNumSums}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
  }
  const int64_t A = sets.anchors;
  const int64_t K = sets.targets;
  const at::Tensor& ref = anchors[0];
  const ElementDtype dtype = to_element_dtype(ref.scalar_type(), "multi_tensor_distance");

  const c10::cuda::OptionalCUDAGuard guard(ref.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  int64_t num_chunks = 0;
  for (int64_t t = 0; t < T; ++t) {
    num_chunks += (anchors[t].numel() + kChunkElems - 1) / kChunkElems;
  }
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
  at::Tensor partials =
      at::empty({num_chunks, distance_num_slots(A, K)}, device_opts.dtype(at::kDouble));
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
