"""The one place that decides which device work runs on."""

from __future__ import annotations

import torch

from ..errors import TransferFastError


def resolve_device(name: str | torch.device | None = "auto", *, what: str = "device"
                   ) -> torch.device:
    """A torch.device from a user's choice.

    Args:
        name: None or 'auto' (the current CUDA device when a GPU is present, else the
            CPU), 'cpu', 'cuda', 'cuda:1', or a torch.device.
        what: how the message names the option (e.g. '--device', 'experiment.device').
    Returns:
        The device.
    Raises:
        TransferFastError: a device that does not parse, or CUDA without a GPU.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise TransferFastError(f"{what} {name!r}: not a device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TransferFastError(f"{what} {name!r}: no GPU is available")
    if device.type == "cuda" and device.index is not None \
            and device.index >= torch.cuda.device_count():
        raise TransferFastError(f"{what} {name!r}: only {torch.cuda.device_count()} GPU(s)")
    return device
