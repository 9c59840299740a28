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

#include <vector>

#include "../common/distance_sums.h"
#include "../common/input_checks.h"

namespace transfer_fast {
namespace {

// Elements reduced in vector lanes before the lanes are added in double.
constexpr int64_t kBlockElems = 1024;
// Anchors reduced together in one pass over a target block: every loaded target
// vector serves all of them. Two (θr, θA) is the common case and fits in the
// vector registers with all accumulators.
constexpr int64_t kFusedAnchors = 2;

// Where one fused block adds its sums: 3 pair sums per anchor, optionally the
// anchors' and the target's squares (taken once per set, not once per pair).
struct BlockOut {
  double* pair[kFusedAnchors];
  double* anchor_sq[kFusedAnchors];
  double* target_sq;
};

// One pass over n elements of NA anchors and one target, in the accumulation
// type acc_t (float for float/half/bfloat16 inputs, double for double inputs).
template <typename acc_t, int NA, bool kAnchorSq, bool kTargetSq>
void fused_block(const acc_t* const* a, const acc_t* b, int64_t n, const BlockOut& out) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec abs_diff[NA], sq_diff[NA], dot[NA], a_sq[NA], b_sq(0);
  for (int j = 0; j < NA; ++j) abs_diff[j] = sq_diff[j] = dot[j] = a_sq[j] = Vec(0);
  auto accumulate = [&](const Vec& vb, const Vec (&va)[NA]) {
    for (int j = 0; j < NA; ++j) {
      const Vec d = va[j] - vb;
      abs_diff[j] = abs_diff[j] + d.abs();
      sq_diff[j] = at::vec::fmadd(d, d, sq_diff[j]);
      dot[j] = at::vec::fmadd(va[j], vb, dot[j]);
      if constexpr (kAnchorSq) a_sq[j] = at::vec::fmadd(va[j], va[j], a_sq[j]);
    }
    if constexpr (kTargetSq) b_sq = at::vec::fmadd(vb, vb, b_sq);
  };
  Vec va[NA];
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    for (int j = 0; j < NA; ++j) va[j] = Vec::loadu(a[j] + i);
    accumulate(Vec::loadu(b + i), va);
  }
  if (i < n) {  // partial loads fill the missing lanes with zeros, which add nothing
    const int count = static_cast<int>(n - i);
    for (int j = 0; j < NA; ++j) va[j] = Vec::loadu(a[j] + i, count);
    accumulate(Vec::loadu(b + i, count), va);
  }
  auto lanes = [](const Vec& v) {
    return static_cast<double>(at::vec::vec_reduce_all<acc_t>(
        [](const Vec& x, const Vec& y) { return x + y; }, v));
  };
  for (int j = 0; j < NA; ++j) {
    out.pair[j][0] += lanes(abs_diff[j]);
    out.pair[j][1] += lanes(sq_diff[j]);
    out.pair[j][2] += lanes(dot[j]);
    if constexpr (kAnchorSq) *out.anchor_sq[j] += lanes(a_sq[j]);
  }
  if constexpr (kTargetSq) *out.target_sq += lanes(b_sq);
}

// Picks the fused_block instance: the flags are compile-time so that a pass
// that needs no squares spends no instructions on them.
template <typename acc_t, int NA>
void fused_block_for(bool anchor_sq, bool target_sq, const acc_t* const* a, const acc_t* b,
                     int64_t n, const BlockOut& out) {
  if (anchor_sq && target_sq) fused_block<acc_t, NA, true, true>(a, b, n, out);
  else if (anchor_sq) fused_block<acc_t, NA, true, false>(a, b, n, out);
  else if (target_sq) fused_block<acc_t, NA, false, true>(a, b, n, out);
  else fused_block<acc_t, NA, false, false>(a, b, n, out);
}

