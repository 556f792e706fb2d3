"""Rate specs: how many output channels each prunable layer loses.

Three forms of `method.compress_rate` (fraction of channels to REMOVE, in [0, 1]):
- a float: every prunable channel group;
- a dict of layer-name glob patterns -> float (`{"layer3.*.conv1": 0.5, "*": 0.2}`), matched with
  fnmatch against the names of the convolutions of a group; the first pattern (in the dict's order) that
  matches any of them gives the group's rate; unmatched groups are not pruned;
- the HRank/CFDP per-architecture list notation, as a string: `"[0.]+[0.18]*29"`, parsed by the tiny
  grammar below (never evaluated) and mapped to layers by `compress.prune.layouts`.
The number of channels a group keeps is `keep_count(channels, rate)`.

Everything built from a user's value is bounded before it is built (the text, each repeat count, the
expanded list, the number of patterns), and the grammar's regular expressions run in linear time, so no
rate can hang a run or exhaust memory: the largest architecture here takes a few hundred rates.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Iterable

from compress import CompressError
from compress.models.introspect import matches

KEY = "method.compress_rate"
MAX_TEXT = 10_000  # characters of a rate string, and of a layer-name pattern
MAX_RATES = 10_000  # rates in an expanded list (also the largest repeat count)
MAX_PATTERNS = 1_000  # layer-name patterns in a dict

# `compress_rate: paper`: the rate lists the HRank/CFDP tables compare at, per architecture.
PAPER_RATES = {
    "resnet56": "[0.]+[0.18]*29",
    "vgg16_bn": "[0.21]*7+[0.75]*5",
    "googlenet": "[0.3]+[0.6]*2+[0.7]*5+[0.8]*2",
    "resnet50_imagenet": "[0.]+[0.1]*3+[0.35]*16",
}


def paper_rate(arch: str, key: str = KEY) -> str:
    if arch not in PAPER_RATES:
        raise CompressError(f"{key}: 'paper' names the CFDP/HRank tables' rates, which exist for "
                            f"{', '.join(PAPER_RATES)} only, not {arch}; give a rate")
    return PAPER_RATES[arch]


# list   := term ('+' term)*
# term   := '[' number (',' number)* ']' ('*' int)?
# No two adjacent parts of these patterns can match the same characters, so matching is linear in the text
# (the earlier `\[\s*(.*?)\s*\]` form took minutes on a bracket followed by 8,000 spaces).
_TERM = re.compile(r"\[([^\[\]]*)\]\s*(?:\*\s*(\d+))?")
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def parse_rate_list(text: str, key: str = KEY) -> list[float]:
    """Parse `"[0.]+[0.18]*29"`-style notation into a list of floats (here: 30 values).

    Grammar: terms joined by '+'; a term is a bracketed, comma-separated list of numbers, optionally
    repeated with '*<int>'. Whitespace is ignored. Every rate must lie in [0, 1]. At most MAX_TEXT
    characters and MAX_RATES rates once expanded, checked before anything is expanded.
    """
    if not isinstance(text, str) or not text.strip():
        raise CompressError(f"{key}: expected a rate list such as '[0.]+[0.18]*29', got {text!r}")
    _check_length(text, key)
    terms = [_parse_term(part.strip(), text, key) for part in text.split("+")]
    total = sum(len(items) * repeat for items, repeat in terms)
    if total > MAX_RATES:
        raise CompressError(f"{key}: the rate list expands to {total} rates; at most {MAX_RATES} are allowed")
    rates = [rate for items, repeat in terms for rate in items * repeat]
    for rate in rates:
        check_rate(rate, key)
    return rates


def _check_length(text: str, key: str) -> None:
    if len(text) > MAX_TEXT:
        raise CompressError(f"{key}: {len(text)} characters; at most {MAX_TEXT} are allowed")


def _parse_term(part: str, text: str, key: str) -> tuple[list[float], int]:
    """One '[numbers]*count' term -> (its numbers, its repeat count), the count bounded before use."""
    match = _TERM.fullmatch(part)
    if match is None:
        raise CompressError(f"{key}: cannot parse '{_short(part)}' in '{_short(text)}' (expected '[numbers]' or "
                            f"'[numbers]*count')")
    items = [item.strip() for item in match.group(1).split(",")]
    if not all(_NUMBER.fullmatch(item) for item in items):
        raise CompressError(f"{key}: '{_short(part)}' must hold comma-separated numbers")
    # The count's digits are measured before int() reads them: Python refuses int() of thousands of digits.
    digits = "1" if match.group(2) is None else (match.group(2).lstrip("0") or "0")
    if len(digits) > len(str(MAX_RATES)) or int(digits) > MAX_RATES:
        raise CompressError(f"{key}: '{_short(part)}' repeats more than {MAX_RATES} times")
    repeat = int(digits)
    if repeat == 0:
        raise CompressError(f"{key}: '{_short(part)}' repeats zero times")
    return [float(item) for item in items], repeat


def _short(text: str, limit: int = 60) -> str:
    """`text` cut for an error line (a user's string may be thousands of characters)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_rate(rate: Any, key: str = KEY) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise CompressError(f"{key}: rates must be numbers in [0, 1], got {_short(repr(rate))}")
    return float(rate)


def keep_count(channels: int, rate: float) -> int:
    """Channels kept when `rate` of `channels` is removed: int(channels * (1 - rate)), never fewer than 1.

    Plain float truncation exactly as HRank's code computes widths, float error included: 1 - 0.8 is
    0.19999999999999996, so 320 channels at rate 0.8 keep 63, not 64 (GoogLeNet a5 in the papers)."""
    return max(1, min(channels, int(channels * (1.0 - rate))))


def round_up(count: int, current: int, unit: int) -> int:
    """`count` channels rounded up to a multiple of `unit` (method.round_to, as Torch-Pruning's round_to),
    never more than the `current` width: a group narrower than `unit` keeps all it has."""
    return min(current, -(-count // unit) * unit)


def round_down(count: int, unit: int) -> int:
    """`count` rounded down to a multiple of `unit` (0 when under one unit)."""
    return count // unit * unit


@dataclass(frozen=True)
class RateSpec:
    """A parsed `compress_rate`: exactly one of `uniform`, `patterns`, `listed` is set."""

    uniform: float | None = None
    patterns: tuple[tuple[str, float], ...] | None = None
    listed: tuple[float, ...] | None = None
    text: str = ""

    @classmethod
    def parse(cls, value: Any, key: str = KEY) -> "RateSpec":
        if isinstance(value, RateSpec):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls(uniform=check_rate(value, key), text=str(value))
        if isinstance(value, str):
            stripped = value.strip()
            _check_length(stripped, key)
            if _NUMBER.fullmatch(stripped):
                return cls(uniform=check_rate(float(stripped), key), text=stripped)
            return cls(listed=tuple(parse_rate_list(stripped, key)), text=stripped)
        if isinstance(value, Mapping):  # a dict, or OmegaConf's DictConfig
            return cls(patterns=_parse_patterns(value, key), text=str(dict(value)))
        if isinstance(value, Sequence):  # a list, or OmegaConf's ListConfig (str is handled above)
            if not value:
                raise CompressError(f"{key}: the rate list is empty")
            if len(value) > MAX_RATES:
                raise CompressError(f"{key}: {len(value)} rates; at most {MAX_RATES} are allowed")
            rates = tuple(check_rate(rate, key) for rate in value)
            return cls(listed=rates, text=str(list(rates)))
        raise CompressError(
            f"{key}: expected a float, a dict of layer patterns, or a list such as '[0.]+[0.18]*29'; got "
            f"{_short(repr(value))}"
        )

    def pattern_rate(self, layer_names: Iterable[str]) -> float | None:
        """Rate of the first pattern matching any of `layer_names` (None: no pattern matches)."""
        names = list(layer_names)
        for pattern, rate in self.patterns or ():
            if any(matches(name, (pattern,)) for name in names):
                return rate
        return None


def _parse_patterns(value: Mapping, key: str) -> tuple[tuple[str, float], ...]:
    """{glob: rate} -> ((glob, rate), ...) in the dict's order, the number of patterns bounded first."""
    if not value:
        raise CompressError(f"{key}: the pattern dict is empty")
    if len(value) > MAX_PATTERNS:
        raise CompressError(f"{key}: {len(value)} layer patterns; at most {MAX_PATTERNS} are allowed")
    patterns = []
    for pattern, rate in value.items():
        if not isinstance(pattern, str) or not pattern or len(pattern) > MAX_TEXT:
            raise CompressError(f"{key}: pattern keys must be layer-name globs, got {_short(repr(pattern))}")
        patterns.append((pattern, check_rate(rate, f"{key}.{_short(pattern)}")))
    return tuple(patterns)
