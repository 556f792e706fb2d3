"""Where a run's starting model comes from (`arch.checkpoint`):

- a local path or a URL (checkpoints.resolve): a plain state dict (the published CIFAR ResNets), or this
  project's own `model.pt`, restored into its compressed form;
- "torchvision": torchvision's ImageNet weights for the `*_imagenet` archs (the generic torchvision / timm /
  module sources refuse hub weights in their config: no downloads at run time);
- "random": the architecture's random initial weights (smoke runs);
- null: trained here with the `pretrain` schedule, once, and cached under `paths.cache/pretrained`
  (an interrupted pretraining resumes from its last epoch).

The architecture is a `compress.models.Spec` (the arch config's `spec`: a zoo name, a torchvision or timm
builder, or the user's own callable); `model.pt` stores it, and every rebuild here (resume, a model.pt given
as arch.checkpoint, export) builds from the stored spec.

And a finished run's model for `compress export` (`load_saved`: a run dir or its model.pt, with the run's
input shape, and real test images to check the exported file on when the run's data can be found).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from compress import CompressError, methods, models
from compress.config import DatasetConfig, ScheduleConfig
from compress.data.base import Data
from compress.job import checkpoints
from compress.models.introspect import classifier
from compress.training import distributed, train

log = logging.getLogger("compress")


def unpack(packed: dict, arch: "str | models.Spec | None", num_classes: int | None = None,
           source: str = "the saved model") -> nn.Module:
    """A model from this project's own format, restoring any compressed structure. Built from the spec the file
    stores; `arch` (a zoo name or Spec), when given, must be the same architecture. `num_classes`: the file's
    own when it records them, else this."""
    stored = models.Spec.from_packed(packed, source)
    if arch is not None and stored.to_dict() != models.Spec.of(arch).to_dict():
        expected = models.Spec.of(arch)
        raise CompressError(f"arch.checkpoint: {source} holds a '{stored.label}' model"
                            f"{f' (kwargs {stored.kwargs})' if stored.kwargs else ''}, not {expected.label}"
                            f"{f' (kwargs {expected.kwargs})' if expected.kwargs else ''}")
    if packed.get("method") not in methods.METHODS:
        raise CompressError(f"arch.checkpoint: the file was written by an unknown method {packed.get('method')!r}")
    classes = packed.get("num_classes") or num_classes
    if num_classes is not None and classes != num_classes:
        raise CompressError(f"arch.checkpoint: {source} classifies {classes} classes, the data set has {num_classes}")
    if classes is None:
        raise CompressError(f"{source}: records no class count")
    model = models.build(stored, int(classes))
    model = methods.get(packed["method"]).restore(model, packed.get("meta") or {}, packed["state_dict"])
    checkpoints.load_into(model, packed["state_dict"], source)
    return model


def from_file(spec: str, arch: "str | models.Spec", num_classes: int, weights_dirs: Sequence[str], cache: Path) -> nn.Module:
    """The model `arch.checkpoint=spec` names (a file, see checkpoints' docstring for what it may hold)."""
    return _from_file(spec, arch, num_classes, weights_dirs, cache)[0]


def _from_file(spec: str, arch: "str | models.Spec", num_classes: int, weights_dirs: Sequence[str],
               cache: Path) -> tuple[nn.Module, list[dict]]:
    """`from_file`, and the compression steps the file carries (`compression_steps`; [] for a plain state dict)."""
    path = checkpoints.resolve(spec, weights_dirs, cache)
    obj = checkpoints.read(path)
    log.info("weights: %s", path)
    if obj.get("format") == checkpoints.FORMAT:
        return unpack(obj, arch, num_classes, source=str(path)), compression_steps(obj)
    model = models.build(arch, num_classes)
    checkpoints.load_into(model, checkpoints.plain_state_dict(obj, str(path)), str(path))
    return model, []


def from_torchvision(arch: str, num_classes: int) -> nn.Module:
    import torchvision

    model = models.build(arch, num_classes)
    name = arch.removesuffix("_imagenet")
    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        state_dict = weights.get_state_dict(progress=True)
    except Exception as e:
        raise CompressError(f"arch.checkpoint: could not fetch torchvision's {name} weights ({type(e).__name__}); "
                            "offline? pass arch.checkpoint=/path/to/weights.pth") from e
    checkpoints.load_into(model, state_dict, f"torchvision {name}")
    return model


def _changed_fields(config) -> dict:
    """The dataclass's fields that differ from their defaults: a field added later, at its default, leaves
    keys built from this unchanged (a pretraining that spans sessions keeps finding its partial file)."""
    defaults = type(config)()
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if getattr(config, f.name) != getattr(defaults, f.name)}


