"""Data of an experiment: sources, controlled domain shifts, train/validation splits.

A source is `digits:A-B` (scikit-learn's bundled 8x8 digits of classes A..B, labels
renumbered from 0; no download) or a path that `load_dataset` reads (a folder of
class subfolders or an .npz). Shifts act on normalised images, (x - 0.5) / 0.225.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from ..errors import TransferFastError
from ..io.datasets import MEAN, STD, load_dataset
from .experiment_config import MAX_BLUR_SIGMA, MAX_NOISE_STRENGTH

_DIGITS = re.compile(r"digits:(\d)-(\d)$")


def load_source(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x float32 (N, C, H, W) normalised, y int64 (N,)) of a source spec."""
    match = _DIGITS.match(spec)
    if match is None:
        data = load_dataset(spec)
        return data.x, data.y
    low, high = int(match[1]), int(match[2])
    if low > high:
        raise TransferFastError(f"{spec}: the first class must not exceed the last")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise TransferFastError(f"{spec}: the digits data ships with scikit-learn, which is "
                                "not installed: pip install scikit-learn") from exc

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(digits.target)
    keep = (y >= low) & (y <= high)
    return (x[keep] - MEAN) / STD, y[keep] - low


def digits_split(classes: range, seed: int = 0, val_fraction: float = 0.2):
    """(train, validation) pairs of the bundled digits of `classes`, labels from 0."""
    return split(*load_source(f"digits:{classes.start}-{classes.stop - 1}"), val_fraction, seed)


def _blur(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Gaussian blur with sigma = strength pixels (kernel of 2 * ceil(2 sigma) + 1)."""
    radius = max(1, int(2 * strength + 0.999))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / strength) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    # Replicate padding: a blurred constant image stays the same constant.
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def apply_shift(x: torch.Tensor, shift: str, strength: float = 1.0,
                seed: int = 0) -> torch.Tensor:
    """A controlled domain shift of normalised images x (N, C, H, W).

    invert: 1 - pixel (the negative); transpose: swap rows and columns; blur: a
    Gaussian of sigma = strength pixels; noise: Gaussian noise of std 0.25 x strength
    in pixel units (fixed by `seed`); none: x itself.
    """
    limit = {"blur": MAX_BLUR_SIGMA, "noise": MAX_NOISE_STRENGTH}.get(shift, math.inf)
    if not (0 < strength <= limit and math.isfinite(strength)):  # the kernel's size
        raise TransferFastError(f"{shift} strength must be in (0, {limit:g}], got {strength!r}")
    if shift == "none":
        return x
    if shift == "invert":  # (1 - p - 0.5) / 0.225 = -(p - 0.5) / 0.225
        return (1 - 2 * MEAN) / STD - x
    if shift == "transpose":
        return x.transpose(-1, -2).contiguous()
    if shift == "blur":
        return _blur(x, strength)
    if shift == "noise":
        g = torch.Generator().manual_seed(seed)
        return x + torch.randn(x.shape, generator=g) * (0.25 * strength / STD)
    raise TransferFastError(f"unknown shift {shift!r}")


def split(x: torch.Tensor, y: torch.Tensor, val_fraction: float, seed: int = 0):
    """(train pool, validation) pairs: a fixed random split, the same for every run."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(len(x) * val_fraction)))
    val, pool = order[:n_val], order[n_val:]
    return (x[pool], y[pool]), (x[val], y[val])


def subset(pool: tuple[torch.Tensor, torch.Tensor], n: int, seed: int):
    """n training samples drawn from the pool without replacement (fixed by seed).

    The draw is stratified by class where it can be, so that a small N still sees
    every class: per class its share of n, the remainder to the largest classes.
    """
    x, y = pool
    if n > len(x):
        raise TransferFastError(f"data amount {n} exceeds the {len(x)} training samples")
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(y, return_counts=True)
    share = (counts.double() * n / len(y)).floor().long()
    for i in torch.argsort(counts, descending=True)[: n - int(share.sum())]:
        share[i] += 1
    picked = []
    for c, k in zip(classes.tolist(), share.tolist()):
        members = torch.nonzero(y == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:k]])
    idx = torch.cat(picked)
    idx = idx[torch.randperm(len(idx), generator=g)]
    return x[idx], y[idx]
