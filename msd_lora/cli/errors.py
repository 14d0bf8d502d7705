"""One exit convention for every command-line tool.

- bad input (`msd_lora.errors.MsdLoraError`, or an output path the system refuses: no permission, no space, a
  read-only disk) prints `error: …` as one line and exits 2; `--debug` prints its traceback too;
- Ctrl-C exits 130 (`interrupted`);
- anything else is a bug: it keeps its traceback (exit 1).
"""
from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from msd_lora.errors import MsdLoraError

DEBUG_FLAG = "--debug"
# OSErrors that say something about the user's machine or paths, never about our code
ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS}
EXIT_USER_ERROR, EXIT_INTERRUPTED = 2, 130


def is_user_error(err: BaseException) -> bool:
    return isinstance(err, MsdLoraError) or (isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS)


def one_line(err: BaseException) -> str:
    """The message on one line: continuation lines are joined after a ':' by a space, else by '; '."""
    text = ""
    for line in (part.strip() for part in str(err).splitlines()):
        if line:
            text += (" " if text.endswith(":") else "; ") + line if text else line
    return text or type(err).__name__


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """List --debug in a tool's --help (the wrapper below takes it off the command line)."""
    parser.add_argument(DEBUG_FLAG, action="store_true", help="on an input error, print its traceback too")


def exits_on_user_error(main: Callable[[list[str]], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a CLI `main(argv)` in the exit convention; `--debug` (or MSD_LORA_DEBUG=1) is handled here."""

    @functools.wraps(main)
    def guarded(argv: Sequence[str] | None = None) -> int:
        args = list(sys.argv[1:] if argv is None else argv)
        debug = DEBUG_FLAG in args or os.environ.get("MSD_LORA_DEBUG", "") not in ("", "0")
        try:
            return main([a for a in args if a != DEBUG_FLAG])
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as err:
            if not is_user_error(err):
                raise
            if debug:
                traceback.print_exc()
            print(f"error: {one_line(err)}", file=sys.stderr)
            return EXIT_USER_ERROR

    return guarded