def pretrain_key(arch: "str | models.Spec", data: Data, dataset: DatasetConfig, pretrain: ScheduleConfig, seed: int) -> str:
    """What the pretrained weights depend on: the images' content (not their folder, nor whether they were
    decoded or cached), the split and the recipe. Where the data lies (root, download) is not part of it."""
    split = {k: v for k, v in _changed_fields(dataset).items() if k not in ("root", "download")}
    identity = [models.Spec.of(arch).key(), data.identity, data.num_classes, split, _changed_fields(pretrain), seed]
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]


def pretrained_here(arch: "str | models.Spec", data: Data, dataset: DatasetConfig, pretrain: ScheduleConfig, *, seed: int,
                    cache: Path, device: torch.device, eval_batch_size: int) -> nn.Module:
    """No checkpoint given: train from scratch with the pretrain schedule, once; cache the result."""
    key = pretrain_key(arch, data, dataset, pretrain, seed)
    label = re.sub(r"[^\w.-]+", "_", models.Spec.of(arch).label)[:80]  # a target's ':' and the like, out of file names
    final = cache / "pretrained" / f"{label}-{data.name}-{key}.pt"
    partial = final.with_suffix(".partial.pt")
    if final.is_file():
        log.info("weights: pretrained earlier, cached at %s", final)
        return unpack(checkpoints.read(final), arch, data.num_classes, source=str(final))
    final.parent.mkdir(parents=True, exist_ok=True)
    resume = torch.load(partial, map_location="cpu", weights_only=True) if partial.is_file() else None
    log.info("arch.checkpoint is null: pretraining %s for %d epochs (cache: %s)", models.Spec.of(arch).label,
             pretrain.epochs, final)
    model = models.build(arch, data.num_classes).to(device)
    writes = distributed.is_main()  # data-parallel pretraining: every rank trains, rank 0 keeps the files
    model, _ = train.fit(model, data.train, data.val, pretrain, device, seed=seed, resume=resume,
                         on_epoch_end=(lambda s: checkpoints.atomic_save(s, partial)) if writes else None,
                         desc="pretrain", eval_batch_size=eval_batch_size)
    if writes:
        checkpoints.atomic_save(checkpoints.pack(model, arch, "none", {}, num_classes=data.num_classes,
                                                 input_shape=data.image_shape), final)
        partial.unlink(missing_ok=True)
    return model


def starting_point(config, data: Data, device: torch.device) -> tuple[nn.Module, list[dict]]:
    """The model `config.arch.checkpoint` names (see the module docstring), and the compression steps it
    already carries (`compression_steps`: only a compressed model.pt has any)."""
    arch, spec = config.arch.spec, config.arch.checkpoint
    cache = Path(config.paths.cache).expanduser()
    if spec == "random":
        log.info("weights: random initialisation (arch.checkpoint=random)")
        return models.build(arch, data.num_classes), []
    if spec is None:
        return pretrained_here(arch, data, config.dataset, config.pretrain, seed=config.seed,
                               cache=cache, device=device, eval_batch_size=config.measure.eval_batch_size), []
    if spec == "torchvision":
        return from_torchvision(arch.name, data.num_classes), []
    return _from_file(spec, arch, data.num_classes, config.paths.weights, cache)


def starting_model(config, data: Data, device: torch.device) -> nn.Module:
    """The model `config.arch.checkpoint` names (`starting_point` without the steps)."""
    return starting_point(config, data, device)[0]


def compression_steps(packed: dict) -> list[dict]:
    """The compression a packed model.pt carries, as a chain's steps ({"method", "meta"}, in order): none for
    an uncompressed file, a chain's own steps, else its one method."""
    method = packed.get("method")
    if method in (None, "none"):
        return []
    if method == "chain":
        return [dict(step) for step in (packed.get("meta") or {}).get("steps", [])]
    return [{"method": method, "meta": packed.get("meta") or {}}]


