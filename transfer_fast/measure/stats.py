"""Streaming feature statistics: per channel (and per class) moments, full covariances.

Every partial result is a (count, mean, centred sum of squares) triple in float64,
and partial results are merged with the parallel update of Chan, Golub and LeVeque:
unlike running sums of x and x^2, it keeps the variance of data with a large mean
and a small spread (mean 1e3, std 1) accurate to float64 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import ops
from ..errors import TransferFastError, check_labels


@dataclass
class ChannelStats:
    """Per class and channel moments of activations; one class when no labels were given.

    class_count: float64 (K,) elements per channel (samples x positions);
    class_mean, class_m2: float64 (K, C) mean and centred sum of squares.
    """

    class_count: torch.Tensor
    class_mean: torch.Tensor
    class_m2: torch.Tensor

    @property
    def num_classes(self) -> int:
        return self.class_count.shape[0]

    @property
    def channels(self) -> int:
        return self.class_mean.shape[1]

    def _total(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n_k = self.class_count.unsqueeze(1)
        n = n_k.sum(0)
        mean = (n_k * self.class_mean).sum(0) / n.clamp_min(1)
        spread = self.class_mean - mean
        m2 = self.class_m2.sum(0) + (n_k * spread * spread).sum(0)
        return n.squeeze(0), mean, m2

    @property
    def count(self) -> float:
        """Elements per channel over all classes."""
        return float(self.class_count.sum())

    @property
    def mean(self) -> torch.Tensor:
        """float64 (C,) over all classes."""
        return self._total()[1]

    @property
    def m2(self) -> torch.Tensor:
        """float64 (C,) centred sum of squares over all classes."""
        return self._total()[2]

    def variance(self, unbiased: bool = False) -> torch.Tensor:
        """float64 (C,) variance over all classes."""
        n, _, m2 = self._total()
        return m2 / max(float(n) - (1 if unbiased else 0), 1.0)

    def class_variance(self, unbiased: bool = False) -> torch.Tensor:
        """float64 (K, C); NaN for classes with too few elements."""
        denom = self.class_count.unsqueeze(1) - (1 if unbiased else 0)
        return torch.where(denom > 0, self.class_m2 / denom.clamp_min(1), float("nan"))

    @staticmethod
    def combine(parts: list[ChannelStats]) -> ChannelStats:
        """Statistics of many parts at once (e.g. the batches of a stream), float64.

        The P-part form of Chan's update: means weighted by counts, then the parts'
        m2 plus their counts times the squared distance of their means to the merged
        mean; every term is non-negative, so nothing cancels.
        """
        if len(parts) == 1:
            return parts[0]
        k = max(p.num_classes for p in parts)
        device = parts[0].class_mean.device
        parts = [p.to(device).padded(k) for p in parts]
        n_p = torch.stack([p.class_count for p in parts]).unsqueeze(2)  # (P, K, 1)
        mean_p = torch.stack([p.class_mean for p in parts])  # (P, K, C)
        n = n_p.sum(0)
        mean = (n_p * mean_p).sum(0) / n.clamp_min(1)
        spread = mean_p - mean
        m2 = torch.stack([p.class_m2 for p in parts]).sum(0) + (n_p * spread * spread).sum(0)
        return ChannelStats(n.squeeze(1), mean, m2)

    def padded(self, num_classes: int) -> ChannelStats:
        """The same statistics with empty classes appended up to num_classes."""
        extra = num_classes - self.num_classes
        if extra <= 0:
            return self
        pad = self.class_mean.new_zeros(extra, self.channels)
        return ChannelStats(torch.cat([self.class_count, self.class_count.new_zeros(extra)]),
                            torch.cat([self.class_mean, pad]), torch.cat([self.class_m2, pad]))

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Statistics of both parts together (Chan's parallel update, float64)."""
        if other.channels != self.channels:
            raise TransferFastError(f"cannot merge statistics of {self.channels} and "
                                    f"{other.channels} channels")
        return ChannelStats.combine([self, other])

    def to(self, device) -> ChannelStats:
        return ChannelStats(self.class_count.to(device), self.class_mean.to(device),
                            self.class_m2.to(device))


