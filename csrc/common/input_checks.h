// Argument checks of the distance ops shared by the CPU kernels and the CUDA
// glue, so both backends refuse the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "distance_sums.h"

namespace transfer_fast {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_dtype_and_device(const char* op, const at::Tensor& x,
                                   at::DeviceType device_type) {
  TORCH_CHECK(is_supported_dtype(x.scalar_type()), op,
              ": expected float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.device().type() == device_type, op, ": expected ", device_type,
              " tensors, got ", x.device());
}

struct SetCounts {
  int64_t anchors;
  int64_t targets;
};

// multi_tensor_distance, O(1) part: list lengths a positive multiple of
// num_tensors, and the dtype and device of anchors[0], which every other
// tensor must share (checked by check_each_tensor).
inline SetCounts check_set_counts(at::TensorList anchors, at::TensorList targets,
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
  check_dtype_and_device("multi_tensor_distance", anchors[0], device_type);
  return {static_cast<int64_t>(anchors.size() / T), static_cast<int64_t>(targets.size() / T)};
}

// multi_tensor_distance, per tensor, in one pass: the dtype and device of
// anchors[0], contiguous, the numel of its index in the first anchor set.
// visit(set, t, x) follows each tensor's checks, so callers gather data
// pointers in the same pass; sets 0..A-1 are the anchors, then the targets.
template <class Visit>
void check_each_tensor(at::TensorList anchors, at::TensorList targets, int64_t num_tensors,
                       Visit&& visit) {
  const at::ScalarType dtype = anchors[0].scalar_type();
  const at::Device device = anchors[0].device();
  const auto T = static_cast<size_t>(num_tensors);
  const int64_t first_target_set = static_cast<int64_t>(anchors.size() / T);
  auto check_list = [&](at::TensorList list, const char* what, int64_t first_set) {
    for (size_t j = 0; j < list.size(); ++j) {
      const at::Tensor& x = list[j];
      TORCH_CHECK(x.scalar_type() == dtype, "multi_tensor_distance: ", what, "[", j,
                  "] has dtype ", x.scalar_type(), ", expected ", dtype,
                  " like every other tensor");
      TORCH_CHECK(x.device() == device, "multi_tensor_distance: ", what, "[", j, "] is on ",
                  x.device(), ", expected ", device);
      TORCH_CHECK(x.is_contiguous(), "multi_tensor_distance: ", what, "[", j,
                  "] is not contiguous");
      const at::Tensor& ref = anchors[j % T];
      TORCH_CHECK(x.numel() == ref.numel(), "multi_tensor_distance: ", what, "[", j,
                  "] has shape ", x.sizes(), " but tensor ", j % T,
                  " of the first anchor set has shape ", ref.sizes());
      visit(first_set + static_cast<int64_t>(j / T), static_cast<int64_t>(j % T), x);
    }
  };
  check_list(anchors, "anchors", 0);
  check_list(targets, "targets", first_target_set);
}

struct PackedDims {
  int64_t anchors;  // A
  int64_t targets;  // K
  int64_t length;   // L, elements per set in the flat buffers
  int64_t rows;     // chunk rows
};

// packed_distance, all O(1): anchors (A, L) and targets (K, L) contiguous, of
// one dtype and device; chunks int64 (rows, 3) contiguous on that device. The
// rows themselves are not read here: on a GPU that would synchronise. The CPU
// kernel checks them as it goes; the CUDA kernel reads a row it cannot read
// as empty, so no content of `chunks` makes either read outside the buffers.
inline PackedDims check_packed_inputs(const at::Tensor& anchors, const at::Tensor& targets,
                                      const at::Tensor& chunks, int64_t num_tensors,
                                      at::DeviceType device_type) {
  TORCH_CHECK(num_tensors >= 0, "packed_distance: num_tensors must be >= 0, got ", num_tensors);
  TORCH_CHECK(anchors.dim() == 2 && anchors.size(0) >= 1,
              "packed_distance: expected anchors of shape (A, L) with A >= 1, got shape ",
              anchors.sizes());
  TORCH_CHECK(targets.dim() == 2 && targets.size(0) >= 1 && targets.size(1) == anchors.size(1),
              "packed_distance: expected targets of shape (K, ", anchors.size(1),
              ") with K >= 1 like the anchors' (A, L), got shape ", targets.sizes());
  check_dtype_and_device("packed_distance", anchors, device_type);
  TORCH_CHECK(targets.scalar_type() == anchors.scalar_type() &&
                  targets.device() == anchors.device(),
              "packed_distance: expected targets of dtype ", anchors.scalar_type(), " on ",
              anchors.device(), " like the anchors, got ", targets.scalar_type(), " on ",
              targets.device());
  TORCH_CHECK(anchors.is_contiguous() && targets.is_contiguous(),
              "packed_distance: expected contiguous anchors and targets, got strides ",
              anchors.strides(), " and ", targets.strides());
  TORCH_CHECK(chunks.scalar_type() == at::kLong && chunks.dim() == 2 &&
                  chunks.size(1) == kRowWidth && chunks.is_contiguous() &&
                  chunks.device() == anchors.device(),
              "packed_distance: expected chunks int64 (rows, 3) contiguous on ",
              anchors.device(), " (from packed_chunks), got ", chunks.scalar_type(), " ",
              chunks.sizes(), " on ", chunks.device());
  return {anchors.size(0), targets.size(0), anchors.size(1), chunks.size(0)};
}

}  // namespace transfer_fast
