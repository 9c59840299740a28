// CPU kernel of transfer_fast::multi_tensor_distance.
//
// Work is split into (tensor, chunk) items of kChunkElems elements; each item
// writes its own row of double partials, and the rows of a tensor are summed
// in chunk order afterwards. Because neither the chunking nor the final order
// depends on the thread count, results are bit-identical for any number of
// threads. Inside an item, blocks small enough to stay in L1 are reduced with
// float (or double) vector lanes and then added to double accumulators, which
// keeps float32 error near one rounding per block rather than per element.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "../common/distance_sums.h"
#include "../common/input_checks.h"

namespace transfer_fast {
namespace {

// Elements reduced in vector lanes before the lanes are added in double.
constexpr int64_t kBlockElems = 1024;

using PairSums = std::array<double, kNumSums>;

// The five sums of one (anchor, target) block, in the accumulation type acc_t
// (float for float/half/bfloat16 inputs, double for double inputs).
template <typename acc_t>
PairSums pair_block(const acc_t* a, const acc_t* b, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec abs_diff(0), sq_diff(0), dot(0), a_sq(0), b_sq(0);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    const Vec va = Vec::loadu(a + i);
    const Vec vb = Vec::loadu(b + i);
    const Vec d = va - vb;
    abs_diff = abs_diff + d.abs();
    sq_diff = at::vec::fmadd(d, d, sq_diff);
    dot = at::vec::fmadd(va, vb, dot);
    a_sq = at::vec::fmadd(va, va, a_sq);
    b_sq = at::vec::fmadd(vb, vb, b_sq);
  }
  if (i < n) {
    // Partial loads fill the missing lanes with zeros, which add nothing.
    const int count = static_cast<int>(n - i);
    const Vec va = Vec::loadu(a + i, count);
    const Vec vb = Vec::loadu(b + i, count);
    const Vec d = va - vb;
    abs_diff = abs_diff + d.abs();
    sq_diff = at::vec::fmadd(d, d, sq_diff);
    dot = at::vec::fmadd(va, vb, dot);
    a_sq = at::vec::fmadd(va, va, a_sq);
    b_sq = at::vec::fmadd(vb, vb, b_sq);
  }
  auto lanes = [](const Vec& v) {
    return static_cast<double>(at::vec::vec_reduce_all<acc_t>(
        [](const Vec& x, const Vec& y) { return x + y; }, v));
  };
  return {lanes(abs_diff), lanes(sq_diff), lanes(dot), lanes(a_sq), lanes(b_sq)};
}

// Row layout of one item's partials: A*K*3 pair sums, then A anchor squares,
// then K target squares. Squares are taken once per set, not once per pair.
struct SlotLayout {
  int64_t anchors, targets;
  int64_t pair(int64_t i, int64_t k, int s) const { return (i * targets + k) * 3 + s; }
  int64_t anchor_sq(int64_t i) const { return anchors * targets * 3 + i; }
  int64_t target_sq(int64_t k) const { return anchors * targets * 3 + anchors + k; }
  int64_t size() const { return anchors * targets * 3 + anchors + targets; }
};

// Reduces elements [start, start + len) of tensor t for every pair into row.
// Reduced-precision inputs are widened block by block into `scratch` so the
// vector loop always runs on acc_t.
template <typename scalar_t, typename acc_t>
void reduce_item(const std::vector<const scalar_t*>& anchor_ptrs,
                 const std::vector<const scalar_t*>& target_ptrs,
                 int64_t start, int64_t len, const SlotLayout& slots,
                 double* row) {
  constexpr bool widen = !std::is_same_v<scalar_t, acc_t>;
  const int64_t A = slots.anchors, K = slots.targets;
  std::vector<acc_t> scratch(widen ? (A + 1) * kBlockElems : 0);
  std::vector<const acc_t*> a_block(A);
  for (int64_t off = start; off < start + len; off += kBlockElems) {
    const int64_t n = std::min(kBlockElems, start + len - off);
    auto view = [&](const scalar_t* p, int64_t buf) -> const acc_t* {
      if constexpr (widen) {
        acc_t* dst = scratch.data() + buf * kBlockElems;
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(p[off + j]);
        return dst;
      } else {
        return p + off;
      }
    };
    for (int64_t i = 0; i < A; ++i) a_block[i] = view(anchor_ptrs[i], i);
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* b = view(target_ptrs[k], A);
      for (int64_t i = 0; i < A; ++i) {
        const PairSums s = pair_block<acc_t>(a_block[i], b, n);
        row[slots.pair(i, k, 0)] += s[kSumAbsDiff];
        row[slots.pair(i, k, 1)] += s[kSumSqDiff];
        row[slots.pair(i, k, 2)] += s[kSumDot];
        if (k == 0) row[slots.anchor_sq(i)] += s[kSumAnchorSq];
        if (i == 0) row[slots.target_sq(k)] += s[kSumTargetSq];
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void run_kernel(at::TensorList anchors, at::TensorList targets, int64_t T,
                const SlotLayout& slots, at::Tensor& out) {
  const int64_t A = slots.anchors, K = slots.targets;
  // Items of one tensor are consecutive, so the final sum walks them in order.
  std::vector<int64_t> item_tensor, item_start, first_item(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    first_item[t] = static_cast<int64_t>(item_tensor.size());
    const int64_t numel = anchors[t].numel();
    for (int64_t s = 0; s < numel; s += kChunkElems) {
      item_tensor.push_back(t);
      item_start.push_back(s);
    }
  }
  const int64_t num_items = static_cast<int64_t>(item_tensor.size());
  first_item[T] = num_items;
  std::vector<double> partials(num_items * slots.size(), 0.0);

  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> a_ptrs(A), b_ptrs(K);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item_tensor[item];
      for (int64_t i = 0; i < A; ++i) a_ptrs[i] = anchors[i * T + t].const_data_ptr<scalar_t>();
      for (int64_t k = 0; k < K; ++k) b_ptrs[k] = targets[k * T + t].const_data_ptr<scalar_t>();
      const int64_t len = std::min(kChunkElems, anchors[t].numel() - item_start[item]);
      reduce_item<scalar_t, acc_t>(a_ptrs, b_ptrs, item_start[item], len, slots,
                                   partials.data() + item * slots.size());
    }
  });

  auto o = out.accessor<double, 4>();
  std::vector<double> total(slots.size());
  for (int64_t t = 0; t < T; ++t) {
    std::fill(total.begin(), total.end(), 0.0);
    for (int64_t item = first_item[t]; item < first_item[t + 1]; ++item) {
      const double* row = partials.data() + item * slots.size();
      for (int64_t s = 0; s < slots.size(); ++s) total[s] += row[s];
    }
    for (int64_t i = 0; i < A; ++i) {
      for (int64_t k = 0; k < K; ++k) {
        o[i][k][t][kSumAbsDiff] = total[slots.pair(i, k, 0)];
        o[i][k][t][kSumSqDiff] = total[slots.pair(i, k, 1)];
        o[i][k][t][kSumDot] = total[slots.pair(i, k, 2)];
        o[i][k][t][kSumAnchorSq] = total[slots.anchor_sq(i)];
        o[i][k][t][kSumTargetSq] = total[slots.target_sq(k)];
      }
    }
  }
}

at::Tensor multi_tensor_distance_cpu(at::TensorList anchors, at::TensorList targets,
                                     int64_t num_tensors) {
  const SetCounts sets = check_distance_inputs(anchors, targets, num_tensors, at::kCPU);
  at::Tensor out = at::zeros({sets.anchors, sets.targets, num_tensors, kNumSums},
                             at::TensorOptions().dtype(at::kDouble));
  if (num_tensors == 0) return out;
  const SlotLayout slots{sets.anchors, sets.targets};
  switch (anchors[0].scalar_type()) {
    case at::kFloat: run_kernel<float, float>(anchors, targets, num_tensors, slots, out); break;
    case at::kDouble: run_kernel<double, double>(anchors, targets, num_tensors, slots, out); break;
    case at::kHalf: run_kernel<at::Half, float>(anchors, targets, num_tensors, slots, out); break;
    case at::kBFloat16:
      run_kernel<at::BFloat16, float>(anchors, targets, num_tensors, slots, out);
      break;
    default: TORCH_CHECK(false, "unreachable: dtype was checked");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(transfer_fast, CPU, m) {
  m.impl("multi_tensor_distance", &multi_tensor_distance_cpu);
}

}  // namespace transfer_fast