def channel_stats(x: torch.Tensor, labels=None, num_classes: int | None = None, *,
                  channels_first: bool = False, backend: str = "auto",
                  shift: torch.Tensor | None = None) -> ChannelStats:
    """Per channel (and per class x channel) count, mean, centred sum of squares; one pass.

    Args:
        x: activations (N, C, H, W), (N, C, ...), (N, C) or (N, L, C) (with
            channels_first: (N, C, L)), float32/float16/bfloat16/float64, read in its own
            layout (channels_last included) without a permuted copy.
        labels: integer class indices (N,) in [0, num_classes), or None: one class.
        num_classes: K, the number of classes; None defaults to max(labels) + 1. Without
            labels it must be None or 1.
        channels_first: read a 3-D x as (N, C, L) (a BatchNorm1d input) instead of
            (N, L, C).
        backend: "auto" (the compiled kernel of x's device, else pure torch),
            "cpu"/"cuda" (that kernel, or an error), "torch" (pure torch).
        shift: float64 (C,) values near the channel means that the sums are taken about
            (x - shift keeps float64 exact for a large mean); None: each channel's first
            element.
    Returns:
        ChannelStats on x's device: class_count float64 (K,) elements per channel
        (samples x positions), class_mean and class_m2 float64 (K, C) mean and centred
        sum of squares; K = 1 without labels; empty classes are zeros.
    Raises:
        TransferFastError: x of fewer than two dimensions; labels that are not integers
            of shape (N,) in range (`check_labels`); num_classes other than 1 without
            labels; an unknown backend, or one that cannot reduce tensors on x's device.
    """
    if x.dim() < 2:
        raise TransferFastError(f"activations of shape {tuple(x.shape)}: expected (N, C), "
                                "(N, L, C) or (N, C, H, W)")
    k = 1
    if labels is not None:
        labels, k = check_labels(labels, num_samples=x.shape[0], num_classes=num_classes)
    elif num_classes not in (None, 1):
        raise TransferFastError(f"num_classes={num_classes} needs labels")
    count, mean, m2 = ops.channel_stats(x, labels, k, shift=shift, channels_first=channels_first,
                                        backend=backend)
    return ChannelStats(count, mean, m2)


@dataclass
class CovarianceStats:
    """Streaming full covariance of (N, C) features: count, mean (C,), comoment (C, C), float64."""

    count: float
    mean: torch.Tensor
    comoment: torch.Tensor

    @classmethod
    def empty(cls, channels: int, device=None) -> CovarianceStats:
        z = torch.zeros(channels, dtype=torch.float64, device=device)
        return cls(0.0, z, torch.zeros(channels, channels, dtype=torch.float64, device=device))

    def add_batch(self, x: torch.Tensor) -> CovarianceStats:
        """Accumulates a batch (N, C) in place: the batch's gram about its own mean plus
        Chan's correction, added into the (C, C) comoment without (C, C) temporaries."""
        if x.dim() != 2 or x.shape[1] != self.mean.shape[0]:
            raise TransferFastError(f"covariance of {self.mean.shape[0]} features: expected "
                                    f"(N, {self.mean.shape[0]}), got {tuple(x.shape)}")
        x = x.detach().to(self.mean.device, torch.float64)
        n_b = float(x.shape[0])
        if n_b == 0:
            return self
        mean_b = x.mean(0)
        n = self.count + n_b
        delta = mean_b - self.mean
        # Chan's correction n_a n_b / n (delta delta^T) as one more row of the batch, so the
        # (C, C) comoment is read and written once per batch, by a single gemm.
        rows = torch.cat([x - mean_b, delta.unsqueeze(0) * math.sqrt(self.count * n_b / n)])
        self.comoment.addmm_(rows.T, rows)
        self.mean.add_(delta, alpha=n_b / n)
        self.count = n
        return self

    def merge(self, other: CovarianceStats) -> CovarianceStats:
        if other.mean.shape != self.mean.shape:
            raise TransferFastError(f"cannot merge covariances of {self.mean.shape[0]} and "
                                    f"{other.mean.shape[0]} features")
        n = self.count + other.count
        if n == 0:
            return self
        w = other.count / n
        delta = other.mean.to(self.mean.device) - self.mean
        mean = self.mean + delta * w
        comoment = (self.comoment + other.comoment.to(self.mean.device)
                    + torch.outer(delta, delta) * (self.count * w))
        return CovarianceStats(n, mean, comoment)

    def covariance(self, unbiased: bool = True) -> torch.Tensor:
        """float64 (C, C)."""
        return self.comoment / max(self.count - (1 if unbiased else 0), 1.0)

    def gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, covariance) of the Gaussian fit, for frechet_distance (copies)."""
        return self.mean.clone(), self.covariance()
