"""Domain gap and diversity of a downstream data set as seen by a pre-trained network.

- bn_gap: per BatchNorm layer, the distance between the diagonal Gaussian of the
  layer's running statistics (what pre-training saw) and that of the downstream
  activations at the layer's input; needs no pre-training data (PAPER.md, section 2).
- intraclass_variance: mean within-class variance of the penultimate features,
  normalised by their total variance; data_amount: the number of samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import TransferFastError
from ..io.files import write_json
from .feature_state import FeatureState
from .features import FeatureStats, batchnorm_layers
from .stats import ChannelStats

GAP_METRICS = ("w2", "skl")


def _w2(mu_a, var_a, mu_b, var_b) -> torch.Tensor:
    """Per channel squared 2-Wasserstein distance between 1-D Gaussians."""
    return (mu_a - mu_b) ** 2 + (var_a.sqrt() - var_b.sqrt()) ** 2


def _skl(mu_a, var_a, mu_b, var_b) -> torch.Tensor:
    """Per channel symmetric KL divergence KL(a||b) + KL(b||a) between 1-D Gaussians."""
    return ((var_a - var_b) ** 2 + (mu_a - mu_b) ** 2 * (var_a + var_b)) / (2 * var_a * var_b)


@dataclass
class BNGapResult:
    """Per BatchNorm layer gap, in network order, and their mean (the data set's G).

    w2: sqrt of the channel-mean squared 2-Wasserstein distance (same units as the
    activations); skl: channel-mean symmetric KL divergence.
    """

    metric: str
    layers: list[str]
    values: list[float]
    channels: list[int]
    samples: int
    mean: float = field(init=False)

    def __post_init__(self):
        self.mean = sum(self.values) / len(self.values) if self.values else math.nan

    def to_dict(self) -> dict:
        return asdict(self)

    def format_table(self) -> str:
        width = max([len("layer"), *map(len, self.layers)])
        lines = [f"{'layer':<{width}}  {'channels':>8}  {'gap (' + self.metric + ')':>12}"]
        lines += [f"{n:<{width}}  {c:>8}  {v:>12.5g}"
                  for n, c, v in zip(self.layers, self.channels, self.values)]
        lines.append(f"{'mean':<{width}}  {'':>8}  {self.mean:>12.5g}")
        return "\n".join(lines)

    def write_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Bars of the gap per BN layer in network order, the mean as a dashed line."""
        # The one allowed upward import (only inside `plot`): figures live in report/.
        from ..report.figures import bn_gap_figure, save_figure
        return save_figure(bn_gap_figure(self, title=title), path)


def bn_gap(model: nn.Module, data: Iterable | FeatureStats | FeatureState, *, metric: str = "w2",
           backend: str = "auto", progress: bool = True) -> BNGapResult:
    """Gap between each BN layer's running statistics and the data's activations there.

    Per channel, the Gaussian of the layer's running_mean and running_var (what
    pre-training saw) is compared with the mean and unbiased variance of the data's
    activations at the layer's input, all in float64. Variances get the layer's eps, as
    in the forward pass.

    Args:
        model: the pre-trained network; its BatchNorm layers that track running
            statistics are measured, in network order.
        data: batches x or (x, y) (a DataLoader, a list), run through `model` in eval
            mode on its parameters' device (y is ignored), or FeatureStats (or a
            FeatureState) already accumulated on this model, with its BN layers watched.
        metric: "w2" (default): sqrt of the channel-mean squared 2-Wasserstein distance,
            in the activations' units; "skl": channel-mean symmetric KL divergence.
        backend: the channel_stats backend used to accumulate `data`: "auto", "cpu",
            "cuda" or "torch"; unused for FeatureStats/FeatureState.
        progress: show a progress bar while `data` is accumulated.
    Returns:
        BNGapResult: per BN layer `layers` (names), `values` (the gap) and `channels`;
        `samples` (the data's), `mean` (the data set's G: the mean over layers) and
        `metric`.
    Raises:
        TransferFastError: an unknown metric; a model without BatchNorm layers that
            track running statistics; a BN layer no activation reached (or that the
            statistics lack), or whose channel count differs from its statistics'; while
            `data` is accumulated: a BN input that is not a tensor (N, C, ...),
            activations with NaN or Inf (on a GPU, possibly found when the statistics
            are read), or an unknown backend or one that cannot run on the model's
            device.
    """
    if metric not in GAP_METRICS:
        raise TransferFastError(f"metric must be one of {GAP_METRICS}, got {metric!r}")
    names = batchnorm_layers(model)
    if not names:
        raise TransferFastError(
            f"{type(model).__name__} has no BatchNorm layer with running statistics, so "
            "bn_gap cannot be measured; use frechet_distance on the penultimate features "
            "instead (FeatureStats on a pre-training sample and on the downstream data)")
    if isinstance(data, FeatureStats | FeatureState):
        stats = data
    else:
        with FeatureStats(model, names, penultimate=False, backend=backend) as stats:
            stats.accumulate(data, labels=False, progress=progress, desc="BN statistics")
    missing = [n for n in names if n not in stats.layers]
    if missing:
        raise TransferFastError(f"no activations reached BatchNorm layer {missing[0]!r}")
    modules = dict(model.named_modules())
    distance = _w2 if metric == "w2" else _skl
    values, channels = [], []
    for name in names:
        bn, seen = modules[name], stats.layers[name]
        mu_a = bn.running_mean.detach().to(torch.float64).cpu()
        var_a = bn.running_var.detach().to(torch.float64).cpu() + bn.eps
        if seen.channels != mu_a.numel():
            raise TransferFastError(f"BatchNorm layer {name!r} has {mu_a.numel()} channels but "
                                    f"its statistics have {seen.channels}")
        mu_b, var_b = seen.mean.cpu(), seen.variance(unbiased=True).cpu() + bn.eps
        per_channel = distance(mu_a, var_a, mu_b, var_b)
        value = per_channel.mean()
        values.append(float(value.sqrt() if metric == "w2" else value))
        channels.append(mu_a.numel())
    return BNGapResult(metric, names, values, channels, stats.samples)


@dataclass
class IntraclassVariance:
    """D: the mean over classes of the trace of the class covariance, over the total trace.

    normalised: D as used in the regression; raw: the unnormalised mean class trace;
    domain_width: the trace of the total covariance; per_class: trace per class.
    """

    normalised: float
    raw: float
    domain_width: float
    num_classes: int
    per_class: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def intraclass_variance(stats: ChannelStats | FeatureStats | FeatureState) -> IntraclassVariance:
    """Within-class diversity of (penultimate) features with per-class statistics.

    Classes with fewer than two samples have no variance and are left out of the mean.

    Args:
        stats: ChannelStats accumulated with labels (class_count float64 (K,),
            class_mean and class_m2 float64 (K, C)), or FeatureStats/FeatureState whose
            penultimate features (`features`) are used.
    Returns:
        IntraclassVariance: `normalised` (D: the mean over the classes with two samples
        or more of the trace of the class covariance, over the trace of the total
        covariance), `raw` (that mean), `domain_width` (the total trace), `num_classes`
        (the classes in the mean) and `per_class` (the trace of every class, left-out
        ones included: 0 for one sample, NaN for none). Variances divide by the count.
    Raises:
        TransferFastError: statistics of fewer than two classes (accumulated without
            labels); no class with two samples or more; features of zero total variance;
            FeatureStats/FeatureState without penultimate features; for FeatureStats on
            a GPU, a last batch found to hold NaN or Inf when its statistics are read.
    """
    if isinstance(stats, FeatureStats | FeatureState):
        stats = stats.features
    if stats.num_classes < 2:
        raise TransferFastError("intraclass variance needs per-class statistics: accumulate "
                                "with labels (at least two classes)")
    per_class = stats.class_variance().sum(1)
    seen = stats.class_count > 1
    if not bool(seen.any()):
        raise TransferFastError("intraclass variance: no class has two samples or more")
    raw = float(per_class[seen].mean())
    width = float(stats.variance().sum())
    if width <= 0:
        raise TransferFastError("intraclass variance: the features have zero total variance")
    return IntraclassVariance(raw / width, raw, width, int(seen.sum()),
                              [float(v) for v in per_class])


def data_amount(data) -> int:
    """N: the number of training samples (of FeatureStats, a Dataset or anything with len).

    Args:
        data: FeatureStats or FeatureState (their `samples`), or anything with len() (a
            Dataset; len() of a DataLoader is its number of batches, so pass its
            dataset).
    Returns:
        The number of samples.
    Raises:
        TransferFastError: `data` has no len() (an iterable-style DataLoader, a
            generator); for FeatureStats on a GPU, a last batch found to hold NaN or Inf
            when its statistics are read.
    """
    if isinstance(data, FeatureStats | FeatureState):
        return data.samples
    try:
        return len(data)
    except TypeError as exc:
        raise TransferFastError(f"cannot count the samples of a {type(data).__name__}") from exc
