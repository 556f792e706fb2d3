"""Small questions about any nn.Module, asked in one place: where it lives, which layer is its classifier,
which layers a name pattern selects, and running it in eval mode for a while without losing its training flag."""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    first = next(model.parameters(), None)
    return torch.device("cpu") if first is None else first.device


def classifier(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The model's last nn.Linear, by module order, with its name; None without one."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """`model.eval()` for the block, then the training flag it had (also after an exception)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def globs(value: str | Iterable[str] | None) -> list[str]:
    """A layer-name pattern option (one glob, a list of them, or null for none) as a list."""
    return [value] if isinstance(value, str) else list(value or [])


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module name (as in `named_modules()`) matches any of the globs (fnmatch, case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)
