"""What every entry script shares: turn expected failures into one clear line and an exit code."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def run_cli(fn: Callable[[Any], Any], opt: Any, extra: tuple[type[BaseException], ...] = ()) -> int:
    """Runs ``fn(opt)``; a configuration or input error prints ``error: ...`` (no traceback wall) -> 2."""
    try:
        fn(opt)
    except EXPECTED_ERRORS + extra as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
