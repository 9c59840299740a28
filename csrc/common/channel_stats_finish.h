// The finishing step of channel_stats, written once for the CPU kernel and the
// CUDA finishing kernel so both round the same way.
#pragma once

#include "host_device.h"

namespace transfer_fast {

// n elements of one (class, channel) whose values minus `shift` summed to s1
// and their squares to s2 -> s1 becomes the mean and s2 the centred sum of
// squares, in place. The shift keeps the values near zero, so s2 - s1^2/n
// loses little to cancellation in float64 even for a large mean and a small
// spread. Empty classes (n == 0) get mean 0 and m2 0; a NaN stays a NaN.
TF_HOST_DEVICE void finish_channel_stat(double n, double shift, double& s1, double& s2) {
  if (n > 0) {
    const double d = s1 / n;
    const double m2 = s2 - s1 * d;
    s2 = m2 < 0.0 ? 0.0 : m2;  // rounding can take an exact 0 below it
    s1 = shift + d;
  } else {
    s1 = 0.0;
    s2 = 0.0;
  }
}

}  // namespace transfer_fast
