"""Finding, downloading, loading and saving model weights.

Formats read: the akamaster CIFAR checkpoints ({"state_dict": {"module.…": …}}), a bare state dict,
torchvision weights ("torchvision"), and this project's own `model.pt`
({"format": FORMAT, "arch", "method", "meta", "state_dict"}), which may hold a compressed structure.
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

FORMAT = "compress-model/1"
# Checkpoints this project trained and commits (the CIFAR VGG-16-BN): searched after paths.weights, so a
# config can name them by file name from any working directory.
PROJECT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


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
        raise CompressError(f"arch.checkpoint: {path} is not a readable PyTorch checkpoint "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from e
    if not isinstance(obj, dict):
        raise CompressError(f"arch.checkpoint: {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def plain_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise CompressError("arch.checkpoint: its 'state_dict' entry is not a dict")
    # DataParallel-saved checkpoints prefix every key with "module."
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


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


def pack(model: nn.Module, arch: str, method: str, meta: dict) -> dict:
    return {"format": FORMAT, "arch": arch, "method": method, "meta": meta,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


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
