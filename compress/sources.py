"""Where a run's starting model comes from (`arch.checkpoint`):

- a local path or a URL (checkpoints.resolve): a plain state dict (the published CIFAR ResNets), or this
  project's own `model.pt`, restored into its compressed form;
- "torchvision": torchvision's ImageNet weights for the `*_imagenet` archs;
- "random": the architecture's random initial weights (smoke runs);
- null: trained here with the `pretrain` schedule, once, and cached under `paths.cache/pretrained`
  (an interrupted pretraining resumes from its last epoch).

And a finished run's model for `compress export` (`load_saved`: a run dir or its model.pt, with the run's
input shape, and real test images to check the exported file on when the run's data can be found).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from compress import CompressError, checkpoints, distributed, methods, models, train
from compress.config import DatasetConfig, ScheduleConfig
from compress.data.base import Data

log = logging.getLogger("compress")


def unpack(packed: dict, arch: str, num_classes: int) -> nn.Module:
    """A model from this project's own format, restoring any compressed structure."""
    if packed.get("arch") != arch:
        raise CompressError(f"arch.checkpoint: the file holds a '{packed.get('arch')}' model, not arch.name={arch}")
    if packed.get("method") not in methods.METHODS:
        raise CompressError(f"arch.checkpoint: the file was written by an unknown method {packed.get('method')!r}")
    model = models.build(arch, num_classes)
    model = methods.get(packed["method"]).restore(model, packed.get("meta") or {}, packed["state_dict"])
    checkpoints.load_into(model, packed["state_dict"], "the saved model")
    return model


def from_file(spec: str, arch: str, num_classes: int, weights_dirs: Sequence[str], cache: Path) -> nn.Module:
    path = checkpoints.resolve(spec, weights_dirs, cache)
    obj = checkpoints.read(path)
    log.info("weights: %s", path)
    if obj.get("format") == checkpoints.FORMAT:
        return unpack(obj, arch, num_classes)
    model = models.build(arch, num_classes)
    checkpoints.load_into(model, checkpoints.plain_state_dict(obj), str(path))
    return model


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


def pretrain_key(arch: str, data: Data, dataset: DatasetConfig, pretrain: ScheduleConfig, seed: int) -> str:
    """What the pretrained weights depend on: the images' content (not their folder, nor whether they were
    decoded or cached), the split and the recipe. Where the data lies (root, download) is not part of it."""
    split = {k: v for k, v in _changed_fields(dataset).items() if k not in ("root", "download")}
    return hashlib.sha256(json.dumps([arch, data.identity, data.num_classes, split, _changed_fields(pretrain), seed],
                                     sort_keys=True, default=str).encode()).hexdigest()[:12]


def pretrained_here(arch: str, data: Data, dataset: DatasetConfig, pretrain: ScheduleConfig, *, seed: int, cache: Path,
                    device: torch.device, eval_batch_size: int) -> nn.Module:
    """No checkpoint given: train from scratch with the pretrain schedule, once; cache the result."""
    key = pretrain_key(arch, data, dataset, pretrain, seed)
    final = cache / "pretrained" / f"{arch}-{data.name}-{key}.pt"
    partial = final.with_suffix(".partial.pt")
    if final.is_file():
        log.info("weights: pretrained earlier, cached at %s", final)
        return unpack(checkpoints.read(final), arch, data.num_classes)
    final.parent.mkdir(parents=True, exist_ok=True)
    resume = torch.load(partial, map_location="cpu", weights_only=True) if partial.is_file() else None
    log.info("arch.checkpoint is null: pretraining %s for %d epochs (cache: %s)", arch, pretrain.epochs, final)
    model = models.build(arch, data.num_classes).to(device)
    writes = distributed.is_main()  # data-parallel pretraining: every rank trains, rank 0 keeps the files
    model, _ = train.fit(model, data.train, data.val, pretrain, device, seed=seed, resume=resume,
                         on_epoch_end=(lambda s: checkpoints.atomic_save(s, partial)) if writes else None,
                         desc="pretrain", eval_batch_size=eval_batch_size)
    if writes:
        checkpoints.atomic_save(checkpoints.pack(model, arch, "none", {}), final)
        partial.unlink(missing_ok=True)
    return model


