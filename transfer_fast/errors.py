"""The one exception type for bad input: the CLI turns it into one line and exit status 2."""


class TransferFastError(ValueError):
    """Input that cannot be measured: names the file, tensor or shape that was wrong."""


def first_few(names, limit: int = 5) -> str:
    """'a', 'b', 'c' and 4 more: keeps messages about long name lists to one line."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# Class indices above this are refused before anything of size num_classes is made:
# one stray label (1e9) would otherwise ask for per-class tables of that many rows.
MAX_CLASSES = 100_000


def check_labels(labels, *, num_samples: int | None = None, num_classes: int | None = None,
                 what: str = "labels"):
    """The one label check: integer class indices (N,) in [0, num_classes).

    Args:
        labels: a tensor or array of shape (N,).
        num_samples: N, when the labels must match a batch of that many samples.
        num_classes: the number of classes, or None to take max(labels) + 1 (at most
            MAX_CLASSES).
        what: how the message names the labels ("training labels", a file name).
    Returns:
        (labels as an int64 tensor (N,), the number of classes).
    Raises:
        TransferFastError: naming the dtype, shape or value that does not fit.
    """
    import torch

    labels = torch.as_tensor(labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TransferFastError(f"{what} must be integer class indices, got {labels.dtype}")
    n = labels.shape[0] if labels.dim() == 1 else None
    if labels.dim() != 1 or (num_samples is not None and n != num_samples):
        want = num_samples if num_samples is not None else "N"
        raise TransferFastError(f"{what} have shape {tuple(labels.shape)}: expected ({want},)")
    if n == 0:
        return labels.long(), num_classes or 1
    low, high = (int(v) for v in torch.aminmax(labels))
    limit = num_classes if num_classes is not None else MAX_CLASSES
    if low < 0 or high >= limit:
        bad = low if low < 0 else high
        bound = (f"num_classes={num_classes}" if num_classes is not None
                 else f"the limit of {MAX_CLASSES} classes")
        raise TransferFastError(f"{what}: value {bad} is outside [0, {bound})")
    return labels.long(), num_classes if num_classes is not None else high + 1
