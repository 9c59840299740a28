// Element types of the CUDA kernels' fast route. Plain C++: the torch glue
// maps at::ScalarType onto this and the .cu files switch on it, so neither
// side includes the other's headers.
#pragma once

namespace transfer_fast {

enum class ElementDtype : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kFloat64 = 3,
};

}  // namespace transfer_fast
