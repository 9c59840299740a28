// CPU kernel of transfer_fast::multi_tensor_distance: the tensors' data
// pointers are gathered in the argument-check pass, each tensor is cut into
// chunk rows of its own elements, and distance_reduce.h does the rest.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../common/distance_sums.h"
#include "../common/input_checks.h"
#include "distance_reduce.h"

namespace transfer_fast {
namespace {

at::Tensor multi_tensor_distance_cpu(at::TensorList anchors, at::TensorList targets,
                                     int64_t num_tensors) {
  const SetCounts sets = check_set_counts(anchors, targets, num_tensors, at::kCPU);
  const int64_t T = num_tensors, A = sets.anchors, K = sets.targets;
  at::Tensor out = at::empty({A, K, T, kNumSums}, at::TensorOptions().dtype(at::kDouble));
  if (T == 0) return out;
  std::vector<const void*> ptrs((A + K) * T);  // (set, tensor) at set * T + tensor
  check_each_tensor(anchors, targets, T, [&](int64_t set, int64_t t, const at::Tensor& x) {
    ptrs[set * T + t] = x.const_data_ptr();
  });

  int64_t num_rows = 0;
  for (int64_t t = 0; t < T; ++t) num_rows += num_chunks(anchors[t].numel());
  std::vector<int64_t> rows(num_rows * kRowWidth);
  int64_t* row = rows.data();
  for (int64_t t = 0; t < T; ++t) row = write_chunk_rows(row, t, 0, anchors[t].numel());

  const SlotLayout slots{A, K};
  std::vector<double> partials(num_rows * slots.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, anchors[0].scalar_type(), "multi_tensor_distance", [&] {
        auto base = [&](int64_t set, int64_t t) {
          return static_cast<const scalar_t*>(ptrs[set * T + t]);
        };
        cpu::reduce_rows<scalar_t>(rows.data(), num_rows, slots, base, partials.data());
      });
  cpu::sum_rows(rows.data(), num_rows, partials.data(), slots, T, out.data_ptr<double>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(transfer_fast, CPU, m) {
  m.impl("multi_tensor_distance", &multi_tensor_distance_cpu);
}

}  // namespace transfer_fast
