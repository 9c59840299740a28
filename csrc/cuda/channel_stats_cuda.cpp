// CUDA kernel of transfer_fast::channel_stats: the shared argument checks,
// device guard and current stream, one workspace, then the nvcc-compiled
// launcher, which also finishes the statistics. Labels are not range-checked
// here (that would synchronise on every call); the kernels skip out-of-range
// labels so a bad one can never write out of bounds, and the Python wrapper
// rejects them before the call.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../common/channel_stats_common.h"
#include "channel_stats_kernel.h"
#include "element_dtype_glue.h"

namespace transfer_fast {

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_stats_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& shift,
    const std::optional<at::Tensor>& labels, int64_t num_classes, bool channels_last) {
  const StatsDims d =
      check_stats_inputs(x, shift, labels, num_classes, channels_last, at::kCUDA);
  const ElementDtype dtype = to_element_dtype(x.scalar_type(), "channel_stats");
  const c10::cuda::OptionalCUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  // 16-byte loads need 16-byte aligned rows: an aligned start and S a whole number of
  // vectors (views with an odd storage offset take the element-wise loads).
  const bool aligned = reinterpret_cast<std::uintptr_t>(x.const_data_ptr()) % 16 == 0;
  const StatsShape shape{d.samples, d.channels, d.inner, num_classes, labels.has_value(),
                         channels_last, static_cast<int>(x.element_size()), aligned};
  const StatsPlan plan = plan_channel_stats(shape);
  const at::TensorOptions f64 = x.options().dtype(at::kDouble);
  at::Tensor workspace = at::empty({plan.workspace_bytes}, x.options().dtype(at::kByte));
  at::Tensor count = at::empty({num_classes}, f64);
  at::Tensor mean = at::empty({num_classes, d.channels}, f64);
  at::Tensor m2 = at::empty({num_classes, d.channels}, f64);
  C10_CUDA_CHECK(launch_channel_stats(
      dtype, x.const_data_ptr(), shift.has_value() ? shift->const_data_ptr<double>() : nullptr,
      labels.has_value() ? labels->const_data_ptr<int64_t>() : nullptr, shape, plan,
      workspace.data_ptr(), count.data_ptr<double>(), mean.data_ptr<double>(),
      m2.data_ptr<double>(), stream));
  return {count, mean, m2};
}

}  // namespace transfer_fast

TORCH_LIBRARY_IMPL(transfer_fast, CUDA, m) {
  m.impl("channel_stats", &transfer_fast::channel_stats_cuda);
}