// Row layout of one item's partials: A*K*3 pair sums, then A anchor squares,
// then K target squares.
struct SlotLayout {
  int64_t anchors, targets;
  int64_t pair(int64_t i, int64_t k, int s) const { return (i * targets + k) * 3 + s; }
  int64_t anchor_sq(int64_t i) const { return anchors * targets * 3 + i; }
  int64_t target_sq(int64_t k) const { return anchors * targets * 3 + anchors + k; }
  int64_t size() const { return anchors * targets * 3 + anchors + targets; }
};

// Per-thread buffers, allocated once per parallel_for range rather than per item.
template <typename scalar_t, typename acc_t>
struct ItemScratch {
  static constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  std::vector<const scalar_t*> anchor_ptrs, target_ptrs;
  std::vector<const acc_t*> anchor_chunk, anchor_block;
  // Reduced precision: the anchors' chunk and one target block converted to acc_t.
  std::vector<acc_t> widened;
  ItemScratch(int64_t A, int64_t K)
      : anchor_ptrs(A), target_ptrs(K), anchor_chunk(A), anchor_block(A),
        widened(kWiden ? A * kChunkElems + kBlockElems : 0) {}
};

// Reduces elements [start, start + len) of one tensor for every pair into row.
// Targets are the outer loop: each streams through memory once while the
// anchors' chunk (2 x 256 KB for float) is re-read from cache, which keeps the
// number of concurrent memory streams at three whatever K is.
template <typename scalar_t, typename acc_t>
void reduce_item(ItemScratch<scalar_t, acc_t>& s, int64_t start, int64_t len,
                 const SlotLayout& slots, double* row) {
  const int64_t A = slots.anchors, K = slots.targets;
  for (int64_t i = 0; i < A; ++i) {
    if constexpr (ItemScratch<scalar_t, acc_t>::kWiden) {
      acc_t* dst = s.widened.data() + i * kChunkElems;
      for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<acc_t>(s.anchor_ptrs[i][start + j]);
      s.anchor_chunk[i] = dst;
    } else {
      s.anchor_chunk[i] = s.anchor_ptrs[i] + start;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t off = 0; off < len; off += kBlockElems) {
      const int64_t n = std::min(kBlockElems, len - off);
      const acc_t* b;
      if constexpr (ItemScratch<scalar_t, acc_t>::kWiden) {
        acc_t* dst = s.widened.data() + A * kChunkElems;
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(s.target_ptrs[k][start + off + j]);
        b = dst;
      } else {
        b = s.target_ptrs[k] + start + off;
      }
      for (int64_t i = 0; i < A; ++i) s.anchor_block[i] = s.anchor_chunk[i] + off;
      for (int64_t i0 = 0; i0 < A; i0 += kFusedAnchors) {
        const int64_t na = std::min(kFusedAnchors, A - i0);
        BlockOut out{};
        for (int64_t j = 0; j < na; ++j) {
          out.pair[j] = row + slots.pair(i0 + j, k, 0);
          out.anchor_sq[j] = row + slots.anchor_sq(i0 + j);
        }
        out.target_sq = row + slots.target_sq(k);
        const acc_t* const* a = s.anchor_block.data() + i0;
        if (na == 2) fused_block_for<acc_t, 2>(k == 0, i0 == 0, a, b, n, out);
        else fused_block_for<acc_t, 1>(k == 0, i0 == 0, a, b, n, out);
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
    ItemScratch<scalar_t, acc_t> s(A, K);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item_tensor[item];
      for (int64_t i = 0; i < A; ++i) {
        s.anchor_ptrs[i] = anchors[i * T + t].const_data_ptr<scalar_t>();
      }
      for (int64_t k = 0; k < K; ++k) {
        s.target_ptrs[k] = targets[k * T + t].const_data_ptr<scalar_t>();
      }
      const int64_t len = std::min(kChunkElems, anchors[t].numel() - item_start[item]);
      reduce_item<scalar_t, acc_t>(s, item_start[item], len, slots,
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
