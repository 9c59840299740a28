// CPU kernel of transfer_fast::channel_stats: per (class, channel) sums of
// d = x - shift and d^2 in float64, in one pass over x in its own layout.
//
// Work is split over channels: each thread owns a range of channels and walks
// all samples in order, so every (class, channel) sum is added in the same
// order whatever the thread count (results are bit-identical for 1 or 2
// threads), and no partials have to be merged. A sample adds into the row of
// its class, so the cost does not depend on the number of classes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "../common/channel_stats_common.h"
#include "../common/channel_stats_finish.h"

namespace transfer_fast {
namespace {

// Channels per parallel_for chunk: enough elements that a thread's share is worth
// starting, and at least `floor` channels (vector width, for the contiguous case).
int64_t channel_grain(const StatsDims& d, int64_t floor) {
  return std::max<int64_t>(floor, at::internal::GRAIN_SIZE /
                                      std::max<int64_t>(1, d.samples * d.inner));
}

// (N, C, S): each (sample, channel) row of S elements is contiguous and
// reduced with vector lanes before it is added to its class.
template <typename scalar_t>
void sums_channels_first(const scalar_t* x, const double* shift, const int64_t* labels,
                         const StatsDims& d, double* s1, double* s2) {
  const int64_t C = d.channels, S = d.inner;
  at::parallel_for(0, C, channel_grain(d, 1), [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < d.samples; ++n) {
      const int64_t k = labels ? labels[n] : 0;
      for (int64_t c = c0; c < c1; ++c) {
        const scalar_t* row = x + (n * C + c) * S;
        const double sh = shift[c];
        double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
        for (int64_t j = 0; j < S; ++j) {
          const double v = static_cast<double>(row[j]) - sh;
          a += v;
          b += v * v;
        }
        s1[k * C + c] += a;
        s2[k * C + c] += b;
      }
    }
  });
}

// (N, S, C): channels are contiguous, so each position adds a vector of
// channels to its class row; no horizontal reduction is needed.
template <typename scalar_t>
void sums_channels_last(const scalar_t* x, const double* shift, const int64_t* labels,
                        const StatsDims& d, double* s1, double* s2) {
  const int64_t C = d.channels, S = d.inner;
  at::parallel_for(0, C, channel_grain(d, 8), [&](int64_t c0, int64_t c1) {
    for (int64_t n = 0; n < d.samples; ++n) {
      double* a = s1 + (labels ? labels[n] : 0) * C;
      double* b = s2 + (labels ? labels[n] : 0) * C;
      for (int64_t s = 0; s < S; ++s) {
        const scalar_t* p = x + (n * S + s) * C;
#pragma omp simd
        for (int64_t c = c0; c < c1; ++c) {
          const double v = static_cast<double>(p[c]) - shift[c];
          a[c] += v;
          b[c] += v * v;
        }
      }
    }
  });
}

// Sums -> mean and centred sum of squares, in place (s1 becomes the mean, s2
// the m2). One loop over (K, C): with a thousand classes this is most of the
// work after the pass over x.
void finish_in_place(const at::Tensor& count, const double* sh, at::Tensor& s1,
                     at::Tensor& s2) {
  const int64_t K = s1.size(0), C = s1.size(1);
  const double* n = count.const_data_ptr<double>();
  double* a = s1.data_ptr<double>();
  double* b = s2.data_ptr<double>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, C));
  at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t c = 0; c < C; ++c) {
        finish_channel_stat(n[k], sh[c], a[k * C + c], b[k * C + c]);
      }
    }
  });
}

// Each channel's first element (sample 0, position 0) as float64: the shift
// when the caller gives none. Zeros when x has no element.
template <typename scalar_t>
std::vector<double> first_elements(const scalar_t* x, const StatsDims& d, bool channels_last) {
  std::vector<double> out(d.channels, 0.0);
  if (d.samples == 0 || d.inner == 0) return out;
  for (int64_t c = 0; c < d.channels; ++c) {
    out[c] = static_cast<double>(x[channels_last ? c : c * d.inner]);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> channel_stats_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& shift,
    const std::optional<at::Tensor>& labels, int64_t num_classes, bool channels_last) {
  const StatsDims d =
      check_stats_inputs(x, shift, labels, num_classes, channels_last, at::kCPU);
  const int64_t K = num_classes;
  const at::TensorOptions f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor count = at::zeros({K}, f64);
  at::Tensor s1 = at::zeros({K, d.channels}, f64);
  at::Tensor s2 = at::zeros({K, d.channels}, f64);
  const int64_t* y = labels.has_value() ? labels->const_data_ptr<int64_t>() : nullptr;
  double* cnt = count.data_ptr<double>();
  for (int64_t n = 0; n < d.samples; ++n) {  // checked here: a bad label would write anywhere
    const int64_t k = y ? y[n] : 0;
    TORCH_CHECK(k >= 0 && k < K, "channel_stats: labels[", n, "] = ", k,
                " is outside [0, num_classes=", K, ")");
    cnt[k] += static_cast<double>(d.inner);
  }
  std::vector<double> first;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    if (!shift.has_value()) first = first_elements(data, d, channels_last);
    const double* sh = shift.has_value() ? shift->const_data_ptr<double>() : first.data();
    auto run = channels_last ? sums_channels_last<scalar_t> : sums_channels_first<scalar_t>;
    run(data, sh, y, d, s1.data_ptr<double>(), s2.data_ptr<double>());
  });
  finish_in_place(count, shift.has_value() ? shift->const_data_ptr<double>() : first.data(), s1,
                  s2);
  return {count, s1, s2};
}

}  // namespace

TORCH_LIBRARY_IMPL(transfer_fast, CPU, m) {
  m.impl("channel_stats", &channel_stats_cpu);
}

}  // namespace transfer_fast
