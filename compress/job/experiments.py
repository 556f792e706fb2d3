"""Experiment configs that are rows of a table: the ApproxConv paper's rows, from `configs/tables/approxconv.csv`.

Each row becomes the experiment `experiment=<name>` in Hydra's ConfigStore (group `experiment`, package
`_global_`), composed exactly as a hand-written `configs/experiment/<name>.yaml` would be:

    defaults:
      - override /dataset: imagenet        # ImageNet rows only (CIFAR-10 is the default data set)
      - override /arch: <arch>
      - override /method: approxconv
      - override /schedule: approxconv_cifar | approxconv_imagenet
    method:
      series: <series>                     # when the row names one (Conv2D rows keep the default)
      harmonics: <harmonics>               # [3, 3, 2, 2] | "7x3,7x3,5x9,4x3" | null
      quant_bits: <bits>                   # when the row quantises
    paper_row: <paper_row>                 # the published row it reproduces (configs/tables/published.csv)

so `compress run experiment=approxconv_resnet20_cos_3322` and sweeps such as
`compress run -m "experiment=glob(approxconv_resnet20_*)"` work as with files.

The table's columns and its reader: `compress.report.papers` (the papers' tables, as package data).
"""
from __future__ import annotations

from typing import Any

from hydra.core.config_store import ConfigStore

from compress.report.papers import ApproxConvRow, approxconv_rows

DEFAULT_DATASET = "cifar10"  # the primary config's; rows on it override no data set, as the files did
SCHEDULES = {"cifar10": "approxconv_cifar", "imagenet": "approxconv_imagenet"}


def experiment_node(row: ApproxConvRow) -> dict[str, Any]:
    """The config of `experiment=<row.name>`: what its YAML file held (see the module docstring)."""
    defaults: list[dict[str, str]] = []
    if row.dataset != DEFAULT_DATASET:
        defaults.append({"override /dataset": row.dataset})
    defaults += [
        {"override /arch": row.arch},
        {"override /method": "approxconv"},
        {"override /schedule": SCHEDULES[row.dataset]},
    ]
    method: dict[str, Any] = {} if row.series is None else {"series": row.series}
    method["harmonics"] = row.harmonics
    if row.quant_bits is not None:
        method["quant_bits"] = row.quant_bits
    return {"defaults": defaults, "method": method, "paper_row": row.paper_row}


def register_experiments(cs: ConfigStore) -> None:
    """Store every table row as `experiment/<name>` (package `_global_`). Storing again replaces the nodes."""
    for row in approxconv_rows():
        cs.store(group="experiment", name=row.name, node=experiment_node(row), package="_global_")
