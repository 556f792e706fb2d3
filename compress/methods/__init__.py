"""Compression methods by name. The registry is an explicit list: a method module that fails to import
fails loudly here, at `import compress.methods`, instead of quietly vanishing from the choices."""
from __future__ import annotations

from compress import CompressError
from compress.methods.approxconv import ApproxConv
from compress.methods.aup import AUP
from compress.methods.base import Context, Method, MethodOptions
from compress.methods.cfdp import CFDP
from compress.methods.chain import Chain, use_catalogue
from compress.methods.fgfp import FGFP
from compress.methods.quant import Quantise
from compress.methods.scap import SCAP
from compress.methods.structured import HRankPruning, L1Pruning, RandomPruning
from compress.methods.torch_pruning import TorchPruning

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Method, L1Pruning, RandomPruning, HRankPruning, CFDP, SCAP, ApproxConv, AUP, FGFP,
                              Quantise, Chain, TorchPruning)
}
use_catalogue(METHODS)  # the methods a chain's steps may name


def names() -> list[str]:
    return sorted(METHODS)


def get(name: str) -> type[Method]:
    if name not in METHODS:
        raise CompressError(f"method.name: unknown method '{name}' (known: {', '.join(names())})")
    return METHODS[name]


__all__ = ["Context", "Method", "MethodOptions", "METHODS", "get", "names"]
