"""Architectures: each builder makes an untrained nn.Module; weights are the pipeline's business.

Where a model comes from is a `Spec` (the `arch` config group says which, and `model.pt` stores it, so that
every rebuild — resume, `compress export`, a run started from another run's model — makes the same model):

- `compress` (the default): the papers' architectures, by name (`_ARCHS`: the CIFAR ResNets, VGG-16-BN,
  GoogLeNet, and torchvision's ImageNet models under their `*_imagenet` names);
- `torchvision`: any classification builder of `torchvision.models` (`list_models(module=torchvision.models)`),
  called with `num_classes` and `kwargs`;
- `timm`: any model of timm (an optional extra, `pip install compress[timm]`), `timm.create_model(name,
  pretrained=False, num_classes=..., **kwargs)`;
- `module`: the user's own code, `target = "package.module:callable"` (or Hydra's dotted `_target_` form
  `package.module.callable`), imported (the current directory is on the path) and called with `kwargs`, plus
  `num_classes` when the callable takes it.

Builders are imported lazily so that a missing optional dependency of one never breaks the others.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import reprlib
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

from compress import CompressError

# name -> (module, function, fixed kwargs).
_ARCHS: dict[str, tuple[str, str, dict]] = {
    **{f"resnet{d}": ("compress.models.cifar_resnet", "resnet", {"depth": d}) for d in (20, 32, 44, 56, 110)},
    "vgg16_bn": ("compress.models.cifar_vgg", "vgg16_bn", {}),
    "googlenet": ("compress.models.cifar_googlenet", "googlenet", {}),
    # ImageNet models come from torchvision unchanged.
    "resnet18_imagenet": ("torchvision.models", "resnet18", {}),
    "resnet50_imagenet": ("torchvision.models", "resnet50", {}),
    "vgg16_bn_imagenet": ("torchvision.models", "vgg16_bn", {}),
    "convnext_tiny_imagenet": ("torchvision.models", "convnext_tiny", {}),
}

SOURCES = ("compress", "torchvision", "timm", "module")
TIMM_HINT = "needs the optional timm package, not installed: `pip install compress[timm]` (or `make install`)"
# Builder arguments that would fetch hub weights: refused (no downloads at run time; arch.checkpoint takes a file).
HUB_KWARGS = ("weights", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path")
# `package.module:callable` or `package.module.callable`: Python identifiers joined by dots, at most one colon.
_TARGET = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?::[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?")
MAX_TARGET = 500


def is_target(target: Any) -> bool:
    """Whether `target` has the form `package.module:callable` (or the dotted `package.module.callable`)."""
    return (isinstance(target, str) and len(target) <= MAX_TARGET and _TARGET.fullmatch(target) is not None
            and (":" in target or "." in target))


def names() -> list[str]:
    """The papers' architectures (`source=compress`)."""
    return sorted(_ARCHS)


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def timm_names() -> list[str]:
    """timm's model names; CompressError when timm is not installed."""
    try:
        import timm
    except ImportError:
        raise CompressError(f"arch=timm: {TIMM_HINT}") from None
    return timm.list_models()


def unknown(name: Any, known: list[str], what: str) -> CompressError:
    """One line: `name` is not among `known`, with the close matches (difflib)."""
    close = difflib.get_close_matches(str(name), known, n=5, cutoff=0.6)
    hint = f"close matches: {', '.join(close)}" if close else f"{len(known)} known, e.g. {', '.join(known[:6])}"
    return CompressError(f"arch.name: unknown {what} '{str(name)[:100]}' ({hint})")


