// Argument checks of multi_tensor_distance shared by the CPU kernel and the
// CUDA glue, so both backends refuse the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace transfer_fast {

struct SetCounts {
  int64_t anchors;
  int64_t targets;
};

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Checks the fast-route contract (one supported dtype, contiguous, one device
// of `device_type`, matching numels) and returns the number of sets in each list.
inline SetCounts check_distance_inputs(at::TensorList anchors, at::TensorList targets,
                                       int64_t num_tensors, at::DeviceType device_type) {
  TORCH_CHECK(num_tensors >= 0, "multi_tensor_distance: num_tensors must be >= 0, got ",
              num_tensors);
  if (num_tensors == 0) {
    TORCH_CHECK(anchors.empty() && targets.empty(),
                "multi_tensor_distance: num_tensors is 0 but got ", anchors.size(),
                " anchor and ", targets.size(), " target tensors");
    return {0, 0};
  }
  const auto T = static_cast<size_t>(num_tensors);
  TORCH_CHECK(!anchors.empty() && anchors.size() % T == 0,
              "multi_tensor_distance: expected a positive multiple of num_tensors=", T,
              " anchor tensors, got ", anchors.size());
  TORCH_CHECK(!targets.empty() && targets.size() % T == 0,
              "multi_tensor_distance: expected a positive multiple of num_tensors=", T,
              " target tensors, got ", targets.size());
  const at::ScalarType dtype = anchors[0].scalar_type();
  const at::Device device = anchors[0].device();
  TORCH_CHECK(is_supported_dtype(dtype),
              "multi_tensor_distance: expected float32, float64, float16 or bfloat16, got ",
              dtype);
  TORCH_CHECK(device.type() == device_type, "multi_tensor_distance: expected ",
              device_type, " tensors, got ", device);
  auto check_list = [&](at::TensorList list, const char* what) {
    for (size_t j = 0; j < list.size(); ++j) {
      const at::Tensor& x = list[j];
      TORCH_CHECK(x.scalar_type() == dtype, "multi_tensor_distance: ", what, "[", j,
                  "] has dtype ", x.scalar_type(), ", expected ", dtype,
                  " like every other tensor");
      TORCH_CHECK(x.device() == device, "multi_tensor_distance: ", what, "[", j,
                  "] is on ", x.device(), ", expected ", device);
      TORCH_CHECK(x.is_contiguous(), "multi_tensor_distance: ", what, "[", j,
                  "] is not contiguous");
      const at::Tensor& ref = anchors[j % T];
      TORCH_CHECK(x.numel() == ref.numel(), "multi_tensor_distance: ", what, "[", j,
                  "] has shape ", x.sizes(), " but tensor ", j % T,
                  " of the first anchor set has shape ", ref.sizes());
    }
  };
  check_list(anchors, "anchors");
  check_list(targets, "targets");
  return {static_cast<int64_t>(anchors.size() / T), static_cast<int64_t>(targets.size() / T)};
}

}  // namespace transfer_fast
