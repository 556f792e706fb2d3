"""Our runs beside the papers' published numbers: one line per run (`compress compare`,
`compress report --summary`). Pure functions on pandas tables; the figures are in `compress/report/plot.py`.

A run is the rows of one metrics.csv (`compress.report.results.gather`): `baseline`, `compressed`,
`round_<k>`, `final`. Its line takes `baseline_top1` from the baseline row, `pre_top1` from the
compressed row, and `top1`, params, MACs and reductions from the final row; a run not finished yet shows
its last recorded stage instead (column `stage`; a rolled-back round does not count).

A run links to a published row by id: its `paper_row` column when the run wrote one, otherwise (runs from
before that column) the `paper_row` of the experiment that made it (the ApproxConv table's column, or the
key in the experiment's YAML file), looked up once per experiment name; a name that resolves to nothing
means "no link".
"""
from __future__ import annotations

import functools
import math
import re
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from compress import CompressError

# The published table (configs/tables/published.csv, `compress.report.papers.published()`): one row per entry
# of a paper's result table; params and macs are absolute counts.
PUBLISHED_COLUMNS = ("id", "paper", "table", "row", "arch", "dataset", "method", "setting", "baseline_top1",
                     "pre_top1", "top1", "params", "params_reduction_pct", "macs", "macs_reduction_pct", "note")
PUBLISHED_NUMBERS = ("baseline_top1", "pre_top1", "top1", "params", "params_reduction_pct", "macs",
                     "macs_reduction_pct")

# Our numbers per run, in the order printed.
RUN_COLUMNS = ("run", "experiment", "arch", "method", "stage", "baseline_top1", "pre_top1", "top1", "params",
               "params_nonzero", "macs", "params_reduction_pct", "macs_reduction_pct", "wall_s")
PAPER_COLUMNS = ("paper_row", "paper_baseline_top1", "paper_pre_top1", "paper_top1", "paper_params", "paper_macs",
                 "paper_params_reduction_pct", "paper_macs_reduction_pct", "top1_vs_paper", "note")
# `compress compare`: the Markdown table drops what the CSV keeps for scripts (overrides, wall time).
COMPARE_CSV_COLUMNS = RUN_COLUMNS + PAPER_COLUMNS + ("overrides",)
COMPARE_MARKDOWN_COLUMNS = tuple(c for c in RUN_COLUMNS + PAPER_COLUMNS if c != "wall_s")
# `compress report --summary`.
SUMMARY_COLUMNS = ("run", "experiment", "overrides", "method", "arch", "stage", "baseline_top1", "top1",
                   "params_reduction_pct", "macs_reduction_pct", "wall_s")

_METRIC_NUMBERS = ("top1", "params", "params_nonzero", "macs", "params_reduction_pct", "macs_reduction_pct", "wall_s")
_COUNTS = {"params", "params_nonzero", "macs", "paper_params", "paper_macs"}
_TEXT = {"run", "experiment", "arch", "method", "stage", "overrides", "paper_row", "note", "setting"}  # left-aligned


# --- the published table ---------------------------------------------------------------------------

def check_published(table, source: str):
    """The published table with its id as text and its numbers as floats (NaN where empty or not a
    number); one row per id (the first). A missing column is a CompressError naming `source`."""
    import pandas as pd

    missing = [c for c in PUBLISHED_COLUMNS if c not in table.columns]
    if missing:
        raise CompressError(f"{source}: missing columns {', '.join(missing)} (a published table has "
                            f"{', '.join(PUBLISHED_COLUMNS)})")
    table = table.copy()
    for c in PUBLISHED_COLUMNS:
        if c not in PUBLISHED_NUMBERS:
            table[c] = table[c].fillna("").astype(str).str.strip()
    for c in PUBLISHED_NUMBERS:
        table[c] = pd.to_numeric(table[c], errors="coerce").astype(float)
    table = table[table["id"] != ""]
    return table.drop_duplicates("id", keep="first").reset_index(drop=True)


