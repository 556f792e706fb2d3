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

The table's columns: `name`; `table` (the paper's table); `arch`; `dataset` (cifar10 | imagenet); `series`
(cos: CosConv | cheb: ChebConv | empty: a Conv2D row, no series); `harmonics` as the paper writes them
("3,3,2,2": one order per group, see docs/approxconv.md; "7x3,7x3,5x9,4x3": ConvNeXt's order x blocks;
empty: nothing approximated); `quant_bits` (empty: no quantisation); `paper_row` (the id of the row in
`configs/tables/published.csv`, `compress.report.papers`, that the experiment reproduces); the paper's printed numbers
`paper_pre_top1` (before fine-tuning), `paper_post_top1`, `paper_quant_top1` (Table 4: top-1 after
quantisation-aware fine-tuning), `paper_params_m` (millions), `paper_size_mb`; and a `note` on them.

The paper's tables:
- Table 1, CIFAR-10 ResNet-20/32: harmonics per block [stem, stage1, stage2, stage3]; fine-tuned with the
  public code's CIFAR recipe (5 epochs, SGD lr 1e-3 constant). Its params column is ResNet-32's.
- Table 2, ImageNet ResNet-18: harmonics [7x7 stem, stage1, stage2, stage3, stage4]; the 1x1 downsample
  convs stay ordinary.
- Table 3, ImageNet ConvNeXt-T: CosConv on the 7x7 depthwise convs, one order per block ('NxR' = order N
  for R blocks); the 4x4 stem, 2x2 downsampling and 1x1 layers stay ordinary. Params: the compressible ones.
- Table 4, ImageNet ResNet-18 quantised: coefficients (Conv2D rows: weights) and activations quantised to
  8 or 4 bits during fine-tuning, from the pretrained model in one run; the model size is the paper's
  convention (docs/approxconv.md).
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from hydra.core.config_store import ConfigStore

APPROXCONV_TABLE = "tables/approxconv.csv"  # inside the package `compress.configs` (the repository's configs/)
DEFAULT_DATASET = "cifar10"  # the primary config's; rows on it override no data set, as the files did
SCHEDULES = {"cifar10": "approxconv_cifar", "imagenet": "approxconv_imagenet"}
CONFIG_COLUMNS = ("name", "table", "arch", "dataset", "series", "harmonics", "quant_bits")
# Also required, and kept verbatim in `paper` too (the link to the published numbers): the row's paper_row.
REQUIRED_COLUMNS = CONFIG_COLUMNS + ("paper_row",)


@dataclass(frozen=True)
class ApproxConvRow:
    """One row of the table: what the experiment sets, and the paper's numbers as printed (text)."""

    name: str
    table: str
    arch: str
    dataset: str
    series: str | None
    harmonics: list[int] | str | None
    quant_bits: int | None
    paper_row: str = ""  # the published row's id (configs/tables/published.csv)
    paper: dict[str, str] = field(default_factory=dict)  # paper_row, the paper_* columns and the note, verbatim


def parse_harmonics(text: str) -> list[int] | str | None:
    """The table's harmonics as the method option: "3,3,2,2" -> [3, 3, 2, 2]; the "NxR" notation stays a
    string (the method expands it); empty -> None (nothing approximated)."""
    text = text.strip()
    if not text:
        return None
    if "x" in text:
        return text
    return [int(order) for order in text.split(",")]


def parse_row(record: dict[str, str]) -> ApproxConvRow:
    """A CSV record -> a row; a malformed table is a packaging bug, so it fails loudly (ValueError)."""
    missing = [column for column in REQUIRED_COLUMNS if column not in record]
    if missing:
        raise ValueError(f"{APPROXCONV_TABLE}: missing columns {', '.join(missing)}")
    if not (record["paper_row"] or "").strip():
        raise ValueError(f"{APPROXCONV_TABLE}: row {record['name']}: paper_row is empty")
    if record["dataset"] not in SCHEDULES:
        raise ValueError(f"{APPROXCONV_TABLE}: row {record['name']}: dataset must be one of {', '.join(SCHEDULES)}")
    return ApproxConvRow(
        name=record["name"],
        table=record["table"],
        arch=record["arch"],
        dataset=record["dataset"],
        series=record["series"] or None,
        harmonics=parse_harmonics(record["harmonics"]),
        quant_bits=int(record["quant_bits"]) if record["quant_bits"] else None,
        paper_row=record["paper_row"].strip(),
        paper={key: value for key, value in record.items() if key not in CONFIG_COLUMNS},
    )


def read_rows(text: str) -> list[ApproxConvRow]:
    rows = [parse_row(record) for record in csv.DictReader(io.StringIO(text))]
    names = [row.name for row in rows]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{APPROXCONV_TABLE}: duplicate names {', '.join(duplicates)}")
    return rows


def approxconv_rows() -> list[ApproxConvRow]:
    """Every row of the installed table, in its order."""
    return read_rows(resources.files("compress.configs").joinpath(APPROXCONV_TABLE).read_text(encoding="utf-8"))


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
