// The CPU reduction shared by multi_tensor_distance and packed_distance: both
// describe their work as chunk rows (see distance_sums.h) and differ only in
// where a (set, tensor) starts in memory.
//
// Each row writes its own row of double partials, and the rows of a tensor are
// summed in row order afterwards. Because neither the chunking nor the final
// order depends on the thread count, results are bit-identical for any number
// of threads, and the two ops give bit-identical sums for the same values.
// Inside a row, blocks small enough to stay in L1 are reduced with float (or
// double) vector lanes and then added to double accumulators, which keeps
// float32 error near one rounding per block rather than per element.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/distance_sums.h"

namespace transfer_fast {
namespace cpu {

// Elements reduced in vector lanes before the lanes are added in double.
constexpr int64_t kBlockElems = 1024;
// Anchors reduced together in one pass over a target block: every loaded target
// vector serves all of them. Two (θr, θA) is the common case and fits in the
// vector registers with all accumulators.
constexpr int kFusedAnchors = 2;

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
    out.pair[j][kSumAbsDiff] += lanes(abs_diff[j]);
    out.pair[j][kSumSqDiff] += lanes(sq_diff[j]);
    out.pair[j][kSumDot] += lanes(dot[j]);
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

// Per-thread buffers, allocated once per parallel_for range rather than per row.
template <typename scalar_t>
struct RowScratch {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  std::vector<const acc_t*> anchor_chunk, anchor_block;
  // Reduced precision: the anchors' chunk and one target block converted to acc_t.
  std::vector<acc_t> widened;
  explicit RowScratch(int64_t A)
      : anchor_chunk(A), anchor_block(A), widened(kWiden ? A * kChunkElems + kBlockElems : 0) {}
};

// Reduces len <= kChunkElems elements for every pair into `row`; a[i] and b[k]
// point at the chunk's first element in anchor set i and target set k.
// Targets are the outer loop: each streams through memory once while the
// anchors' chunk (2 x 256 KB for float) is re-read from cache, which keeps the
// number of concurrent memory streams at three whatever K is.
template <typename scalar_t>
void reduce_row(RowScratch<scalar_t>& s, const scalar_t* const* a, const scalar_t* const* b,
                int64_t len, const SlotLayout& slots, double* row) {
  using acc_t = typename RowScratch<scalar_t>::acc_t;
  constexpr bool kWiden = RowScratch<scalar_t>::kWiden;
  const int64_t A = slots.anchors, K = slots.targets;
  for (int64_t i = 0; i < A; ++i) {
    if constexpr (kWiden) {
      acc_t* dst = s.widened.data() + i * kChunkElems;
      for (int64_t j = 0; j < len; ++j) dst[j] = static_cast<acc_t>(a[i][j]);
      s.anchor_chunk[i] = dst;
    } else {
      s.anchor_chunk[i] = a[i];
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t off = 0; off < len; off += kBlockElems) {
      const int64_t n = std::min(kBlockElems, len - off);
      const acc_t* target;
      if constexpr (kWiden) {
        acc_t* dst = s.widened.data() + A * kChunkElems;
        for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(b[k][off + j]);
        target = dst;
      } else {
        target = b[k] + off;
      }
      for (int64_t i = 0; i < A; ++i) s.anchor_block[i] = s.anchor_chunk[i] + off;
      for (int64_t i0 = 0; i0 < A; i0 += kFusedAnchors) {
        const int64_t na = std::min<int64_t>(kFusedAnchors, A - i0);
        BlockOut out{};
        for (int64_t j = 0; j < na; ++j) {
          out.pair[j] = row + slots.pair(i0 + j, k, 0);
          out.anchor_sq[j] = row + slots.anchor_sq(i0 + j);
        }
        out.target_sq = row + slots.target_sq(k);
        const acc_t* const* anchors = s.anchor_block.data() + i0;
        if (na == 2) fused_block_for<acc_t, 2>(k == 0, i0 == 0, anchors, target, n, out);
        else fused_block_for<acc_t, 1>(k == 0, i0 == 0, anchors, target, n, out);
      }
    }
  }
}

// Asks for the first cache lines of every set of the next row while this row
// is reduced. Separate tensors (the list op) are separate memory streams, and
// the hardware prefetcher starts each one over: on many small tensors (2000
// of ~10 KB) that start-up, not the arithmetic, was what the list op lost
// against the packed op, whose tensors follow one another in memory.
template <typename scalar_t, class Base>
inline void prefetch_row(const int64_t* r, int64_t num_sets, Base& base) {
#if defined(__GNUC__)
  constexpr int64_t kLineElems = 64 / static_cast<int64_t>(sizeof(scalar_t));
  constexpr int64_t kLines = 32;
  const int64_t len = r[kRowEnd] - r[kRowBegin];
  for (int64_t set = 0; set < num_sets; ++set) {
    const scalar_t* p = base(set, r[kRowTensor]) + r[kRowBegin];
    for (int64_t j = 0; j < kLines && j * kLineElems < len; ++j)
      __builtin_prefetch(p + j * kLineElems, 0, 3);
  }
#else
  (void)r, (void)num_sets, (void)base;
#endif
}

// Partials of every chunk row: partials[c * slots.size() + slot], zero-filled
// by the caller. base(set, tensor) is where that tensor of that set starts in
// the coordinates of the rows' begin/end (sets 0..A-1 anchors, then targets).
template <typename scalar_t, class Base>
void reduce_rows(const int64_t* rows, int64_t num_rows, const SlotLayout& slots, Base&& base,
                 double* partials) {
  const int64_t A = slots.anchors, K = slots.targets;
  at::parallel_for(0, num_rows, 1, [&](int64_t first, int64_t last) {
    RowScratch<scalar_t> s(A);
    std::vector<const scalar_t*> a(A), b(K);
    for (int64_t c = first; c < last; ++c) {
      const int64_t* r = rows + c * kRowWidth;
      if (c + 1 < last) prefetch_row<scalar_t>(rows + (c + 1) * kRowWidth, A + K, base);
      for (int64_t i = 0; i < A; ++i) a[i] = base(i, r[kRowTensor]) + r[kRowBegin];
      for (int64_t k = 0; k < K; ++k) b[k] = base(A + k, r[kRowTensor]) + r[kRowBegin];
      reduce_row<scalar_t>(s, a.data(), b.data(), r[kRowEnd] - r[kRowBegin], slots,
                           partials + c * slots.size());
    }
  });
}

// Adds each tensor's rows in row order, from 0.0, into the contiguous float64
// (A, K, T, 5) `out`; tensors without rows get zeros.
inline void sum_rows(const int64_t* rows, int64_t num_rows, const double* partials,
                     const SlotLayout& slots, int64_t T, double* out) {
  const int64_t S = slots.size();
  std::vector<double> total(T * S, 0.0);
  for (int64_t c = 0; c < num_rows; ++c) {
    double* dst = total.data() + rows[c * kRowWidth + kRowTensor] * S;
    const double* src = partials + c * S;
    for (int64_t slot = 0; slot < S; ++slot) dst[slot] += src[slot];
  }
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t slot = 0; slot < S; ++slot) {
      const double v = total[t * S + slot];
      for_each_output(slots, T, t, slot, [&](int64_t index) { out[index] = v; });
    }
  }
}

}  // namespace cpu
}  // namespace transfer_fast
