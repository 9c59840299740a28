"""One plain sentence for a checkpoint whose unpickling would run code.

torch's weights_only refusal is a paragraph that advises turning the protection
off; users of this package get the file, the verdict and the callable instead.
"""

from __future__ import annotations

import re
from pathlib import Path

# torch names the callable as "GLOBAL module.name" in every wording it has used
# ("Unsupported global: GLOBAL x.y was not an allowed global", "Trying to load
# unsupported GLOBAL x.y whose module x is blocked").
_GLOBAL = re.compile(r"GLOBAL\s+([A-Za-z_][\w.]*)")
_REDUCE = re.compile(r"reduce for unrecognized function\s+`?([\w.<>]+)")
# os.system is pickled under its implementation module's name.
_ALIASES = {"posix": "os", "nt": "os"}


def unsafe_global(exc: BaseException) -> str | None:
    """The callable a refused pickle wanted to run (e.g. 'os.system'), or None when the
    error is not a weights_only refusal of code."""
    text = str(exc)
    match = _GLOBAL.search(text) or _REDUCE.search(text)
    if match is None:
        return None
    module, _, name = match[1].rpartition(".")
    return f"{_ALIASES.get(module, module)}.{name}" if module else name


def unsafe_pickle_message(path: str | Path, exc: BaseException) -> str:
    """'θA.pt: refused: loading it would run code (os.system)': one sentence, no advice
    to disable weights_only."""
    name = unsafe_global(exc)
    return f"{path}: refused: loading it would run code" + (f" ({name})" if name else "")
