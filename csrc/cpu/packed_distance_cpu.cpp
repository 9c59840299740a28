// CPU kernels of transfer_fast::packed_chunks and transfer_fast::packed_distance.
//
// packed_distance reads every set from one flat buffer; the chunk rows
// (absolute element offsets into a set's row) are built once per layout by
// packed_chunks, so a call does no per-tensor work on the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../common/distance_sums.h"
#include "../common/input_checks.h"
#include "distance_reduce.h"

namespace transfer_fast {
namespace {

// offsets, numels: int64 (T,): tensor t is elements [offsets[t], offsets[t] +
// numels[t]) of every set's flat row. Returns int64 (rows, 3) chunk rows.
at::Tensor packed_chunks_cpu(const at::Tensor& offsets, const at::Tensor& numels) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 &&
                  offsets.is_contiguous(),
              "packed_chunks: expected offsets int64 (T,) contiguous, got ",
              offsets.scalar_type(), " of shape ", offsets.sizes());
  TORCH_CHECK(numels.scalar_type() == at::kLong && numels.sizes() == offsets.sizes() &&
                  numels.is_contiguous(),
              "packed_chunks: expected numels int64 (", offsets.size(0),
              ",) contiguous like offsets, got ", numels.scalar_type(), " of shape ",
              numels.sizes());
  const int64_t T = offsets.size(0);
  const int64_t* offset = offsets.const_data_ptr<int64_t>();
  const int64_t* numel = numels.const_data_ptr<int64_t>();
  int64_t num_rows = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(offset[t] >= 0 && numel[t] >= 0, "packed_chunks: tensor ", t,
                " has offset ", offset[t], " and numel ", numel[t], ", expected both >= 0");
    num_rows += num_chunks(numel[t]);
  }
  at::Tensor rows = at::empty({num_rows, kRowWidth}, offsets.options());
  int64_t* row = rows.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) row = write_chunk_rows(row, t, offset[t], numel[t]);
  return rows;
}

// The CUDA kernel cannot raise without a synchronisation, so it skips rows it
// cannot read; here an O(rows) check is cheap next to the reduction, so a map
// that is not packed_chunks' for this buffer is refused instead.
void check_rows(const int64_t* rows, int64_t num_rows, int64_t T, int64_t L) {
  for (int64_t c = 0; c < num_rows; ++c) {
    const int64_t* r = rows + c * kRowWidth;
    const int64_t t = r[kRowTensor], begin = r[kRowBegin], end = r[kRowEnd];
    const bool sorted = c == 0 || t >= r[kRowTensor - kRowWidth];
    TORCH_CHECK(t >= 0 && t < T && sorted && begin >= 0 && begin <= end && end <= L &&
                    end - begin <= kChunkElems,
                "packed_distance: chunks row ", c, " is (", t, ", ", begin, ", ", end,
                "); expected rows of packed_chunks: tensor in [0, num_tensors=", T,
                ") and not below the previous row's, 0 <= begin <= end <= L=", L,
                ", at most ", kChunkElems, " elements");
  }
}

at::Tensor packed_distance_cpu(const at::Tensor& anchors, const at::Tensor& targets,
                               const at::Tensor& chunks, int64_t num_tensors) {
  const PackedDims d = check_packed_inputs(anchors, targets, chunks, num_tensors, at::kCPU);
  const int64_t T = num_tensors, L = d.length;
  const int64_t* rows = chunks.const_data_ptr<int64_t>();
  check_rows(rows, d.rows, T, L);
  at::Tensor out =
      at::empty({d.anchors, d.targets, T, kNumSums}, at::TensorOptions().dtype(at::kDouble));
  const SlotLayout slots{d.anchors, d.targets};
  std::vector<double> partials(d.rows * slots.size(), 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, anchors.scalar_type(), "packed_distance", [&] {
        const scalar_t* a = anchors.const_data_ptr<scalar_t>();
        const scalar_t* b = targets.const_data_ptr<scalar_t>();
        auto base = [&](int64_t set, int64_t /*tensor: rows are absolute*/) {
          return set < d.anchors ? a + set * L : b + (set - d.anchors) * L;
        };
        cpu::reduce_rows<scalar_t>(rows, d.rows, slots, base, partials.data());
      });
  cpu::sum_rows(rows, d.rows, partials.data(), slots, T, out.data_ptr<double>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(transfer_fast, CPU, m) {
  m.impl("packed_chunks", &packed_chunks_cpu);
  m.impl("packed_distance", &packed_distance_cpu);
}

}  // namespace transfer_fast
