"""One exit convention for every command-line tool: a bad input prints `error: …` and exits 2, no traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable

# Every error the project raises for bad input derives from one of these (ConfigError, LoraFileError, WeightsError …);
# OSError covers missing, unreadable or unwritable paths.
USER_ERRORS = (ValueError, OSError)


def exits_on_user_error(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a CLI `main`: a user error becomes one line on stderr and exit status 2."""

    @functools.wraps(main)
    def guarded(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as err:
            print(f"error: {err}", file=sys.stderr)
            return 2

    return guarded
