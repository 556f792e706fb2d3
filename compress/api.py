"""The Python API: compress a model you hold in memory, from a notebook or a script.

It goes through the same pipeline as `compress run` (compress/job/pipeline.py: baseline row, method, optional
fine-tune, final row, `model.pt`), with a config composed from the same typed defaults, so every option,
check and metrics column is the CLI's::

    from compress import api

    result = api.compress(model, "l1", data=api.Datasets(train=train_set, test=test_set),
                          target_macs=0.5, schedule={"epochs": 2, "lr": 0.01})
    result.model            # the compressed (and fine-tuned) nn.Module
    result.rows             # pandas DataFrame: the run's metrics.csv (baseline, compressed, final rows)
    result.export("model.onnx")   # an ONNX (or TorchScript) file, checked against PyTorch

`data` is either `Datasets(train=..., test=..., val=None)` of map-style `torch.utils.data.Dataset`s whose
items are `(CHW float tensor as the model takes it, int label)` (their transforms normalise and augment;
without `val`, a tenth of the training items, at most 5,000, is held out for every decision), or a `dataset` config as a
dict, e.g. `{"name": "imagefolder", "root": "my_images"}` or `{"name": "cifar10", "root": "../shared/cifar10"}`
(then `mean`/`std` say how the model's inputs are normalised, as `arch.mean`/`arch.std` do on the CLI).
Method options are keyword arguments (`target_macs=0.5`, `compress_rate="[0.3]*20"`: the keys of
`method.<key>`); `schedule`, `measure` and `limits` take dicts of their groups' keys; `overrides` takes any
further `key=value` strings as on the command line. Bad values raise `compress.CompressError` naming the key.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from compress import CompressError
from compress.models.introspect import evaluating, model_device

# The models handed to `compress` in this process, by key: `arch=module` builds from `given_model`, so the
# pipeline restores a saved stage (resume, rounds' rollback) through the same builder spec as a user's module.
_GIVEN: dict[str, nn.Module] = {}


def given_model(key: str, num_classes: int | None = None) -> nn.Module:
    """A fresh copy of the model registered under `key` (the `arch.target` of API runs)."""
    if key not in _GIVEN:
        raise CompressError(f"arch.kwargs: no model was handed to compress.api under {key!r} in this process")
    return copy.deepcopy(_GIVEN[key])


@dataclass
class Datasets:
    """Your own data: map-style Datasets of (CHW float tensor, int label). `num_classes` defaults to the
    model's output width."""

    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None = None
    num_classes: int | None = None
    name: str = ""


@dataclass
class Result:
    model: nn.Module
    rows: Any  # pandas.DataFrame of the run's metrics.csv
    run_dir: Path
    input_shape: tuple[int, int, int]
    _check_images: torch.Tensor = field(repr=False, default=None)

    def export(self, path: str | Path, fmt: str = "onnx", tolerance: float | None = None):
        """Write the compressed model as ONNX or TorchScript and check it against PyTorch (compress.deploy.export)."""
        from compress.deploy import export

        images = self._check_images
        source = f"{len(images)} test images"
        return export.export(self.model, fmt, Path(path), self.input_shape, images, source,
                             export.TOLERANCE if tolerance is None else tolerance)


def _output_width(model: nn.Module, image: torch.Tensor) -> int:
    try:
        with evaluating(model), torch.no_grad():
            out = model(image[None].to(model_device(model)))
    except Exception as e:
        raise CompressError(f"model: a forward pass on one image of shape {tuple(image.shape)} failed "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise CompressError("model: must return (batch, classes) logits")
    return int(out.shape[1])


def _option_overrides(group: str, values: dict | None) -> list[str]:
    """`{"epochs": 2}` -> ["schedule.epochs=2"], values written in Hydra's override grammar."""
    return [f"{group}.{k}={_hydra_value(v)}" for k, v in (values or {}).items()]


def _hydra_value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_hydra_value(v)}" for k, v in value.items()) + "}"
    raise CompressError(f"{value!r}: not a config value (numbers, strings, booleans, lists and dicts of them)")


