"""Compression methods, registered by name. Each module in this package registers its classes with
`@register`; `get(name)` finds them."""
from __future__ import annotations

import importlib
import pkgutil

from compress import CompressError
from compress.methods.base import Context, Method

_REGISTRY: dict[str, type[Method]] = {"none": Method}
_loaded = False
_broken: dict[str, str] = {}  # module -> why it failed to import (one broken method never hides the others)


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise RuntimeError(f"method name '{cls.name}' registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            if info.name != "base" and not info.name.startswith("_"):
                try:
                    importlib.import_module(f"{__name__}.{info.name}")
                except ImportError as e:
                    _broken[info.name] = f"{type(e).__name__}: {e}"
        _loaded = True


def names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    _load_all()
    if name not in _REGISTRY:
        broken = "".join(f"; module {m} failed to import ({why})" for m, why in _broken.items())
        raise CompressError(f"method.name: unknown method '{name}' (known: {', '.join(names())}){broken}")
    return _REGISTRY[name]


__all__ = ["Context", "Method", "register", "get", "names"]
