"""`transfer-fast` / `python -m transfer_fast`: measure, scan, gap, rank, experiment, info, demo.

Conventions shared by every subcommand (also in `--help`): the short options of
`SHORT_OPTIONS` mean the same everywhere; `-` as a --json/--csv file writes to stdout
(the table then goes to stderr, so stdout stays parseable); every output is checked
writable before any measurement starts; the exit status is one of `EXIT_STATUS`.
"""

from __future__ import annotations

import sys
import traceback

from ..errors import TransferFastError
from .parser import EXIT_STATUS, SHORT_OPTIONS, build_parser

__all__ = ["EXIT_STATUS", "SHORT_OPTIONS", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    """Runs one command; returns its exit status (EXIT_STATUS): 0 done, 1 some rows
    failed, 2 bad input or an OS error (one line, naming the file, tensor or value), 3 a
    bug (traceback), 130 interrupted."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (TransferFastError, OSError) as exc:
        if args.debug:
            raise
        print(f"transfer-fast: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("transfer-fast: interrupted", file=sys.stderr)
        return 130
    except Exception:  # not the user's mistake: show everything
        traceback.print_exc()
        print("transfer-fast: this is a bug, please report it with the traceback above "
              "(`transfer-fast info` shows the versions)", file=sys.stderr)
        return 3


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or text}"
    return text.splitlines()[0] if text else type(exc).__name__
