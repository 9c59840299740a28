// CUDA kernel of transfer_fast::multi_tensor_distance: checks the fast-route
// contract while gathering the tensors' addresses (one pass), uploads them
// with the chunk rows in one copy from reused pinned memory, and calls the
// nvcc-compiled launcher. All torch-facing code lives here so the .cu stays
// free of torch headers.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/distance_sums.h"
#include "../common/input_checks.h"
#include "element_dtype_glue.h"
#include "multi_tensor_distance_kernel.h"
#include "pinned_staging.h"

namespace transfer_fast {
at::Tensor multi_tensor_distance_cuda(at::TensorList anchors, at::TensorList targets,
                                      int64_t num_tensors) {
  const SetCounts sets = check_set_counts(anchors, targets, num_tensors, at::kCUDA);
  const int64_t T = num_tensors, A = sets.anchors, K = sets.targets;
  if (T == 0) {
    // Only reachable with both lists empty, so no tensor names a device.
    return at::zeros({0, 0, 0, kNumSums}, at::TensorOptions().dtype(at::kDouble).device(at::kCUDA));
  }
  const at::Tensor& ref = anchors[0];
  const ElementDtype dtype = to_element_dtype(ref.scalar_type(), "multi_tensor_distance");
  const c10::cuda::OptionalCUDAGuard guard(ref.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // Metadata, all int64: the address of (set, tensor) at set * T + tensor,
  // then the chunk rows, begin and end counted within each tensor.
  int64_t num_rows = 0;
  for (int64_t t = 0; t < T; ++t) num_rows += num_chunks(anchors[t].numel());
  const int64_t ptr_words = (A + K) * T;
  const int64_t meta_words = ptr_words + num_rows * kRowWidth;
  PinnedStaging& staging = pinned_staging(ref.get_device());
  auto* meta = static_cast<int64_t*>(staging.acquire(meta_words * sizeof(int64_t)));
  check_each_tensor(anchors, targets, T, [&](int64_t set, int64_t t, const at::Tensor& x) {
    meta[set * T + t] = static_cast<int64_t>(reinterpret_cast<intptr_t>(x.const_data_ptr()));
  });
  int64_t* row = meta + ptr_words;
  for (int64_t t = 0; t < T; ++t) row = write_chunk_rows(row, t, 0, anchors[t].numel());

  // One device allocation holds the metadata and, after it, the partials
  // (both 8-byte words); stream order keeps it alive for the kernels.
  const SlotLayout slots{A, K};
  const at::TensorOptions device_opts = ref.options();
  at::Tensor work = at::empty({meta_words + num_rows * slots.size()}, device_opts.dtype(at::kLong));
  int64_t* meta_dev = work.data_ptr<int64_t>();
  staging.upload(meta_dev, meta_words * sizeof(int64_t), stream);
  at::Tensor out = at::empty({A, K, T, kNumSums}, device_opts.dtype(at::kDouble));
  C10_CUDA_CHECK(launch_multi_tensor_distance(
      dtype, meta_dev, meta_dev + ptr_words, A, K, T, num_rows,
      num_rows > 0 ? reinterpret_cast<double*>(meta_dev + meta_words) : nullptr,
      out.data_ptr<double>(), stream));
  return out;
}

}  // namespace transfer_fast

TORCH_LIBRARY_IMPL(transfer_fast, CUDA, m) {
  m.impl("multi_tensor_distance", &transfer_fast::multi_tensor_distance_cuda);
}
