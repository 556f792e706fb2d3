"""The papers' published numbers, as package data: `configs/tables/published.csv`.

One row per entry of every result table in the four papers (CFDP, ApproxConv, FGFP, SCAP): other methods'
rows and baselines included, ablations and the CFDP FGSM/PGD table too. A run names the row it
reproduces with the top-level config key `paper_row: <id>` (experiment YAML files and the ApproxConv
table's `paper_row` column set it), and metrics.csv carries it.

Columns:
- `id` — stable and unique: `<paper>-<table>-<arch>-<row>` (e.g. `cfdp-t2-resnet56-cfdp-1`,
  `approxconv-t1-resnet20-cos-3322`); `paper` (cfdp | approxconv | fgfp | scap); `table` as the paper
  names it ("Table 2"; "Key Results" / "Abstract" where only a summary is public); `row` (the row's
  label as printed); `arch` (this project's arch name); `dataset` (cifar10 | imagenet); `method` (as
  printed; "Baseline" for the uncompressed model); `setting` (what distinguishes the row: harmonics,
  bits, attack and epsilon, block size ...).
- numbers, copied as printed (empty where the paper prints nothing): `baseline_top1` (the table's
  reference model), `pre_top1` (after compression, before fine-tuning), `top1`, `params` and `macs`
  (absolute counts: 0.85M -> 850000; FLOPs as the papers count them = MACs), `params_reduction_pct`,
  `macs_reduction_pct` (percent removed), `top1_delta` (the printed change of top-1, in points).
- `note` — what a number means where the table is unusual, and every value that looks wrong.

The ApproxConv paper's rows are also experiments, one per row of `configs/tables/approxconv.csv`
(`approxconv_rows()`; `compress.job.experiments` makes each an `experiment=<name>` config).
The table's columns: `name`; `table` (the paper's table); `arch`; `dataset` (cifar10 | imagenet); `series`
(cos: CosConv | cheb: ChebConv | empty: a Conv2D row, no series); `harmonics` as the paper writes them
("3,3,2,2": one order per group, see docs/approxconv.md; "7x3,7x3,5x9,4x3": ConvNeXt's order x blocks;
empty: nothing approximated); `quant_bits` (empty: no quantisation); `paper_row` (the id of the row in
`configs/tables/published.csv` that the experiment reproduces); the paper's printed numbers
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
import functools
import io
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from compress import CompressError

PUBLISHED_TABLE = "tables/published.csv"  # inside the package `compress.configs` (the repository's configs/)
TEXT_COLUMNS = ("id", "paper", "table", "row", "arch", "dataset", "method", "setting", "note")
NUMBER_COLUMNS = ("baseline_top1", "pre_top1", "top1", "params", "params_reduction_pct", "macs",
                  "macs_reduction_pct", "top1_delta")
COLUMNS = TEXT_COLUMNS[:-1] + NUMBER_COLUMNS[:-1] + ("note", "top1_delta")  # the file's order


def _typed(record: dict[str, str]) -> dict[str, Any]:
    row: dict[str, Any] = {c: (record.get(c) or "") for c in TEXT_COLUMNS}
    for c in NUMBER_COLUMNS:
        text = (record.get(c) or "").strip()
        row[c] = float(text) if text else math.nan
    return row


@functools.lru_cache(maxsize=1)
def _rows() -> tuple[dict[str, Any], ...]:
    """Every row, typed (text: str, "" when empty; numbers: float, NaN when empty). A malformed table is a
    packaging bug: ValueError."""
    text = resources.files("compress.configs").joinpath(PUBLISHED_TABLE).read_text(encoding="utf-8")
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{PUBLISHED_TABLE}: missing columns {', '.join(missing)}")
    rows = tuple(_typed(record) for record in reader)
    ids = [r["id"] for r in rows]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates or "" in ids:
        raise ValueError(f"{PUBLISHED_TABLE}: ids must be unique and non-empty ({', '.join(duplicates)})")
    return rows


@functools.lru_cache(maxsize=1)
def ids() -> frozenset[str]:
    """Every row id (cheap: no pandas; `Config` checks `paper_row` against it)."""
    return frozenset(r["id"] for r in _rows())


def published():
    """The whole table as a pandas DataFrame, in the file's column order: text columns str ("" when
    empty), number columns float (NaN when empty)."""
    import pandas as pd

    frame = pd.DataFrame([dict(r) for r in _rows()], columns=list(COLUMNS))
    return frame.astype({**{c: str for c in TEXT_COLUMNS}, **{c: float for c in NUMBER_COLUMNS}})


def row(id: str) -> dict[str, Any]:  # noqa: A002 - the column's name
    """One row by id, as a dict (text: str, numbers: float, NaN when empty)."""
    check(id)
    found = next(r for r in _rows() if r["id"] == id)
    return {c: found[c] for c in COLUMNS}


def check(id: Any, key: str = "paper_row") -> None:  # noqa: A002
    """CompressError naming `key` unless `id` is the id of a row."""
    if not isinstance(id, str) or id not in ids():
        import reprlib

        raise CompressError(f"{key}: unknown id {reprlib.repr(id)} (see configs/tables/published.csv)")


# --- the ApproxConv experiment table ---------------------------------------------------------------

APPROXCONV_TABLE = "tables/approxconv.csv"  # inside the package `compress.configs` (the repository's configs/)
APPROXCONV_DATASETS = ("cifar10", "imagenet")  # each has its fine-tuning schedule (compress.job.experiments)
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
    if record["dataset"] not in APPROXCONV_DATASETS:
        raise ValueError(f"{APPROXCONV_TABLE}: row {record['name']}: dataset must be one of {', '.join(APPROXCONV_DATASETS)}")
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