def load_published(path: Path | None = None):
    """The published rows: from `path`, or the package's table (`compress.report.papers.published()`) when
    `path` is None."""
    import pandas as pd

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise CompressError(f"{path}: no such file (--published names a CSV of published rows)")
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (OSError, ValueError) as e:
            raise CompressError(f"{path}: not a readable CSV ({_first_line(e)})") from None
        return check_published(table, str(path))
    from compress.report import papers

    try:
        table = papers.published()
    except Exception as e:  # a broken package table: one line, not a traceback
        raise CompressError(f"published table: {_first_line(e)} (or name one with --published FILE)") from None
    return check_published(table, "compress.report.papers.published()")


# --- linking a run to its paper row --------------------------------------------------------------

# An experiment's name as it can appear in a metrics.csv: a file name under configs/experiment/, nothing else.
_EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


@functools.lru_cache(maxsize=None)
def experiment_paper_row(name: str) -> str:
    """The `paper_row` of experiment `name`, for runs written before runs recorded their own ("" when
    there is none): the ApproxConv table's column for the rows it generates, else the key as written in
    configs/experiment/<name>.yaml. Read as YAML, not composed: every experiment file sets the key itself,
    so the link needs neither Hydra nor a config that still composes."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException
    from yaml import YAMLError

    from compress.report.papers import approxconv_rows

    if not _EXPERIMENT_NAME.fullmatch(name or ""):
        return ""
    try:
        for row in approxconv_rows():
            if row.name == name:
                return row.paper_row
    except (OSError, ValueError):  # a broken ApproxConv table: `compress run` says so; here, no link
        pass
    source = resources.files("compress.configs").joinpath("experiment", f"{name}.yaml")
    try:
        value = OmegaConf.create(source.read_text(encoding="utf-8")).get("paper_row")
    except (OSError, YAMLError, OmegaConfBaseException):  # gone, or not a mapping: no link
        return ""
    return str(value).strip() if value else ""


def _link(run: dict, resolve: Callable[[str], str], wrote_column: bool = False) -> str:
    own = str(run.get("paper_row") or "").strip()
    if own and own.lower() != "nan":
        return own
    if wrote_column:  # the run chose no row (paper_row=null): no fallback to its experiment's
        return ""
    experiment = str(run.get("experiment") or "").strip()
    if not experiment or experiment.lower() == "nan":
        return ""
    return str(resolve(experiment) or "").strip()


# --- one line per run ------------------------------------------------------------------------------

def _number(value) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return math.nan
    return x


def _text(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def runs(table, resolve: Callable[[str], str] | None = None):
    """One line per run of a `gather` table: RUN_COLUMNS, `overrides` and the linked `paper_row` (see
    the module docstring). `resolve(experiment) -> paper_row` defaults to `experiment_paper_row`."""
    import pandas as pd

    resolve = resolve or experiment_paper_row
    if "run_dir" not in table.columns:
        raise ValueError("runs(): expects compress.report.results.gather's table (a run_dir column)")
    table = table.copy()
    if "stage" not in table.columns:
        table["stage"] = ""
    for c in _METRIC_NUMBERS:
        table[c] = pd.to_numeric(table[c], errors="coerce") if c in table.columns else math.nan
    # Runs from before the paper_row column have no value there at all (NaN after gather's concat); a run
    # that wrote the column and left it empty chose no row.
    table["_wrote_paper_row"] = table["paper_row"].notna() if "paper_row" in table.columns else False
    for c in ("experiment", "overrides", "method", "arch", "status", "paper_row"):
        table[c] = table[c].map(_text) if c in table.columns else ""
    table["stage"] = table["stage"].map(_text)
    # A metrics.csv of another tool (no stage column, e.g. a Lightning CSV log) below DIR: not a run.
    staged = table.groupby("run_dir", sort=False)["stage"].transform(lambda stages: (stages != "").any())
    if len(table) and not staged.any():
        foreign = ", ".join(dict.fromkeys(table["run_dir"].astype(str)))
        raise CompressError(f"{foreign}: metrics.csv without a 'stage' column: not written by compress")
    table = table[staged.astype(bool)] if len(table) else table
    lines = []
    for run_dir, rows in table.groupby("run_dir", sort=False):
        recs = rows.to_dict("records")
        by_stage = {r["stage"]: r for r in recs}  # a stage written twice: the last one
        kept = [r for r in recs if r["status"] != "rolled_back"] or recs
        last = by_stage.get("final") or kept[-1]
        first = recs[0]
        some = lambda key, recs=recs: next((r[key] for r in reversed(recs) if r[key]), "")
        line = {
            "run": str(run_dir), "experiment": some("experiment"), "arch": some("arch") or first["arch"],
            "method": some("method"), "stage": last["stage"],
            "baseline_top1": by_stage["baseline"]["top1"] if "baseline" in by_stage else math.nan,
            "pre_top1": by_stage["compressed"]["top1"] if "compressed" in by_stage else math.nan,
            "top1": last["top1"], "params": last["params"], "params_nonzero": last["params_nonzero"],
            "macs": last["macs"], "params_reduction_pct": last["params_reduction_pct"],
            "macs_reduction_pct": last["macs_reduction_pct"],
            "wall_s": round(float(rows["wall_s"].sum(min_count=1)), 3), "overrides": some("overrides"),
            "paper_row": some("paper_row"),
        }
        line["paper_row"] = _link(line, resolve, wrote_column=bool(rows["_wrote_paper_row"].any()))
        lines.append(line)
    return pd.DataFrame(lines, columns=list(RUN_COLUMNS) + ["overrides", "paper_row"])


def compare(table, published=None, resolve: Callable[[str], str] | None = None):
    """`runs(table)` joined with its linked published rows: COMPARE_CSV_COLUMNS. Runs without a link keep
    empty paper columns; a link to an id the published table lacks keeps them empty with a `note`.
    `top1_vs_paper` is our final top-1 minus the paper's top-1 (finished runs only)."""
    import pandas as pd

    ours = runs(table, resolve)
    index = {} if published is None else {r["id"]: r for r in published.to_dict("records")}
    out = []
    for line in ours.to_dict("records"):
        row = index.get(line["paper_row"]) if line["paper_row"] else None
        for c in PUBLISHED_NUMBERS:
            line[f"paper_{c}"] = row[c] if row is not None else math.nan
        notes = []
        if line["paper_row"] and row is None:
            notes.append(f"paper row {line['paper_row']} not in the published table" if published is not None
                         else "no published table (name one with --published FILE)")
        if line["stage"] != "final":
            notes.append(f"not finished: numbers from stage {line['stage'] or '?'}")
        finished = line["stage"] == "final"
        line["top1_vs_paper"] = (round(line["top1"] - line["paper_top1"], 3) if finished and row is not None
                                 and not math.isnan(line["top1"]) and not math.isnan(line["paper_top1"]) else math.nan)
        line["note"] = "; ".join(notes)
        out.append(line)
    return pd.DataFrame(out, columns=list(COMPARE_CSV_COLUMNS))