def compress(model: nn.Module, method: str = "none", *, data: Datasets | dict, schedule: dict | None = None,
             measure: dict | None = None, limits: dict | None = None, overrides: Sequence[str] = (),
             mean: Sequence[float] | None = None, std: Sequence[float] | None = None, seed: int = 0,
             threads: int | None = None, run_dir: str | Path | None = None, resume: bool = False,
             **method_options) -> Result:
    """Compress `model` with `method` (any of `compress run`'s: l1, cfdp, hrank, scap, torch_pruning, aup,
    approxconv, quant, ...), optionally fine-tune it (`schedule={"epochs": N, ...}`; default: none), and
    return it with the run's metrics rows. The run's files (metrics.csv, state for `resume=True`, model.pt)
    go to `run_dir` (default: outputs/api/<date>/<time>_<method>). `model` itself is left untouched."""
    from compress.job.pipeline import Run

    if not isinstance(model, nn.Module):
        raise CompressError(f"model: an nn.Module is needed, got {type(model).__name__}")
    if not isinstance(data, (Datasets, dict)):
        raise CompressError("data: give compress.api.Datasets(train=..., test=...) or a dataset config dict "
                            f"such as {{'name': 'imagefolder', 'root': DIR}}, got {type(data).__name__}")
    from compress.job import checkpoints

    # Keyed by content, so that the same model handed again (resume=True) composes the same config.
    key = f"{type(model).__name__}-{checkpoints.digest(model)[:12]}"
    _GIVEN[key] = copy.deepcopy(model).cpu()
    try:
        schedule = {"epochs": 0, **(schedule or {})}
        measure = {"latency": False, **(measure or {})}
        args = ["arch=module", f"arch.target={__name__}:given_model", f"arch.kwargs={{key:'{key}'}}",
                f"arch.name={_hydra_value(type(model).__name__)}",
                "arch.checkpoint=random", f"method={method}", f"seed={seed}", f"resume={_hydra_value(resume)}",
                *_option_overrides("method", method_options), *_option_overrides("schedule", schedule),
                *_option_overrides("measure", measure), *_option_overrides("limits", limits)]
        if threads is not None:
            args.append(f"threads={threads}")
        given = None
        if isinstance(data, Datasets):
            from compress.data.datasets import _first_item, from_datasets

            image, _ = _first_item(data.train, "train")
            num_classes = data.num_classes or _output_width(_GIVEN[key], image)
            # Without a val set, a tenth of the training items (at most the CLI's 5,000) is held out for decisions.
            if data.val is None:
                args.append(f"dataset.val_size={max(1, min(5000, len(data.train) // 10))}")
            args += [f"dataset.num_classes={num_classes}", f"dataset.image_size={image.shape[-1]}",
                     "arch.mean=[0.0,0.0,0.0]", "arch.std=[1.0,1.0,1.0]"]  # the datasets normalise themselves
        else:
            args += _option_overrides("dataset", data)
            if mean is not None:
                args.append(f"arch.mean={_hydra_value(list(mean))}")
            if std is not None:
                args.append(f"arch.std={_hydra_value(list(std))}")
        config = _compose([*args, *overrides])
        if isinstance(data, Datasets):
            given = from_datasets(data.train, data.test, data.val, num_classes=config.dataset.num_classes,
                                  val_size=config.dataset.val_size, split_seed=config.dataset.split_seed,
                                  channels_last=config.schedule.channels_last, name=data.name)
        folder = Path(run_dir) if run_dir is not None else \
            Path("outputs/api") / time.strftime("%Y-%m-%d") / f"{time.strftime('%H-%M-%S')}_{config.method.name}"
        folder.mkdir(parents=True, exist_ok=True)
        run = Run(config, folder, overrides=",".join(overrides), data=given)
        run.execute()
        return _result(run, folder)
    finally:
        _GIVEN.pop(key, None)


def _compose(overrides: list[str]):
    """The CLI's typed config from these overrides; Hydra's own errors (an unknown method, a bad override)
    become one CompressError line, as the CLI prints them."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from compress.job.compose import compose

    try:
        return compose(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CompressError(first) from None


def _result(run, folder: Path) -> Result:
    import pandas as pd

    from compress.job import checkpoints, sources

    data = run.data if hasattr(run, "data") else run._load_data()  # a finished run (resume) loads none itself
    packed = checkpoints.read(folder / "model.pt")
    model = sources.unpack(packed, run.spec, data.num_classes).eval()
    images, _ = next(data.test.batches(64))
    return Result(model=model, rows=pd.read_csv(folder / "metrics.csv"), run_dir=folder,
                  input_shape=data.image_shape, _check_images=images.contiguous())


__all__ = ["Datasets", "Result", "compress", "given_model"]
