// at::ScalarType -> ElementDtype for the torch glue of every CUDA op.
#pragma once

#include <ATen/ATen.h>

#include "element_dtype.h"

namespace transfer_fast {

inline ElementDtype to_element_dtype(at::ScalarType type, const char* op) {
  switch (type) {
    case at::kFloat: return ElementDtype::kFloat32;
    case at::kHalf: return ElementDtype::kFloat16;
    case at::kBFloat16: return ElementDtype::kBFloat16;
    case at::kDouble: return ElementDtype::kFloat64;
    default: break;
  }
  TORCH_CHECK(false, op, " (CUDA): expected float32, float16, bfloat16 or float64 tensors, got ",
              type);
}

}  // namespace transfer_fast
