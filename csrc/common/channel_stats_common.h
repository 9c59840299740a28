// Argument checks of channel_stats, shared by the CPU kernel and the CUDA glue
// so that both refuse the same inputs with the same messages.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace transfer_fast {

struct StatsDims {
  int64_t samples;   // N
  int64_t channels;  // C
  int64_t inner;     // S: positions per (sample, channel), H*W or L
};

// x: (N, C, S), or (N, S, C) when channels_last; shift: float64 (C,) or none
// (each channel's first element); labels: int64 (N,) or none with num_classes == 1.
inline StatsDims check_stats_inputs(const at::Tensor& x, const std::optional<at::Tensor>& shift,
                                    const std::optional<at::Tensor>& labels,
                                    int64_t num_classes, bool channels_last,
                                    at::DeviceType device_type) {
  TORCH_CHECK(x.dim() == 3, "channel_stats: expected x of 3 dimensions ",
              channels_last ? "(N, S, C)" : "(N, C, S)", ", got shape ", x.sizes());
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
              "channel_stats: expected float32, float64, float16 or bfloat16 x, got ", t);
  TORCH_CHECK(x.device().type() == device_type, "channel_stats: expected x on ",
              device_type, ", got ", x.device());
  TORCH_CHECK(x.is_contiguous(), "channel_stats: x of shape ", x.sizes(),
              " is not contiguous");
  const int64_t C = x.size(channels_last ? 2 : 1);
  if (shift.has_value()) {
    const at::Tensor& h = *shift;
    TORCH_CHECK(h.scalar_type() == at::kDouble && h.dim() == 1 && h.size(0) == C &&
                    h.is_contiguous() && h.device() == x.device(),
                "channel_stats: expected shift float64 (", C, ",) contiguous on ", x.device(),
                ", got ", h.scalar_type(), " ", h.sizes(), " on ", h.device());
  }
  TORCH_CHECK(num_classes >= 1, "channel_stats: num_classes must be >= 1, got ", num_classes);
  if (labels.has_value()) {
    const at::Tensor& y = *labels;
    TORCH_CHECK(y.scalar_type() == at::kLong && y.dim() == 1 && y.size(0) == x.size(0) &&
                    y.is_contiguous() && y.device() == x.device(),
                "channel_stats: expected labels int64 (", x.size(0), ",) contiguous on ",
                x.device(), ", got ", y.scalar_type(), " ", y.sizes(), " on ", y.device());
  } else {
    TORCH_CHECK(num_classes == 1, "channel_stats: num_classes is ", num_classes,
                " but no labels were given");
  }
  return {x.size(0), C, x.size(channels_last ? 1 : 2)};
}

}  // namespace transfer_fast
