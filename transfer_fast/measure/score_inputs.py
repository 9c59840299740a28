"""Checks of what the transferability scores are given: arrays of numbers, finite, of
the right shape and dtype, labels in range, probabilities that are probabilities, and
state sizes bounded before anything is allocated. Each refusal is one TransferFastError
naming the argument and its shape."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MAX_CLASSES, TransferFastError, check_labels

MAX_STATE_BYTES = 4 * 2**30  # refused before allocation: class Grams, tables, class sums
PROB_SUM_TOL = 1e-3  # rows of source_probs must sum to 1 within this


def as_tensor(x, what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        a = np.asarray(x)
        return torch.from_numpy(a if a.flags.writeable else a.copy())
    except (TypeError, ValueError, RuntimeError) as e:
        raise TransferFastError(f"{what}: not an array of numbers ({e})") from None


def check_finite(t: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(t)
    if bad.any():
        row = int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0])
        raise TransferFastError(f"{what} of shape {tuple(t.shape)} hold {int(bad.sum())} "
                                f"non-finite values (NaN or inf), the first in row {row}")


def features_of(x, device, what: str = "features") -> torch.Tensor:
    """float64 (N, D) on `device` (None: where it is); finite."""
    t = as_tensor(x, what)
    if t.dim() != 2 or t.shape[1] == 0:
        raise TransferFastError(f"{what} of shape {tuple(t.shape)}: expected 2-D (N, D), D >= 1")
    if t.is_complex() or t.dtype == torch.bool:
        raise TransferFastError(f"{what} must be real numbers, got {t.dtype}")
    t = t.to(device=device, dtype=torch.float64)
    check_finite(t, what)
    return t


def labels_of(y, n: int | None, num_classes: int | None, device,
              what: str = "labels") -> torch.Tensor:
    """int64 (N,) on `device` (None: where it is), values in [0, num_classes) (None: in
    [0, MAX_CLASSES)); n=None takes any length. The checks are `errors.check_labels`."""
    labels, _ = check_labels(as_tensor(y, what), num_samples=n, num_classes=num_classes,
                             what=what)
    return labels.to(device) if device is not None else labels


def probs_of(p, n: int, num_source: int | None, device) -> torch.Tensor:
    """(N, C_s) probabilities, float64 if given so, else float32; rows sum to 1."""
    t = as_tensor(p, "source_probs")
    want = f"({n}, {num_source or 'C_s'})"
    if (t.dim() != 2 or t.shape[0] != n or not 1 <= t.shape[1] <= MAX_CLASSES
            or (num_source and t.shape[1] != num_source)):
        raise TransferFastError(f"source_probs of shape {tuple(t.shape)}: expected {want}, "
                                f"C_s <= {MAX_CLASSES}")
    if not t.is_floating_point():
        raise TransferFastError(f"source_probs must be floating point, got {t.dtype}")
    t = t.to(device=device, dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
    check_finite(t, "source_probs")
    if n and bool((t < 0).any()):
        raise TransferFastError(f"source_probs: negative value {float(t.min()):.4g}")
    err = (t.double().sum(1) - 1).abs()
    if n and float(err.max()) > PROB_SUM_TOL:
        row = int(err.argmax())
        raise TransferFastError(f"source_probs row {row} sums to {float(t[row].sum()):.6g}, "
                                "not 1: pass probabilities (softmax), not logits")
    return t


def check_state_bytes(num_classes: int, dim: int, num_source: int, class_gram: bool) -> None:
    per_class = 1 + dim + (dim * dim if class_gram else 0) + 2 * num_source
    need = 8 * (num_classes * per_class + dim * dim)
    if need > MAX_STATE_BYTES:
        hint = (" (per_class_gram=False drops TransRate's C*D^2*8 bytes of class Grams)"
                if class_gram else "")
        raise TransferFastError(f"score statistics for {num_classes} classes x {dim} features, "
                                f"{num_source} source classes need {need / 2**30:.1f} GiB, over "
                                f"MAX_STATE_BYTES={MAX_STATE_BYTES / 2**30:.0f} GiB{hint}")
