// transfer_fast::_self_check: raises on request, so a test can verify in a
// subprocess that an error thrown inside this library reaches Python as an
// exception. A toolchain that breaks C++ unwinding (a compiler wrapper once
// did) turns every TORCH_CHECK into a segmentation fault instead.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

namespace transfer_fast {
namespace {

// mode 0: returns int64 [0]; 1: TORCH_CHECK fails (RuntimeError); 2:
// TORCH_CHECK_VALUE fails (ValueError); 3: TORCH_CHECK fails inside an
// at::parallel_for worker, whose exception must cross the thread pool.
at::Tensor self_check(int64_t mode) {
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 3, "_self_check: expected mode 0, 1, 2 or 3, got ",
                    mode);
  TORCH_CHECK(mode != 1, "_self_check: raised on request (mode 1)");
  TORCH_CHECK_VALUE(mode != 2, "_self_check: raised on request (mode 2)");
  if (mode == 3) {
    at::parallel_for(0, 4, 1, [](int64_t, int64_t) {
      TORCH_CHECK(false, "_self_check: raised on request in a worker (mode 3)");
    });
  }
  return at::zeros({1}, at::kLong);
}

}  // namespace

// No tensor argument, so no device to dispatch on: the op is registered for
// every backend at once (CompositeExplicitAutograd also serves a call whose
// arguments name no device).
TORCH_LIBRARY_IMPL(transfer_fast, CompositeExplicitAutograd, m) {
  m.impl("_self_check", &self_check);
}

}  // namespace transfer_fast
