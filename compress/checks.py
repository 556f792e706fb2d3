"""Value checks for typed configs: one-line `CompressError("<key>: must be <expected>, got <value>")`.

Hydra checks each value's type while composing; these check ranges and choices in the configs'
`__post_init__`: compress/config.py calls them with the key's full name, every method's options through
`MethodOptions`' `count` / `number` / `choice` / `flag` / `check` (compress/methods/base.py), which add
the `method.` prefix. This is the one way an option is checked. The offending value is shown shortened,
so a hostile one still makes one short line.
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


# Anything a user string may make us build is bounded; these bounds are far beyond any real run.
MAX_COUNT = 10_000_000          # images, epochs x batches, repeats ...


def fail(key: str, message: str) -> None:
    """Raise `CompressError("<key>: <message>")`: for a refusal that is not a range or a choice."""
    raise CompressError(f"{key}: {message}")


def int_in(key: str, value: Any, low: int, high: int = MAX_COUNT, allow_none: bool = False) -> None:
    """`value` is an integer in [low, high] (or None, with `allow_none`)."""
    require((value is None and allow_none) or is_count(value, low, high), key,
            f"{'null or ' if allow_none else ''}an integer in [{low}, {high}]", value)


def number_in(key: str, value: Any, low: float, high: float, *, low_open: bool = False, high_open: bool = False,
              allow_none: bool = False) -> None:
    """`value` is a finite number in the interval (closed unless `low_open` / `high_open`), or None."""
    ok = is_number(value) and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    require((value is None and allow_none) or ok, key, f"{'null or ' if allow_none else ''}a number in {span}", value)


def flag(key: str, value: Any) -> None:
    require(isinstance(value, bool), key, "true or false", value)


def unknown_key(node, prefix: str = "") -> str | None:
    """The first key of a composed DictConfig that its typed schema does not have, as a one-line message
    naming the closest known keys ("" prefix: the root). Hydra's `+key=value` adds keys the dataclasses
    lack, and `OmegaConf.to_object` would drop them silently: a typo such as `+schedule.epoch=3` would
    then run the default. Nodes typed as plain dicts take any key."""
    import dataclasses
    import difflib

    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(node)
    fields = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        path = f"{prefix}{key}"
        if fields is not None and key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=3, cutoff=0.6)
            hint = f" (did you mean: {', '.join(prefix + c for c in close)}?)" if close else ""
            return f"{path}: unknown config option{hint}"
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not (child._is_missing() or child._is_none()):
            found = unknown_key(child, path + ".")
            if found:
                return found
    return None