@dataclass
class Spec:
    """Which builder makes the model, and with what arguments (plain data: stored in model.pt)."""

    source: str = "compress"
    name: str | None = None       # compress / torchvision / timm
    target: str | None = None     # module: "package.module:callable"
    kwargs: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The architecture's name in rows and logs: the zoo name, `torchvision:NAME`, `timm:NAME`, or the target."""
        if self.source == "compress":
            return str(self.name)
        if self.source == "module":  # arch.name, when given, names your model in rows (the API gives its class)
            return str(self.name or self.target)
        return f"{self.source}:{self.name}"

    def key(self) -> Any:
        """What identifies the architecture in cache keys: the zoo name alone for the papers' models (keys
        from before specs existed stay valid), the whole spec otherwise."""
        return self.name if self.source == "compress" and not self.kwargs else self.to_dict()

    def to_dict(self) -> dict:
        return {"source": self.source, "name": self.name, "target": self.target, "kwargs": dict(self.kwargs)}

    @classmethod
    def of(cls, arch: "str | Spec") -> "Spec":
        return arch if isinstance(arch, Spec) else cls("compress", arch)

    @classmethod
    def from_packed(cls, packed: dict, where: str) -> "Spec":
        """The spec a `model.pt` stores (`builder`), or, in a file written before specs existed, its zoo name (`arch`)."""
        builder = packed.get("builder")
        if builder is None:
            if packed.get("arch") not in _ARCHS:
                raise CompressError(f"{where}: holds an unknown architecture {packed.get('arch')!r}")
            return cls("compress", packed["arch"])
        ok = (isinstance(builder, dict) and builder.get("source") in SOURCES and isinstance(builder.get("kwargs", {}), dict)
              and all(isinstance(builder.get(k), (str, type(None))) for k in ("name", "target")))
        if not ok:
            raise CompressError(f"{where}: its architecture entry ('builder') is not a builder spec: {str(builder)[:200]}")
        return cls(builder["source"], builder.get("name"), builder.get("target"), dict(builder.get("kwargs") or {}))


def build(arch: "str | Spec", num_classes: int) -> nn.Module:
    """An untrained model of `arch` (a zoo name or a Spec) with `num_classes` outputs."""
    spec = Spec.of(arch)
    kwargs = dict(spec.kwargs)
    if spec.source == "compress":
        if spec.name not in _ARCHS:
            raise CompressError(f"arch.name: unknown architecture '{spec.name}' (known: {', '.join(names())})")
        module, fn, fixed = _ARCHS[spec.name]
        builder: Callable[..., nn.Module] = getattr(importlib.import_module(module), fn)
        return _call(builder, spec, {"num_classes": num_classes, **fixed, **kwargs})
    if spec.source == "torchvision":
        import torchvision

        if spec.name not in torchvision_names():
            raise unknown(spec.name, torchvision_names(), "torchvision classification model")
        return _call(torchvision.models.get_model_builder(spec.name), spec, {"num_classes": num_classes, **kwargs})
    if spec.source == "timm":
        known = timm_names()
        import timm

        if spec.name not in known:
            raise unknown(spec.name, known, "timm model")
        return _call(lambda **kw: timm.create_model(spec.name, **kw), spec,
                     {"pretrained": False, "num_classes": num_classes, **kwargs})
    if spec.source == "module":
        builder = locate(spec.target)
        if _takes(builder, "num_classes") and "num_classes" not in kwargs:
            kwargs["num_classes"] = num_classes
        return _call(builder, spec, kwargs)
    raise CompressError(f"arch.source: unknown source {spec.source!r} (one of {', '.join(SOURCES)})")


def locate(target: str | None) -> Callable[..., Any]:
    """The callable `target` names (`package.module:callable`, or the dotted form), imported with the
    current directory on the path, as `python -m` would; one line naming arch.target when it cannot be."""
    if not is_target(target):
        raise CompressError(f"arch.target: expected 'package.module:callable' (Python names), got {str(target)[:100]!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the user's own model file beside where they run `compress`
    if ":" in target:
        module_name, attr = target.split(":")
    else:
        module_name, _, attr = target.rpartition(".")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the user's module raises while importing
        raise CompressError(f"arch.target: cannot import {module_name} ({type(e).__name__}: {_first_line(e)})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CompressError(f"arch.target: {module_name} has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CompressError(f"arch.target: {target} is a {type(obj).__name__}, not a callable that builds a model")
    return obj


def _takes(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:200]


def _call(builder: Callable[..., Any], spec: Spec, arguments: dict) -> nn.Module:
    """Call a builder; an error it raises names arch.kwargs when there are kwargs (the likely cause), else
    the builder; a result that is not an nn.Module names arch.target / arch.name."""
    try:
        model = builder(**arguments)
    except CompressError:
        raise
    except Exception as e:
        key = "arch.kwargs" if spec.kwargs else ("arch.target" if spec.source == "module" else "arch.name")
        given = f" with kwargs {reprlib.repr(spec.kwargs)}" if spec.kwargs else ""
        raise CompressError(f"{key}: building {spec.label}{given} failed ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(model, nn.Module):
        key = "arch.target" if spec.source == "module" else "arch.name"
        raise CompressError(f"{key}: {spec.label} returned a {type(model).__name__}, not an nn.Module")
    return model
