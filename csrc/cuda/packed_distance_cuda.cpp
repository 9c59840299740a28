// CUDA kernel of transfer_fast::packed_distance: O(1) checks, device guard,
// current stream, two workspaces, and the nvcc-compiled launcher. Nothing is
// uploaded per call: the chunk rows already live on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "../common/distance_sums.h"
#include "../common/input_checks.h"
#include "element_dtype_glue.h"
#include "packed_distance_kernel.h"

namespace transfer_fast {

at::Tensor packed_distance_cuda(const at::Tensor& anchors, const at::Tensor& targets,
                                const at::Tensor& chunks, int64_t num_tensors) {
  const PackedDims d = check_packed_inputs(anchors, targets, chunks, num_tensors, at::kCUDA);
  const ElementDtype dtype = to_element_dtype(anchors.scalar_type(), "packed_distance");
  const c10::cuda::OptionalCUDAGuard guard(anchors.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  const SlotLayout slots{d.anchors, d.targets};
  const at::TensorOptions f64 = anchors.options().dtype(at::kDouble);
  at::Tensor partials = at::empty({d.rows * slots.size()}, f64);
  at::Tensor out = at::empty({d.anchors, d.targets, num_tensors, kNumSums}, f64);
  C10_CUDA_CHECK(launch_packed_distance(
      dtype, anchors.const_data_ptr(), targets.const_data_ptr(), d.anchors, d.targets, d.length,
      num_tensors, chunks.const_data_ptr<int64_t>(), d.rows,
      d.rows > 0 ? partials.data_ptr<double>() : nullptr, out.data_ptr<double>(), stream));
  return out;
}

}  // namespace transfer_fast

TORCH_LIBRARY_IMPL(transfer_fast, CUDA, m) {
  m.impl("packed_distance", &transfer_fast::packed_distance_cuda);
}