def starting_steps(config) -> list[dict]:
    """The compression the model.pt that `arch.checkpoint` names already carries ([] for every other start),
    without building the model: a resumed run that does not need the starting model still saves these
    steps before its own method's, so that its model.pt rebuilds the structure."""
    spec = config.arch.checkpoint
    if spec in (None, "random", "torchvision"):
        return []
    packed = checkpoints.read(checkpoints.resolve(spec, config.paths.weights, Path(config.paths.cache).expanduser()))
    return compression_steps(packed) if packed.get("format") == checkpoints.FORMAT else []


# -- a finished run's model, for `compress export` ---------------------------------------------------------
@dataclasses.dataclass
class Saved:
    model: nn.Module
    arch: str  # the architecture's label (compress.models.Spec.label)
    method: str
    input_shape: tuple[int, int, int]
    config: dict | None  # the run's resolved config (.hydra/config.yaml), when PATH is or sits in a run dir


def _run_config(run_dir: Path) -> dict | None:
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:
        raise CompressError(f"{path}: not a readable run config ({type(e).__name__})") from None
    return config if isinstance(config, dict) else None


def _num_classes(arch: "str | models.Spec", state_dict: dict) -> int:
    """The classifier's width, read from the saved weights (the last Linear of the architecture): for files
    that do not record `num_classes` (written before it was stored)."""
    probe = models.build(arch, 10)
    last = classifier(probe)[0]
    # `<last>.weight`, or its parametrized original (`<last>.parametrizations.weight.original`: quantised)
    weights = [v for k, v in state_dict.items() if k.startswith(f"{last}.") and k.endswith(("weight", "original"))
               and getattr(v, "dim", lambda: 0)() == 2]
    if not weights:
        raise CompressError(f"export: the saved {models.Spec.of(arch).label} has no classifier weight '{last}.weight'")
    return int(weights[0].shape[0])


def load_saved(path: Path) -> Saved:
    """A run dir (its model.pt) or a model.pt file, restored into its compressed form."""
    if path.is_dir():
        run_dir, file = path, path / "model.pt"
        if not file.is_file():
            raise CompressError(f"{path}: no model.pt (the run has not finished: resume it with resume=true)")
    elif path.is_file():
        run_dir, file = path.parent, path
    else:
        raise CompressError(f"{path}: no such file or directory")
    packed = checkpoints.read(file)
    if packed.get("format") != checkpoints.FORMAT or not isinstance(packed.get("state_dict"), dict):
        raise CompressError(f"{file}: not a model.pt written by `compress run` (format {packed.get('format')!r})")
    spec = models.Spec.from_packed(packed, str(file))
    config = _run_config(run_dir)
    dataset = (config or {}).get("dataset") or {}
    image_size = int(dataset.get("image_size") or (224 if str(spec.name).endswith("_imagenet") else 32))
    input_shape = tuple(packed.get("input_shape") or (3, image_size, image_size))
    classes = packed.get("num_classes") or _num_classes(spec, packed["state_dict"])
    model = unpack(packed, None, classes, source=str(file))
    return Saved(model.eval(), spec.label, packed.get("method", ""), input_shape, config)


def run_data(saved: Saved):
    """The run's data set (compress.data.Data, normalised as in training, on the CPU), or None when the run
    names none that can be found here (no run config, synthetic data, the files absent)."""
    config = saved.config or {}
    dataset, arch, paths = config.get("dataset"), config.get("arch") or {}, config.get("paths") or {}
    if not dataset or dataset.get("name") == "synthetic":
        return None
    from compress import data as datasets
    from compress.config import DatasetConfig

    try:  # a null arch.mean / arch.std: computed again, the same way
        fields = {f.name for f in dataclasses.fields(DatasetConfig)}
        cfg = DatasetConfig(**{k: v for k, v in dataset.items() if k in fields})
        search = [p for p in paths.get("data") or [] if isinstance(p, str) and "${" not in p] + ["data", "../shared"]
        cache = Path(os.environ.get("COMPRESS_CACHE", "~/.cache/compress")).expanduser()
        return datasets.load(cfg, mean=arch.get("mean"), std=arch.get("std"), search=search, cache_dir=cache,
                             device=torch.device("cpu"), channels_last=False)
    except CompressError:
        return None


def check_images(saved: Saved, count: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """`count` real test images, normalised as in training, when the run's data can be found; otherwise
    seeded random inputs (and the returned label says which)."""
    loaded = run_data(saved)
    if loaded is not None:
        images, _ = next(loaded.test.batches(count))
        return images, f"{len(images)} test images of {loaded.source}"
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, *saved.input_shape, generator=g), f"{count} random inputs (no data set found)"