def summary(table):
    """`compress report --summary`: one line per run (SUMMARY_COLUMNS); wall_s is the sum over its stages."""
    ours = runs(table, resolve=lambda name: "")  # the summary shows no paper: no lookup
    return ours[list(SUMMARY_COLUMNS)]


# `compress report --summary --mean-over seed`: the runs of one setting as one line.
MEAN_COLUMNS = ("experiment", "setting", "method", "arch", "runs", "finished", "pre_top1", "top1_mean", "top1_std",
                "top1_min", "top1_max", "params", "macs", "params_reduction_pct", "macs_reduction_pct", "wall_s")
_OVERRIDE_SPLIT = re.compile(r",(?=[+~]*[\w.@/-]+=)")  # between overrides, not inside a value ("[0.]+[0.18]*29")


def setting_of(overrides: str, keys: Sequence[str]) -> str:
    """A run's overrides without those of `keys` (the repeats: seed=...): what its repeats share."""
    kept = [o for o in _OVERRIDE_SPLIT.split(overrides or "") if o and o.split("=", 1)[0].lstrip("+~") not in keys]
    return ",".join(kept)


def mean_over(frame, keys: Sequence[str]):
    """`runs(table)` with the runs that differ only in `keys` (e.g. seed) merged into one line: how
    many runs and how many finished, the means of their numbers and, for the final top-1, the sample
    standard deviation, minimum and maximum over the finished runs. `setting` is a line's overrides
    without `keys` and without the overrides every line shares."""
    import pandas as pd

    frame = frame.copy()
    settings = [setting_of(o, keys) for o in frame["overrides"]]
    # What every run shares (the data set, the budget) says nothing about a line: shown once, not per line.
    split = [_OVERRIDE_SPLIT.split(x) if x else [] for x in settings]
    shared = set.intersection(*map(set, split)) if split and len(set(settings)) > 1 else set()
    frame["setting"] = [",".join(o for o in parts if o not in shared) for parts in split]
    lines = []
    for (experiment, setting, method, arch), group in frame.groupby(["experiment", "setting", "method", "arch"],
                                                                   sort=False, dropna=False):
        done = group[group["stage"] == "final"]
        top1 = pd.to_numeric(done["top1"], errors="coerce").dropna()
        lines.append({
            "experiment": experiment, "setting": setting, "method": method, "arch": arch, "runs": len(group),
            "finished": len(done), "pre_top1": pd.to_numeric(group["pre_top1"], errors="coerce").mean(),
            "top1_mean": top1.mean() if len(top1) else math.nan,
            "top1_std": top1.std(ddof=1) if len(top1) > 1 else math.nan,
            "top1_min": top1.min() if len(top1) else math.nan, "top1_max": top1.max() if len(top1) else math.nan,
            **{c: pd.to_numeric(done[c], errors="coerce").mean() if len(done) else math.nan
               for c in ("params", "macs", "params_reduction_pct", "macs_reduction_pct", "wall_s")},
        })
    return pd.DataFrame(lines, columns=list(MEAN_COLUMNS))