def starting_model(config, data: Data, device: torch.device) -> nn.Module:
    """The model `config.arch.checkpoint` names (see the module docstring)."""
    arch, spec = config.arch.name, config.arch.checkpoint
    cache = Path(config.paths.cache).expanduser()
    if spec == "random":
        log.info("weights: random initialisation (arch.checkpoint=random)")
        return models.build(arch, data.num_classes)
    if spec is None:
        return pretrained_here(arch, data, config.dataset, config.pretrain, seed=config.seed,
                               cache=cache, device=device, eval_batch_size=config.measure.eval_batch_size)
    if spec == "torchvision":
        return from_torchvision(arch, data.num_classes)
    return from_file(spec, arch, data.num_classes, config.paths.weights, cache)


# -- a finished run's model, for `compress export` ---------------------------------------------------------
@dataclasses.dataclass
class Saved:
    model: nn.Module
    arch: str
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


def _num_classes(arch: str, state_dict: dict) -> int:
    """The classifier's width, read from the saved weights (the last Linear of the architecture)."""
    probe = models.build(arch, 10)
    last = [name for name, m in probe.named_modules() if isinstance(m, nn.Linear)][-1]
    # `<last>.weight`, or its parametrized original (`<last>.parametrizations.weight.original`: quantised)
    weights = [v for k, v in state_dict.items() if k.startswith(f"{last}.") and k.endswith(("weight", "original"))
               and getattr(v, "dim", lambda: 0)() == 2]
    if not weights:
        raise CompressError(f"export: the saved {arch} has no classifier weight '{last}.weight'")
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
    arch = packed.get("arch")
    if arch not in models.names():
        raise CompressError(f"{file}: holds an unknown architecture {arch!r}")
    config = _run_config(run_dir)
    dataset = (config or {}).get("dataset") or {}
    image_size = int(dataset.get("image_size") or (224 if str(arch).endswith("_imagenet") else 32))
    input_shape = tuple(packed.get("input_shape") or (3, image_size, image_size))
    model = unpack(packed, arch, _num_classes(arch, packed["state_dict"]))
    return Saved(model.eval(), arch, packed.get("method", ""), input_shape, config)


def check_images(saved: Saved, count: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """`count` real test images, normalised as in training, when the run's data can be found; otherwise
    seeded random inputs (and the returned label says which)."""
    config = saved.config or {}
    dataset, arch, paths = config.get("dataset"), config.get("arch") or {}, config.get("paths") or {}
    if dataset and dataset.get("name") != "synthetic":  # a null arch.mean / arch.std: computed again, the same way
        from compress import data as datasets
        from compress.config import DatasetConfig

        try:
            fields = {f.name for f in dataclasses.fields(DatasetConfig)}
            cfg = DatasetConfig(**{k: v for k, v in dataset.items() if k in fields})
            search = [p for p in paths.get("data") or [] if isinstance(p, str) and "${" not in p] + ["data", "../shared"]
            cache = Path(os.environ.get("COMPRESS_CACHE", "~/.cache/compress")).expanduser()
            loaded = datasets.load(cfg, mean=arch.get("mean"), std=arch.get("std"), search=search, cache_dir=cache,
                                   device=torch.device("cpu"), channels_last=False)
            images, _ = next(loaded.test.batches(count))
            return images, f"{len(images)} test images of {loaded.source}"
        except CompressError:
            pass  # no data here: the check still runs, on random inputs
    g = torch.Generator().manual_seed(seed)
    return torch.randn(count, *saved.input_shape, generator=g), f"{count} random inputs (no data set found)"
