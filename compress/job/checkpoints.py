"""Finding, downloading, loading and saving model weights.

Formats read (`arch.checkpoint`, the one rule of docs/own-model.md "Weights"): this project's own `model.pt`
({"format": FORMAT, "arch", "builder", "method", "meta", "state_dict", "num_classes", "input_shape"}), which
may hold a compressed structure and names its architecture (`builder`, a compress.models.Spec; files written
before it existed name a zoo architecture in `arch`); or a state dict: the tensors at the file's top level,
under "state_dict" (the akamaster CIFAR checkpoints: {"state_dict": {"module.…": …}}) or under "model"
(training scripts' {"model": …, "optimizer": …}), the first of these that is a dict of tensors, with a
DataParallel "module." prefix dropped; and torchvision's ImageNet weights ("torchvision", the *_imagenet archs).
Every load is `weights_only=True`.
"""
from __future__ import annotations

import hashlib
import os
import re
import urllib.parse
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from compress import CompressError
from compress.models import Spec

FORMAT = "compress-model/1"
# Checkpoints this project trained and commits (the CIFAR VGG-16-BN): searched after paths.weights, so a
# config can name them by file name from any working directory.
PROJECT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights"


def is_url(spec: str) -> bool:
    return urllib.parse.urlparse(spec).scheme in ("http", "https", "ftp")


def _first_file(relative: Path, dirs: Sequence[str]) -> Path | None:
    """`relative` below the first of `dirs` that holds it as a file."""
    for d in dirs:
        cand = Path(d).expanduser() / relative
        if cand.is_file():
            return cand
    return None


def resolve(spec: str, weights_dirs: Sequence[str], cache_dir: Path) -> Path:
    """A local file for `spec`: a path; a relative one not found from here is looked up in `weights_dirs`,
    then in the project's committed `weights/` (the CIFAR VGG-16-BN's config names its file); or a URL found
    by file name in `weights_dirs` or the download cache, downloaded there (hash-checked against the
    name's hex suffix, torch.hub's convention) if not."""
    if not is_url(spec):
        path = Path(spec).expanduser()
        if path.is_file():
            return path
        if not path.is_absolute():
            dirs = [*weights_dirs, str(PROJECT_WEIGHTS)]
            found = _first_file(path, dirs)
            if found is not None:
                return found
            raise CompressError(f"arch.checkpoint: no such file: {path} (looked here, in paths.weights and the "
                                f"project's weights/: {', '.join(dirs)})")
        raise CompressError(f"arch.checkpoint: no such file: {path}")
    name = Path(urllib.parse.urlparse(spec).path).name
    found = _first_file(Path(name), [*weights_dirs, str(cache_dir / "checkpoints")])
    if found is not None:
        return found
    dest = cache_dir / "checkpoints" / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    m = re.search(r"-([a-f0-9]{6,})\.", name)
    try:
        torch.hub.download_url_to_file(spec, str(dest), hash_prefix=m.group(1) if m else None, progress=True)
    except Exception as e:
        raise CompressError(
            f"arch.checkpoint: could not download {spec} ({type(e).__name__}: {e}); offline? put {name} in "
            f"one of paths.weights ({', '.join(weights_dirs)}) or pass arch.checkpoint=/path/to/{name}") from e
    return dest


def read(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        pickled = "weights only load failed" in str(e).lower()
        hint = "; it pickles objects, not only tensors: save model.state_dict() instead" if pickled else ""
        raise CompressError(f"arch.checkpoint: {path} is not a readable PyTorch checkpoint "
                            f"({type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}){hint}") from None
    if not isinstance(obj, dict):
        raise CompressError(f"arch.checkpoint: {path} holds a {type(obj).__name__}, not a state dict")
    return obj


STATE_DICT_PLACES = ("state_dict", "model")  # where a checkpoint may nest its tensors, in the order looked at


def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def plain_state_dict(obj: dict, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The state dict a checkpoint holds: its top level when that is a dict of tensors, else its "state_dict",
    else its "model" entry; a "module." prefix (DataParallel) dropped from the keys."""
    found = obj if _is_tensor_dict(obj) else next((obj[k] for k in STATE_DICT_PLACES if _is_tensor_dict(obj.get(k))), None)
    if found is None:
        keys = ", ".join(repr(k)[:40] for k in list(obj)[:5])
        raise CompressError(f"arch.checkpoint: {source} holds no state dict: neither its top level nor its "
                            f"{' nor its '.join(repr(k) for k in STATE_DICT_PLACES)} entry is a dict of tensors "
                            f"(its keys: {keys}{' …' if len(obj) > 5 else ''})")
    return {k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k: v for k, v in found.items()}


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Strict load, with a one-line error naming the mismatching keys."""
    own = model.state_dict()
    # Old checkpoints (akamaster's among them) predate BatchNorm's num_batches_tracked counter.
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in sd and hasattr(sd[k], "shape") and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''} ({len(keys)})")
        raise CompressError(f"arch.checkpoint: {source} does not match the architecture; " + "; ".join(parts))
    model.load_state_dict(sd, strict=False)


def pack(model: nn.Module, arch: "str | Spec", method: str, meta: dict, *, num_classes: int | None = None,
         input_shape: Sequence[int] | None = None) -> dict:
    """This project's `model.pt`: the weights, the method's structure `meta`, and the builder spec that rebuilds
    the architecture (`arch`: a zoo name or a compress.models.Spec), with the classes and input shape when known."""
    spec = Spec.of(arch)
    packed = {"format": FORMAT, "arch": spec.label, "builder": spec.to_dict(), "method": method, "meta": meta,
              "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if num_classes is not None:
        packed["num_classes"] = int(num_classes)
    if input_shape is not None:
        packed["input_shape"] = [int(d) for d in input_shape]
    return packed


def digest(model: nn.Module) -> str:
    """A short hash of a model's state (names, shapes, values): tells whether two loads gave the same weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def atomic_save(obj, path: Path) -> None:
    """Write to a temporary file and rename: an interrupted save never leaves a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
