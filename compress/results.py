"""metrics.csv: one row per stage of a run, appended and flushed as each stage finishes; and the
`compress report` table over many runs."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Iterable, Sequence

COLUMNS = [
    "run_id", "method", "arch", "dataset", "seed", "stage", "status", "top1", "top5", "loss", "val_top1",
    "params", "params_nonzero", "macs", "params_reduction_pct", "macs_reduction_pct", "top1_delta",
    "latency_ms_b1", "latency_ms_b64", "size_bytes", "wall_s", "experiment", "overrides",
    "latency_iqr_ms_b1", "latency_iqr_ms_b64",  # spread of the latency repeats (torch.utils.benchmark)
]


def with_reductions(row: dict, baseline: dict | None) -> dict:
    """Fill the columns measured relative to the baseline row (the loaded, uncompressed model)."""
    row = dict(row)
    if baseline is None:
        baseline = row
    pct = lambda new, old: round(100.0 * (1 - new / old), 3) if old else float("nan")  # noqa: E731
    row["params_reduction_pct"] = pct(row["params_nonzero"], baseline["params_nonzero"])
    row["macs_reduction_pct"] = pct(row["macs"], baseline["macs"])
    row["top1_delta"] = round(row["top1"] - baseline["top1"], 3) if not math.isnan(row["top1"]) else float("nan")
    return row


def write_rows(path: Path, rows: Sequence[dict]) -> None:
    """(Re)write the whole file: used on resume, so the file matches the rows the run state holds."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def append_row(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()


def gather(dirs: Iterable[Path]):
    """Every metrics.csv below `dirs`, as one pandas table with a `run_dir` column."""
    import pandas as pd

    frames = []
    for d in dirs:
        d = Path(d)
        files = [d] if d.is_file() else sorted(d.rglob("metrics.csv"))
        for f in files:
            df = pd.read_csv(f)
            for col in ("status", "experiment", "overrides"):  # empty text is "", not NaN
                if col in df:
                    df[col] = df[col].fillna("").astype(str)
            df.insert(0, "run_dir", str(f.parent))
            frames.append(df)
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True)
