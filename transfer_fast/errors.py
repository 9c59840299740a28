"""The one exception type for bad input: the CLI turns it into one line and exit status 2."""


class TransferFastError(ValueError):
    """Input that cannot be measured: names the file, tensor or shape that was wrong."""


def first_few(names, limit: int = 5) -> str:
    """'a', 'b', 'c' and 4 more: keeps messages about long name lists to one line."""
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
