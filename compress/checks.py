"""Value checks for typed configs: one-line `CompressError("<key>: must be <expected>, got <value>")`.

Hydra checks each value's type while composing; these check ranges and choices in the configs'
`__post_init__` (compress/config.py, and every method's options through `MethodOptions.check`). The
offending value is shown shortened, so a hostile one still makes one short line.
"""
from __future__ import annotations

import math
import reprlib
from typing import Any

from compress import CompressError


def is_number(value: Any) -> bool:
    """A finite int or float. Not a bool: Python counts True as 1, a config never means it as one."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)  # isfinite overflows on ints past float range


def is_count(value: Any, minimum: int = 1, maximum: float = math.inf) -> bool:
    """An int (not a bool) in [minimum, maximum]."""
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum


def require(ok: bool, key: str, expected: str, value: Any) -> None:
    """Raise `CompressError("<key>: must be <expected>, got <value>")` unless `ok`."""
    if not ok:
        raise CompressError(f"{key}: must be {expected}, got {reprlib.repr(value)}")


def require_choice(value: Any, key: str, choices: tuple[str, ...]) -> None:
    require(isinstance(value, str) and value in choices, key, f"one of {', '.join(choices)}", value)
