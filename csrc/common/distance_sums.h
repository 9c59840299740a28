// Layouts of the fused distance ops shared by every backend: the result's sum
// columns, the work map of chunks, and the row of partial sums each chunk
// writes. Free of torch and CUDA headers so the .cu kernels and the CPU
// kernels agree on them without including each other.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace transfer_fast {

// Index of each sum in the last dimension of the ops' (A, K, T, 5) result.
enum DistanceSum : int {
  kSumAbsDiff = 0,   // sum |a - b|
  kSumSqDiff = 1,    // sum (a - b)^2
  kSumDot = 2,       // sum a * b
  kSumAnchorSq = 3,  // sum a^2
  kSumTargetSq = 4,  // sum b^2
  kNumSums = 5,
};

// Elements per work item. Fixed (never derived from the thread or block
// count) so that partial sums, and therefore results, are identical whatever
// the parallelism, and identical between the list op and the packed op.
constexpr int64_t kChunkElems = 1 << 16;

// The work map: one int64 row per chunk, (tensor, begin, end), `end - begin`
// <= kChunkElems elements of one tensor. A tensor's chunks are consecutive
// rows in element order and rows are sorted by tensor, so a tensor's sum is
// its rows' partials added in row order; empty tensors have no rows.
enum ChunkRowColumn : int { kRowTensor = 0, kRowBegin = 1, kRowEnd = 2, kRowWidth = 3 };

inline int64_t num_chunks(int64_t numel) { return (numel + kChunkElems - 1) / kChunkElems; }

// Writes the rows of tensor t, elements [begin, begin + numel) of its buffer,
// from `row` on; returns the position after the last row written.
inline int64_t* write_chunk_rows(int64_t* row, int64_t t, int64_t begin, int64_t numel) {
  for (int64_t start = 0; start < numel; start += kChunkElems, row += kRowWidth) {
    row[kRowTensor] = t;
    row[kRowBegin] = begin + start;
    row[kRowEnd] = begin + (numel - start < kChunkElems ? numel : start + kChunkElems);
  }
  return row;
}

static_assert(kSumAbsDiff == 0 && kSumSqDiff == 1 && kSumDot == 2,
              "the 3 pair sums are stored in DistanceSum column order");

// One chunk's row of partial sums: 3 per (anchor, target) pair in DistanceSum
// column order, then one a^2 per anchor, then one b^2 per target (squares
// are per set, so they are taken once, not once per pair).
struct SlotLayout {
  int64_t anchors;  // A
  int64_t targets;  // K
  TF_HOST_DEVICE int64_t pair(int64_t i, int64_t k, int sum) const {
    return (i * targets + k) * 3 + sum;
  }
  TF_HOST_DEVICE int64_t anchor_sq(int64_t i) const { return anchors * targets * 3 + i; }
  TF_HOST_DEVICE int64_t target_sq(int64_t k) const {
    return anchors * targets * 3 + anchors + k;
  }
  TF_HOST_DEVICE int64_t size() const { return anchors * targets * 3 + anchors + targets; }
};

// Where the total of `slot` for tensor t goes in the contiguous (A, K, T, 5)
// result: calls put(index) once per output element it fills (a square fills
// every pair of its set).
template <class Put>
TF_HOST_DEVICE void for_each_output(const SlotLayout& s, int64_t T, int64_t t, int64_t slot,
                                    Put&& put) {
  const int64_t A = s.anchors, K = s.targets, pairs = 3 * A * K;
  auto at = [&](int64_t i, int64_t k, int col) { return ((i * K + k) * T + t) * kNumSums + col; };
  if (slot < pairs) {
    put(at(slot / 3 / K, slot / 3 % K, static_cast<int>(slot % 3)));
  } else if (slot < pairs + A) {
    for (int64_t k = 0; k < K; ++k) put(at(slot - pairs, k, kSumAnchorSq));
  } else {
    for (int64_t i = 0; i < A; ++i) put(at(i, slot - pairs - A, kSumTargetSq));
  }
}

}  // namespace transfer_fast
