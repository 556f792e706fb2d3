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
"""
from __future__ import annotations

import csv
import functools
import io
import math
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
