"""`compress plot`: top-1 against parameters and against MACs, our runs beside the papers' rows.

One figure, one row of two panels (parameters, MACs) per architecture, so `-o FILE.png` is always the
one file written. In each panel:
- a colour per method (a paper's label that our runs link to takes our method's colour: ApproxConv's
  "CosConv" / "ChebConv" rows are `approxconv`);
- our finished runs (their final rows) filled, at non-zero parameters / MACs;
- the published rows hollow: the rows our runs link to and every other row of the same paper tables for
  the same architecture; a dotted line from a run to its linked row; where that row prints no parameters
  or MACs, its top-1 as a dash at our run's cost;
- the Pareto front of our runs as a step line (the best top-1 for at most that cost); our baseline
  top-1 as a dashed horizontal line.
Rendered on matplotlib's Agg canvas (headless: no display, no pyplot state).
"""
from __future__ import annotations

import math
from pathlib import Path

from compress import CompressError

FORMATS = (".png", ".pdf", ".svg")
PANELS = (("params", "parameters (non-zero)"), ("macs", "MACs per image"))


def check_output(path: Path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise CompressError(f"{path}: -o must end with {', '.join(FORMATS)}")
    return path


def _figure(size: tuple[float, float]):
    """A figure on matplotlib's Agg canvas (headless, no pyplot state), laid out by constrained layout."""
    import matplotlib

    matplotlib.rcParams["svg.hashsalt"] = "compress"  # reproducible SVG ids
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    """Write the figure (its parent dir made if missing); an unwritable path is one line."""
    try:
        if not path.parent.exists():
            path.parent.mkdir(parents=True)
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise CompressError(f"{path}: cannot write ({e.strerror or e})") from None


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both cost (lower) and top-1 (higher), by cost: each is the best
    top-1 for at most its cost."""
    front: list[tuple[float, float]] = []
    for cost, top1 in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or top1 > front[-1][1]:
            front.append((cost, top1))
    return front


def _finite(*values) -> bool:
    try:
        return all(not math.isnan(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def cost_from_reduction(paper_reduction_pct, our_cost, our_reduction_pct) -> float | None:
    """Where a paper that prints only a reduction (SCAP's abstract: -96.3 % params) sits on our axis: its
    reduction applied to our baseline's cost, which our run's cost and reduction give back. None when
    either reduction is missing or ours removed everything."""
    if not _finite(paper_reduction_pct, our_cost, our_reduction_pct) or float(our_reduction_pct) >= 100:
        return None
    baseline = float(our_cost) / (1 - float(our_reduction_pct) / 100)
    return baseline * (1 - float(paper_reduction_pct) / 100)


def _paper_rows(compared, published, arch: str):
    """Published rows for `arch`: those linked by our runs, and the rest of their papers' tables."""
    if published is None or published.empty:
        return published.iloc[0:0] if published is not None else None
    linked_ids = {i for i in compared.loc[compared["arch"] == arch, "paper_row"] if i}
    linked = published[published["id"].isin(linked_ids)]
    tables = set(zip(linked["paper"], linked["table"]))
    same_table = published.apply(lambda r: (r["paper"], r["table"]) in tables, axis=1) if tables else False
    same_arch = published["arch"].str.lower() == arch.lower()
    return published[published["id"].isin(linked_ids) | (same_table & same_arch)]


def method_names(compared, published) -> dict[str, str]:
    """The name each published method is drawn under: a paper's label that our runs link to takes our
    method's name (ApproxConv's "CosConv" rows -> `approxconv`); any other is its label, lower-case."""
    alias: dict[str, str] = {}
    if published is None or published.empty:
        return alias
    label = dict(zip(published["id"], published["method"]))
    for link, method in zip(compared["paper_row"], compared["method"]):
        if link in label and method:
            alias.setdefault(str(label[link]).lower(), str(method).lower())
    return alias


def plot(compared, published, path: Path) -> int:
    """Draw `compress.report.compare.compare(...)`'s table (and the published rows) into `path`; returns the
    number of architecture rows drawn."""
    import matplotlib
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    path = check_output(path)
    archs = [a for a in dict.fromkeys(compared["arch"]) if isinstance(a, str)] or [""]
    per_arch = {arch: _paper_rows(compared, published, arch) for arch in archs}
    alias = method_names(compared, published)
    name = lambda method: alias.get(str(method).lower(), str(method).lower())  # noqa: E731
    methods = sorted({name(m) for m in compared["method"] if m}
                     | {name(m) for rows in per_arch.values() if rows is not None for m in rows["method"] if m})
    palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
    colour = {m: palette(i % palette.N) for i, m in enumerate(methods)}

    fig = _figure((12.5, 4.4 * len(archs)))
    axes = fig.subplots(len(archs), 2, squeeze=False)
    for ax_row, arch in zip(axes, archs):
        ours = compared[(compared["arch"] == arch) & (compared["stage"] == "final")]
        paper = per_arch[arch]
        paper_by_id = {} if paper is None else {r["id"]: r for r in paper.to_dict("records")}
        costless, from_reduction, drawn = False, False, set()
        for ax, (key, label) in zip(ax_row, PANELS):
            xs_all = []
            mine = [(r["params_nonzero"] if key == "params" and _finite(r["params_nonzero"]) else r[key], r["top1"],
                     name(r["method"]), r["paper_row"], r.get(f"{key}_reduction_pct")) for r in ours.to_dict("records")]
            mine = [m for m in mine if _finite(m[0], m[1])]
            for x, y, method, link, reduction in mine:
                ax.scatter([x], [y], s=46, color=colour.get(method, "black"), edgecolors="black", linewidths=0.6,
                           zorder=3)
                drawn.add(method)
                row = paper_by_id.get(link)
                if row is not None and _finite(row[key], row["top1"]):
                    ax.plot([x, row[key]], [y, row["top1"]], ls=":", lw=0.9, color="grey", zorder=1)
                elif row is not None and _finite(row["top1"]):
                    scaled = cost_from_reduction(row.get(f"{key}_reduction_pct"), x, reduction)
                    if scaled is not None:  # it prints a reduction: that reduction of our baseline
                        ax.scatter([scaled], [row["top1"]], s=60, marker="D", facecolors="none",
                                   edgecolors=[colour.get(method, "black")], linewidths=1.4, zorder=2)
                        ax.plot([x, scaled], [y, row["top1"]], ls=":", lw=0.9, color="grey", zorder=1)
                        xs_all.append(scaled)
                        from_reduction = True
                    else:  # no cost at all: its top-1 at ours
                        ax.scatter([x], [row["top1"]], s=160, marker="_", color=colour.get(method, "black"),
                                   linewidths=1.6, zorder=2)
                        ax.plot([x, x], [y, row["top1"]], ls=":", lw=0.9, color="grey", zorder=1)
                        costless = True
                xs_all.append(x)
            for row in paper_by_id.values():
                if _finite(row[key], row["top1"]):
                    ax.scatter([row[key]], [row["top1"]], s=46, facecolors="none",
                               edgecolors=[colour.get(name(row["method"]), "black")], linewidths=1.4, zorder=2)
                    drawn.add(name(row["method"]))
                    xs_all.append(row[key])
            front = pareto_front([(x, y) for x, y, *_ in mine])
            if front:
                fx, fy = zip(*front)
                right = max(x for x, *_ in mine)
                ax.step([*fx, right], [*fy, fy[-1]], where="post", color="black", lw=1.1, alpha=0.7, zorder=2)
            baselines = [b for b in ours["baseline_top1"] if _finite(b)]
            if baselines:
                ax.axhline(sorted(baselines)[len(baselines) // 2], ls="--", lw=0.8, color="grey", zorder=0)
            if not xs_all:
                ax.text(0.5, 0.5, "no finished run, no published row", ha="center", va="center",
                        transform=ax.transAxes, color="grey")
            elif min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
                ax.set_xscale("log")
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
            ax.set_xlabel(label)
            ax.set_ylabel("top-1 (%)")
            ax.set_title(f"{arch or '?'}: top-1 vs {label.split(' ')[0]}")
            ax.grid(True, alpha=0.3)
        handles = [Line2D([], [], ls="", marker="o", color=colour[m], label=m) for m in methods if m in drawn]
        handles += [
            Line2D([], [], ls="", marker="o", color="grey", markeredgecolor="black", label="ours (final)"),
            Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor="grey", label="paper"),
        ]
        if from_reduction:
            handles.append(Line2D([], [], ls="", marker="D", markerfacecolor="none", markeredgecolor="grey",
                                  label="paper, printed reduction\nof our baseline's cost"))
        if costless:
            handles.append(Line2D([], [], ls="", marker="_", markersize=12, color="grey",
                                  label="paper top-1, no cost printed\n(drawn at our run's)"))
        handles += [
            Line2D([], [], color="black", alpha=0.7, label="Pareto front (ours)"),
            Line2D([], [], ls="--", color="grey", lw=0.8, label="baseline (ours)"),
            Line2D([], [], ls=":", color="grey", label="run -> its paper row"),
        ]
        ax_row[1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    _save(fig, path)
    return len(archs)


# -- one run's course, round by round (`compress plot DIR --rounds`) -----------------------------------------
def stage_rank(stage: str) -> float:
    """Where a metrics.csv stage falls in a run: baseline, compressed, round_0, round_1, ..., final."""
    if stage == "baseline":
        return -2.0
    if stage == "compressed":
        return -1.0
    if stage == "final":
        return math.inf
    if isinstance(stage, str) and stage.startswith("round_") and stage[6:].isdigit():
        return float(stage[6:])
    return math.nan


def course(rows) -> list[dict]:
    """A run's stage rows (a gather table's rows of one run_dir) in run order, with numeric fields and the
    round number (`rank`); rows without a top-1 or a parameter count are left out."""
    ordered = []
    for r in rows.to_dict("records"):
        rank = stage_rank(r.get("stage"))
        reduction, top1 = r.get("params_reduction_pct"), r.get("top1")
        if _finite(rank, reduction, top1):
            ordered.append({**r, "rank": rank, "reduction": float(reduction), "top1": float(top1)})
    return sorted(ordered, key=lambda r: r["rank"])


def paper_tradeoff(paper: dict, baseline_top1: float) -> tuple[float, float] | None:
    """(parameters removed %, top-1) of a published row's trade-off applied to our baseline: its printed
    reduction, at our baseline's top-1 plus its printed top-1 change (None when it prints either not)."""
    if not _finite(paper.get("params_reduction_pct"), paper.get("top1_delta"), baseline_top1):
        return None
    return float(paper["params_reduction_pct"]), round(float(baseline_top1) + float(paper["top1_delta"]), 4)


def plot_rounds(table, published, path: Path) -> int:
    """Each run's course: top-1 against the fraction of parameters removed (left) and that fraction
    against the round (right); accepted rounds joined in order, rolled-back ones as crosses, the final
    fine-tune as a star. A linked published row that prints a parameter reduction is drawn at that
    reduction, at our baseline's top-1 plus its printed top-1 change (the paper's trade-off from our
    baseline). Returns the number of runs drawn."""
    import matplotlib
    from matplotlib.lines import Line2D

    path = check_output(path)
    runs = {name: course(rows) for name, rows in table.groupby("run_dir", sort=True)}
    runs = {name: c for name, c in runs.items() if any(0 <= r["rank"] < math.inf for r in c)}
    if not runs:
        raise CompressError("nothing to plot with --rounds: no run below has a round_<k> row "
                            "(an iterative schedule, schedule.rounds > 0)")
    by_id = {} if published is None or published.empty else {r["id"]: r for r in published.to_dict("records")}
    palette = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    fig = _figure((12.5, 4.6))
    left, right = fig.subplots(1, 2)
    handles = []
    papers_drawn: set[tuple[str, float]] = set()  # one marker per published row and baseline
    for i, (name, rows) in enumerate(runs.items()):
        colour = palette(i % palette.N)
        kept = [r for r in rows if r.get("status") != "rolled_back" and r["rank"] != math.inf]
        back = [r for r in rows if r.get("status") == "rolled_back"]
        final = [r for r in rows if r["rank"] == math.inf]
        label = f"{name} ({rows[0].get('method', '')})"
        left.plot([r["reduction"] for r in kept], [r["top1"] for r in kept], "-o", ms=3.5, lw=1.2, color=colour)
        right.plot([max(r["rank"], 0) for r in kept], [r["reduction"] for r in kept], "-o", ms=3.5, lw=1.2,
                   color=colour)
        for ax, xs, ys in ((left, [r["reduction"] for r in back], [r["top1"] for r in back]),
                           (right, [r["rank"] for r in back], [r["reduction"] for r in back])):
            ax.scatter(xs, ys, marker="x", s=30, color=colour, zorder=3)
        if final:
            f = final[-1]
            left.scatter([f["reduction"]], [f["top1"]], marker="*", s=140, color=colour, edgecolors="black",
                         linewidths=0.5, zorder=4)
            if kept:
                left.plot([kept[-1]["reduction"], f["reduction"]], [kept[-1]["top1"], f["top1"]], ls=":", lw=1,
                          color=colour)
        handles.append(Line2D([], [], color=colour, marker="o", ms=3.5, label=label))
        base = next((r for r in rows if r["stage"] == "baseline"), None)
        paper = by_id.get(rows[0].get("paper_row") or "")
        point = paper_tradeoff(paper, base["top1"]) if base is not None and paper is not None else None
        if point is not None and (paper["id"], point) not in papers_drawn:
            papers_drawn.add((paper["id"], point))
            left.scatter([point[0]], [point[1]], s=70, facecolors="none", edgecolors=[colour], linewidths=1.6,
                         zorder=4)
            handles.append(Line2D([], [], ls="", marker="o", markerfacecolor="none", markeredgecolor=colour,
                                  label=f"{paper['id']}: its reduction and top-1 change, from our baseline"))
        if base is not None:
            left.axhline(base["top1"], ls="--", lw=0.8, color=colour, alpha=0.6, zorder=0)
    left.set_xlabel("parameters removed (%, non-zero)")
    left.set_ylabel("top-1 (%)")
    left.set_title("top-1 as the parameters go")
    right.set_xlabel("round")
    right.set_ylabel("parameters removed (%, non-zero)")
    right.set_title("parameters removed per round")
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    handles += [Line2D([], [], ls="", marker="x", color="grey", label="rolled back"),
                Line2D([], [], ls="", marker="*", color="grey", markeredgecolor="black", ms=10,
                       label="final fine-tune"),
                Line2D([], [], ls="--", color="grey", lw=0.8, label="baseline top-1")]
    right.legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8, frameon=False)
    _save(fig, path)
    return len(runs)