# --- output ---------------------------------------------------------------------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _count(x: float) -> str:
    """Parameters / MACs for reading: 269.7K, 40.55M, 4.11G."""
    if abs(x) >= 1e9:
        return f"{x / 1e9:.2f}G"
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e4:
        return f"{x / 1e3:.1f}K"
    return f"{x:.0f}"


def _cell(column: str, value) -> str:
    if isinstance(value, str):
        return value.replace("|", "\\|").replace("\n", " ")
    x = _number(value)
    if math.isnan(x):
        return ""
    if column in _COUNTS:
        return _count(x)
    if column in ("runs", "finished"):
        return f"{x:.0f}"
    if column == "top1_vs_paper":
        return f"{x:+.2f}"
    if column == "wall_s":
        return f"{x:.0f}"
    return f"{x:.2f}"


def markdown(frame, columns) -> str:
    """A Markdown table of `columns`, numbers formatted per column (counts as K/M/G, accuracies with two
    decimals), empty cells for missing values."""
    from tabulate import tabulate

    columns = [c for c in columns if c in frame.columns]
    body = [[_cell(c, r[c]) for c in columns] for r in frame.to_dict("records")]
    align = ["left" if c in _TEXT else "right" for c in columns]
    return tabulate(body, headers=columns, tablefmt="pipe", disable_numparse=True, colalign=align)


def summary_markdown(frame) -> str:
    """`report --summary` on screen: baseline -> final top-1 in one column."""
    shown = frame.copy()
    shown["top1 (baseline -> final)"] = [
        f"{_cell('top1', b) or '?'} -> {_cell('top1', t) or '?'}" for b, t in zip(frame["baseline_top1"], frame["top1"])]
    columns = [c for c in SUMMARY_COLUMNS if c not in ("baseline_top1", "top1")]
    columns.insert(columns.index("params_reduction_pct"), "top1 (baseline -> final)")
    return markdown(shown, columns)


def write_table(frame, path: Path, csv_columns, markdown_text: str) -> None:
    """`-o FILE.csv` (csv_columns) or `-o FILE.md` (the Markdown shown); another extension is an error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".md"):
        raise CompressError(f"{path}: -o must end with .csv or .md")
    try:
        if suffix == ".csv":
            frame[[c for c in csv_columns if c in frame.columns]].to_csv(path, index=False)
        else:
            path.write_text(markdown_text + "\n", encoding="utf-8")
    except OSError as e:
        raise CompressError(f"{path}: cannot write ({e.strerror or _first_line(e)})") from None
