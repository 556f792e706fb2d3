"""`compress report | compare | plot DIR...`: the rows of finished (and unfinished) runs, as one table,
beside the papers' rows, or drawn. One route for all of them: `runs_below` gathers every metrics.csv
(compress.report.results.gather), compare.py turns rows into tables, `compare.write_table` writes `-o`
(CSV or Markdown), plot.py draws. Errors are `CompressError`s; the CLI prints them as one line, exit 2."""
from __future__ import annotations

import argparse
from pathlib import Path

from compress import CompressError

REPORT_COLUMNS = ("run_dir,experiment,overrides,method,arch,stage,status,top1,top1_delta,params,params_reduction_pct,"
                  "macs,macs_reduction_pct,latency_ms_b1,size_bytes")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argument parser whose usage errors are one line and exit 2, like every other error."""
    p = argparse.ArgumentParser(prog=prog, description=description)

    def refuse(message: str):
        raise CompressError(f"{prog}: {message}")

    p.error = refuse  # type: ignore[method-assign]
    return p


def runs_below(dirs: list[Path]):
    """Every metrics.csv below `dirs` as one DataFrame; a missing DIR, or no metrics.csv, is one line."""
    from compress.report.results import gather

    for d in dirs:
        if not d.exists():
            raise CompressError(f"{d}: no such directory")
    table = gather(dirs)
    if table is None:
        raise CompressError(f"no metrics.csv below {', '.join(map(str, dirs))}")
    return table


def table_output(path: Path | None, suffixes: tuple[str, ...] = (".csv", ".md")) -> Path | None:
    """`-o FILE`, checked before any work: its extension says the format."""
    if path is not None and path.suffix.lower() not in suffixes:
        raise CompressError(f"{path}: -o must end with {' or '.join(suffixes)}")
    return path


def report(argv: list[str]) -> None:
    """`compress report DIR...`: every stage row below DIRs in one table (CSV, by default report.csv)."""
    from compress.report import compare

    p = parser("compress report", "Gather every metrics.csv below DIRs (one line per stage).")
    p.epilog = ("--summary [--mean-over KEYS]: one line per run instead (mean and spread over the runs that "
                "differ only in KEYS, e.g. seed); see `compress report --summary --help`")
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, default=Path("report.csv"), help="FILE.csv (default report.csv) or FILE.md")
    p.add_argument("--columns", default=REPORT_COLUMNS, help="comma-separated columns to print")
    args = p.parse_args(argv)
    table_output(args.output)
    table = runs_below(args.dirs)
    shown = [c for c in args.columns.split(",") if c in table.columns]
    # every stage row as stored (counts unabbreviated, two decimals), unlike --summary's formatted cells
    text = table[shown].to_markdown(index=False, floatfmt=".2f")
    compare.write_table(table, args.output, list(table.columns), text)
    print(text)
    print(f"\n{len(table)} rows from {table['run_dir'].nunique()} runs -> {args.output}")


def report_summary(argv: list[str]) -> None:
    """`compress report DIR... --summary`: one line per run instead of one per stage."""
    from compress.report import compare

    p = parser("compress report --summary", "One line per run: baseline -> final top-1, reductions, wall time.")
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("--summary", action="store_true", help="one line per run (this table)")
    p.add_argument("--mean-over", metavar="KEYS", help="merge the runs that differ only in these comma-separated "
                   "override keys (e.g. seed): mean, spread, min and max of the final top-1")
    p.add_argument("-o", "--output", type=Path, help="also write the table: FILE.csv or FILE.md")
    args = p.parse_args(argv)
    table_output(args.output)
    keys = [k.strip() for k in (args.mean_over or "").split(",") if k.strip()]
    if args.mean_over is not None and not keys:
        raise CompressError("--mean-over: name at least one override key (e.g. --mean-over seed)")
    gathered = runs_below(args.dirs)
    table = compare.summary(gathered)
    runs = len(table)
    if keys:
        table = compare.mean_over(compare.runs(gathered, resolve=lambda name: ""), keys)
        text = compare.markdown(table, compare.MEAN_COLUMNS)
        columns = compare.MEAN_COLUMNS
    else:
        text, columns = compare.summary_markdown(table), compare.SUMMARY_COLUMNS
    if args.output is not None:
        compare.write_table(table, args.output, columns, text)
    print(text)
    shown = f"{runs} runs" + (f" in {len(table)} settings (over {', '.join(keys)})" if keys else "")
    print(f"\n{shown}" + (f" -> {args.output}" if args.output is not None else ""))


def compare_runs(argv: list[str]) -> None:
    """`compress compare DIR...`: one line per run beside its linked published row."""
    from compress.report import compare

    p = parser("compress compare", "Our runs beside the published rows they reproduce (one line per run).")
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, help="also write the table: FILE.csv (every column) or FILE.md")
    p.add_argument("--published", type=Path, help="CSV of published rows (default: the package's table)")
    args = p.parse_args(argv)
    table_output(args.output)
    runs = runs_below(args.dirs)
    table = compare.compare(runs, compare.load_published(args.published))
    text = compare.markdown(table, compare.COMPARE_MARKDOWN_COLUMNS)
    if args.output is not None:
        compare.write_table(table, args.output, compare.COMPARE_CSV_COLUMNS, text)
    print(text)
    linked = int((table["paper_top1"].notna()).sum())
    print(f"\n{len(table)} runs, {linked} beside a published row" + (f" -> {args.output}" if args.output else ""))


def plot_runs(argv: list[str]) -> None:
    """`compress plot DIR... -o FILE.png`: top-1 vs parameters and vs MACs, one row of panels per arch."""
    from compress.report import compare, plot

    p = parser("compress plot", "Top-1 against parameters and MACs: our runs, the papers' rows, the Pareto front.")
    p.add_argument("dirs", nargs="+", type=Path)
    p.add_argument("-o", "--output", type=Path, default=Path("plot.png"), help="FILE.png|.pdf|.svg (default plot.png)")
    p.add_argument("--published", type=Path, help="CSV of published rows (default: the package's table)")
    p.add_argument("--rounds", action="store_true",
                   help="each iterative run's course instead: top-1 and parameters removed, round by round")
    args = p.parse_args(argv)
    plot.check_output(args.output)
    runs = runs_below(args.dirs)
    if args.rounds:
        drawn = plot.plot_rounds(runs, compare.load_published(args.published), args.output)
        print(f"{drawn} run{'' if drawn == 1 else 's'}, round by round -> {args.output}")
        return
    published = compare.load_published(args.published)
    table = compare.compare(runs, published)
    if table.empty:
        raise CompressError(f"nothing to plot: the metrics.csv below {', '.join(map(str, args.dirs))} hold no rows")
    rows = plot.plot(table, published, args.output)
    finished = int((table["stage"] == "final").sum())
    print(f"{finished} finished runs of {len(table)}, {rows} architecture(s) -> {args.output}")
