"""metrics.csv: one row per stage of a run, appended and flushed as each stage finishes; and the
`compress report` table over many runs."""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Iterable, Sequence

COLUMNS = [
    "run_id", "method", "arch", "dataset", "seed", "stage", "status", "top1", "top5", "loss", "val_top1",
    "params", "params_nonzero", "macs", "params_reduction_pct", "macs_reduction_pct", "top1_delta",
    "latency_ms_b1", "latency_ms_b64", "size_bytes", "wall_s", "experiment", "overrides",
    "latency_iqr_ms_b1", "latency_iqr_ms_b64",  # spread of the latency repeats (torch.utils.benchmark)
    "paper_row",  # the published row the run reproduces (config key paper_row; configs/tables/published.csv)
    "val_from",  # where val_top1's images come from: train (held out of it) or test (a half; top1 on the other)
    "rounds_accepted", "rounds_rolled_back",  # final row of an iterative run: where the schedule ended
    # baseline latency / this row's, timed in alternation with the baseline (compress/deploy/measure.py); and the same
    # with both models exported to ONNX and run by ONNX Runtime at batch 1 (measure.ort_latency)
    "speedup_b1", "speedup_b64", "ort_latency_ms_b1", "ort_speedup_b1",
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


# Optional columns, after COLUMNS, present only when a run measures them: robust top-1 under attack
# (`measure.attacks`, compress/deploy/attacks.py: robust_top1_<attack>_eps<eps>, on the final row); the int8 file's
# top-1 and ONNX Runtime speed-ups (`measure.int8`, compress/deploy/int8.py: int8_top1, int8_speedup_b1, ..., final row).
OPTIONAL_PREFIXES = ("robust_top1_", "int8_")


def columns(rows: Iterable[dict]) -> list[str]:
    """COLUMNS, then the optional columns the rows hold, in the order they are first met (a run's rows
    come from one config, so its attack x epsilon columns keep the config's order)."""
    extra: list[str] = []
    for row in rows:
        extra += [k for k in row if k.startswith(OPTIONAL_PREFIXES) and k not in COLUMNS and k not in extra]
    return COLUMNS + extra


def write_rows(path: Path, rows: Sequence[dict], fieldnames: Sequence[str] | None = None) -> None:
    """(Re)write the whole file: used on resume, so the file matches the rows the run state holds."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames or columns(rows)), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def _header(path: Path) -> list[str]:
    with path.open(newline="") as f:
        return next(csv.reader(f), [])


def append_row(path: Path, row: dict) -> None:
    """Append a row under the file's header. A row that brings optional columns the header lacks (the
    final row's robust top-1) rewrites the file, atomically, with those columns added at the end."""
    header = _header(path) if path.exists() else []
    if not header:
        write_rows(path, [row])
        return
    added = [c for c in columns([row])[len(COLUMNS):] if c not in header]
    if added:
        with path.open(newline="") as f:
            before = list(csv.DictReader(f))
        write_rows(path, [*before, row], fieldnames=header + added)
        return
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        w.writerow(row)
        f.flush()


TEXT_COLUMNS = ("status", "experiment", "overrides", "paper_row")  # read as text, empty = ""


def _natural(text: str) -> list:
    """Sort key that puts a sweep's run 2 before run 10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _run_label(metrics: Path, given: Path, prefix: bool) -> str:
    """The run's directory relative to the DIR it was found under; with several DIRs, under that DIR's name."""
    base = given.parent if given.is_file() else given
    relative = metrics.parent.relative_to(base)
    name = base.resolve().name or str(base)
    if relative == Path("."):  # the DIR is the run itself
        return name
    return str(Path(name) / relative) if prefix else str(relative)


def gather(dirs: Iterable[Path]):
    """Every metrics.csv below `dirs`, as one pandas table with a `run_dir` column: the run's directory
    relative to the DIR given (`0`, `1`, ... for a sweep; the DIR's name when it is the run itself; with
    several DIRs, prefixed by each DIR's name; the paths as found where those labels would collide).
    A file that cannot be read as a CSV is a CompressError naming it."""
    import pandas as pd

    from compress import CompressError

    dirs = [Path(d) for d in dirs]
    found: dict[Path, tuple[Path, Path]] = {}  # one entry per file, even when DIRs overlap
    try:
        for d in dirs:
            files = [d] if d.is_file() else sorted(d.rglob("metrics.csv"), key=lambda f: _natural(str(f.relative_to(d))))
            for f in files:
                found.setdefault(f.resolve(), (f, d))
    except OSError as e:
        raise CompressError(f"{getattr(e, 'filename', None) or d}: cannot list ({e.strerror or e})") from None
    labels = {key: _run_label(f, d, prefix=len(dirs) > 1) for key, (f, d) in found.items()}
    if len(set(labels.values())) < len(labels):
        labels = {key: str(f.parent) for key, (f, _) in found.items()}
    frames = []
    for key, (f, _) in found.items():
        try:
            df = pd.read_csv(f, dtype={col: str for col in TEXT_COLUMNS})
        except (OSError, ValueError) as e:  # unreadable, empty, not CSV, not text
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CompressError(f"{f}: not a readable metrics.csv ({reason})") from None
        for col in TEXT_COLUMNS:  # empty text is "", not NaN
            if col in df:
                df[col] = df[col].fillna("").astype(str)
        df.insert(0, "run_dir", labels[key])
        frames.append(df)
    if not frames:
        return None
    return pd.concat(frames, ignore_index=True)
