"""`compress compare`, `compress plot`, `compress report --summary`: our runs beside the papers' rows.

Fabricated run dirs (metrics.csv as the pipeline writes them, plus the `paper_row` column) and a small
published table of the package table's columns; no model is run."""
from __future__ import annotations

import csv
import math
import struct
import sys
from pathlib import Path

import pandas as pd
import pytest

from compress import CompressError, cli
from compress.report import compare, plot, results
from tests.conftest import compress_cli

PUBLISHED = """\
id,paper,table,row,arch,dataset,method,setting,baseline_top1,pre_top1,top1,params,params_reduction_pct,macs,macs_reduction_pct,note
cfdp_t2_resnet56_baseline,cfdp,2,ResNet-56,resnet56,cifar10,baseline,,93.26,,93.26,850000,0.0,125490000,0.0,
cfdp_t2_resnet56_cfdp,cfdp,2,CFDP,resnet56,cifar10,cfdp,"[0.]+[0.18]*29",93.26,,93.68,490000,42.8,90350000,28.0,
cfdp_t2_resnet56_hrank,cfdp,2,HRank,resnet56,cifar10,hrank,,93.26,,93.52,490000,42.4,90350000,29.3,
cfdp_t3_vgg16_cfdp,cfdp,3,CFDP,vgg16_bn,cifar10,cfdp,,93.96,,93.87,2760000,81.5,119560000,61.9,other table
approx_t1_resnet20_cos_3322,approxconv,1,"Cos 3,3,2,2",resnet20,cifar10,CosConv,"3,3,2,2",91.73,51.43,89.83,220000,,,,"params: the ResNet-32 column"
approx_t1_resnet20_cos_2222,approxconv,1,"Cos 2,2,2,2",resnet20,cifar10,CosConv,"2,2,2,2",91.73,17.55,86.66,210000,,,,
"""
HEADER = list(results.COLUMNS) + ([] if "paper_row" in results.COLUMNS else ["paper_row"])


def write_run(run_dir: Path, stages, *, method="cfdp", arch="resnet56", experiment="", paper_row=None,
              baseline=(93.39, 853018, 125485706)) -> None:
    """A metrics.csv: `stages` = [(stage, status, top1, params, macs, wall_s)]; paper_row None = the
    column absent (a run from before it existed)."""
    run_dir.mkdir(parents=True)
    header = HEADER if paper_row is not None else [c for c in results.COLUMNS if c != "paper_row"]
    b_top1, b_params, b_macs = baseline
    with (run_dir / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        for stage, status, top1, params, macs, wall in stages:
            w.writerow({c: "" for c in header} | dict(
                run_id="r", method=method, arch=arch, dataset="cifar10", seed=0, stage=stage, status=status,
                top1=top1, params=params, params_nonzero=params, macs=macs,
                params_reduction_pct=round(100 * (1 - params / b_params), 3),
                macs_reduction_pct=round(100 * (1 - macs / b_macs), 3), top1_delta=round(top1 - b_top1, 3),
                wall_s=wall, experiment=experiment, overrides=f"method={method}", paper_row=paper_row or ""))


def finished(pre: float, top1: float, params: int, macs: int, baseline=(93.39, 853018, 125485706)):
    b_top1, b_params, b_macs = baseline
    return [("baseline", "", b_top1, b_params, b_macs, 20.0), ("compressed", "", pre, params, macs, 30.5),
            ("final", "", top1, params, macs, 200.0)]


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Five runs: linked; linked to a missing id; no row; unfinished (a rolled-back round last); and an
    old run (no paper_row column) of another arch whose experiment carries the link."""
    root = tmp_path / "sweep"
    write_run(root / "0", finished(42.12, 90.58, 490112, 90893890), method="cfdp", paper_row="cfdp_t2_resnet56_cfdp")
    write_run(root / "1", finished(40.0, 90.1, 490112, 90893890), method="l1", paper_row="no_such_id")
    write_run(root / "2", finished(30.0, 89.0, 490112, 90893890), method="random", paper_row="")
    write_run(root / "10", finished(35.0, 0, 500000, 92000000)[:2] + [
        ("round_1", "accepted", 88.5, 480000, 90000000, 50.0), ("round_2", "rolled_back", 70.0, 400000, 80000000, 50.0)],
        method="hrank", paper_row="cfdp_t2_resnet56_hrank")
    write_run(root / "old", finished(51.43, 89.9, 128922, 40551040, baseline=(91.73, 269722, 40551040)),
              method="approxconv", arch="resnet20", experiment="approxconv_resnet20_cos_3322")
    return root


@pytest.fixture
def published_csv(tmp_path: Path) -> Path:
    path = tmp_path / "published.csv"
    path.write_text(PUBLISHED)
    return path


RESOLVE = {"approxconv_resnet20_cos_3322": "approx_t1_resnet20_cos_3322"}.get


def joined(sweep: Path, published_csv: Path):
    table = compare.compare(results.gather([sweep]), compare.load_published(published_csv),
                            resolve=lambda name: RESOLVE(name, ""))
    return table.set_index("run", drop=False)


def test_compare_join(sweep, published_csv):
    table = joined(sweep, published_csv)
    assert list(table["run"]) == ["0", "1", "2", "10", "old"]  # relative to DIR, in natural order
    assert list(table.columns) == list(compare.COMPARE_CSV_COLUMNS)

    linked = table.loc["0"]  # a linked, finished run
    assert (linked["paper_row"], linked["stage"], linked["method"], linked["arch"]) == (
        "cfdp_t2_resnet56_cfdp", "final", "cfdp", "resnet56")
    assert (linked["baseline_top1"], linked["pre_top1"], linked["top1"]) == (93.39, 42.12, 90.58)
    assert (linked["params"], linked["macs"]) == (490112, 90893890)
    assert linked["paper_top1"] == 93.68 and linked["paper_baseline_top1"] == 93.26
    assert math.isnan(linked["paper_pre_top1"])
    assert (linked["paper_params"], linked["paper_macs"]) == (490000, 90350000)
    assert (linked["paper_params_reduction_pct"], linked["paper_macs_reduction_pct"]) == (42.8, 28.0)
    assert linked["top1_vs_paper"] == pytest.approx(90.58 - 93.68)
    assert linked["note"] == ""
    assert linked["wall_s"] == pytest.approx(250.5)

    missing = table.loc["1"]  # linked to an id the table lacks: empty paper columns, said in the note
    assert missing["paper_row"] == "no_such_id" and "no_such_id not in the published table" in missing["note"]
    assert all(math.isnan(missing[c]) for c in ("paper_top1", "paper_params", "paper_macs", "top1_vs_paper"))

    unlinked = table.loc["2"]  # no row at all
    assert unlinked["paper_row"] == "" and unlinked["note"] == "" and math.isnan(unlinked["paper_top1"])

    running = table.loc["10"]  # unfinished: its last kept stage, the paper beside it, no difference taken
    assert running["stage"] == "round_1" and running["top1"] == 88.5 and running["params"] == 480000
    assert running["pre_top1"] == 35.0 and running["paper_top1"] == 93.52
    assert math.isnan(running["top1_vs_paper"]) and "not finished" in running["note"]

    old = table.loc["old"]  # no paper_row column: linked through its experiment
    assert old["paper_row"] == "approx_t1_resnet20_cos_3322" and old["paper_pre_top1"] == 51.43
    assert old["top1_vs_paper"] == pytest.approx(89.9 - 89.83)


def test_link_prefers_the_run_column(sweep, published_csv):
    asked = []

    def resolve(name):
        asked.append(name)
        return "from_the_experiment"

    table = compare.compare(results.gather([sweep]), compare.load_published(published_csv), resolve=resolve)
    # only the run from before the paper_row column falls back to its experiment; paper_row="" chose no row
    assert list(table["paper_row"]) == ["cfdp_t2_resnet56_cfdp", "no_such_id", "", "cfdp_t2_resnet56_hrank",
                                        "from_the_experiment"]
    assert asked == ["approxconv_resnet20_cos_3322"]
    # no published table at all: our numbers, empty paper columns
    table = compare.compare(results.gather([sweep]), None, resolve=lambda name: "")
    assert table["paper_top1"].isna().all() and table.loc[0, "top1"] == 90.58


def test_experiment_paper_row_reads_the_experiment_files(monkeypatch):
    import compress.report.papers

    compare.experiment_paper_row.cache_clear()
    try:
        # a YAML experiment's own key, and a generated ApproxConv row's table column
        assert compare.experiment_paper_row("cfdp_resnet56") == "cfdp-t2-resnet56-cfdp-1"
        row = compress.report.papers.approxconv_rows()[0]
        assert compare.experiment_paper_row(row.name) == row.paper_row != ""
        # unknown names, and names that are not a file name, link to nothing
        for name in ("no_such_experiment", "", "../config", "a/b"):
            assert compare.experiment_paper_row(name) == ""
        # a broken ApproxConv table leaves the YAML experiments linked
        compare.experiment_paper_row.cache_clear()

        def broken():
            raise ValueError("tables/approxconv.csv: row 3: paper_row is empty")

        monkeypatch.setattr(compress.report.papers, "approxconv_rows", broken)
        assert compare.experiment_paper_row("scap_vgg16") != ""
        assert compare.experiment_paper_row(row.name) == ""
    finally:
        compare.experiment_paper_row.cache_clear()


def test_markdown_and_csv_outputs(sweep, published_csv, tmp_path):
    table = joined(sweep, published_csv)
    text = compare.markdown(table, compare.COMPARE_MARKDOWN_COLUMNS)
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == list(compare.COMPARE_MARKDOWN_COLUMNS) and len(lines) == 2 + 5
    first = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|"))))
    assert first["top1"] == "90.58" and first["paper_top1"] == "93.68" and first["top1_vs_paper"] == "-3.10"
    assert first["params"] == "490.1K" and first["paper_macs"] == "90.35M" and first["paper_pre_top1"] == ""

    out = tmp_path / "compare.csv"
    compare.write_table(table, out, compare.COMPARE_CSV_COLUMNS, text)
    back = pd.read_csv(out, keep_default_na=False, dtype=str)
    assert list(back.columns) == list(compare.COMPARE_CSV_COLUMNS)
    assert back.loc[0, "paper_params"] == "490000.0" and float(back.loc[0, "top1_vs_paper"]) == pytest.approx(-3.1)
    assert back.loc[2, "paper_top1"] == ""  # empty, not "nan"
    md = tmp_path / "compare.md"
    compare.write_table(table, md, compare.COMPARE_CSV_COLUMNS, text)
    assert md.read_text() == text + "\n"
    with pytest.raises(CompressError, match=r"compare.txt: -o must end with \.csv or \.md"):
        compare.write_table(table, tmp_path / "compare.txt", compare.COMPARE_CSV_COLUMNS, text)


def test_published_table_checked(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,top1\nx,90\n")
    with pytest.raises(CompressError, match="bad.csv: missing columns paper, table"):
        compare.load_published(bad)
    with pytest.raises(CompressError, match="no such file"):
        compare.load_published(tmp_path / "absent.csv")
    odd = tmp_path / "odd.csv"  # numbers that are not numbers, a duplicate id: NaN, first row wins
    odd.write_text(PUBLISHED.splitlines()[0] + "\nr,p,1,,resnet20,,l1,,n/a,,91.5*,,,,,\nr,p,1,,resnet20,,l1,,,,80,,,,,\n")
    table = compare.load_published(odd)
    assert len(table) == 1 and math.isnan(table.loc[0, "top1"]) and math.isnan(table.loc[0, "baseline_top1"])


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_pareto_front():
    points = [(3, 80.0), (1, 70.0), (2, 75.0), (2, 60.0), (4, 79.0), (1, 65.0), (5, 90.0)]
    assert plot.pareto_front(points) == [(1, 70.0), (2, 75.0), (3, 80.0), (5, 90.0)]
    assert plot.pareto_front([]) == []


def test_a_paper_that_prints_only_a_reduction_is_drawn_at_that_reduction_of_our_baseline():
    # SCAP's abstract: -96.3 % params; our VGG-16-BN run kept 199,348 of 14,991,946 (-98.67 %)
    at = plot.cost_from_reduction(96.3, 199_348, 98.67)
    assert at == pytest.approx(14_991_946 * 0.037, rel=1e-3)  # 554.7k: 37 thousandths of our baseline
    assert plot.cost_from_reduction(0.0, 500.0, 50.0) == pytest.approx(1000.0)  # no reduction: our baseline
    assert plot.cost_from_reduction(float("nan"), 1.0, 50.0) is None  # the paper prints none
    assert plot.cost_from_reduction(90.0, 0.0, 100.0) is None  # ours removed everything: no baseline to scale


def test_plot_written_one_row_of_panels_per_arch(sweep, published_csv, tmp_path):
    table = joined(sweep, published_csv)
    published = compare.load_published(published_csv)
    one = tmp_path / "one.png"
    assert plot.plot(table[table["arch"] == "resnet56"], published, one) == 1
    two = tmp_path / "figs" / "two.png"  # a missing parent dir is made
    assert plot.plot(table, published, two) == 2
    (w1, h1), (w2, h2) = png_size(one), png_size(two)
    assert 10_000 < one.stat().st_size < 5_000_000 and 10_000 < two.stat().st_size < 5_000_000
    assert w1 > 800 and 300 < h1 < w1 and w2 == w1 and h2 > 1.7 * h1  # two rows of panels
    # the published rows drawn for resnet56: the linked ones and the rest of their table, not the VGG row
    rows = plot._paper_rows(table, published, "resnet56")
    assert set(rows["id"]) == {"cfdp_t2_resnet56_baseline", "cfdp_t2_resnet56_cfdp", "cfdp_t2_resnet56_hrank"}
    # a paper's label that our runs link to is drawn in our method's colour
    assert plot.method_names(table, published) == {"cfdp": "cfdp", "hrank": "hrank", "cosconv": "approxconv"}
    with pytest.raises(CompressError, match=r"plot.jpg: -o must end with \.png"):
        plot.plot(table, published, tmp_path / "plot.jpg")


def run_main(monkeypatch, capsys, *argv) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["compress", *argv])
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_report_summary_and_relative_run_dirs(sweep, monkeypatch, capsys, tmp_path):
    code, out, err = run_main(monkeypatch, capsys, "report", str(sweep), "--summary", "-o", str(tmp_path / "s.csv"))
    assert code == 0, err
    lines = out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["run", "experiment", "overrides", "method", "arch", "stage", "top1 (baseline -> final)",
                      "params_reduction_pct", "macs_reduction_pct", "wall_s"]
    body = {r[0]: r for r in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:] if ln.startswith("|"))}
    assert list(body) == ["0", "1", "2", "10", "old"]
    assert body["0"][header.index("top1 (baseline -> final)")] == "93.39 -> 90.58"
    assert body["0"][header.index("params_reduction_pct")] == "42.54" and body["0"][header.index("wall_s")] == "250"
    assert body["10"][header.index("stage")] == "round_1"
    assert lines[-1] == f"5 runs -> {tmp_path / 's.csv'}"
    summary = pd.read_csv(tmp_path / "s.csv")
    assert list(summary.columns) == list(compare.SUMMARY_COLUMNS) and len(summary) == 5

    # the per-stage table (the default) names runs relative to the DIR too
    code, out, err = run_main(monkeypatch, capsys, "report", str(sweep), "-o", str(tmp_path / "r.csv"))
    assert code == 0, err
    assert list(dict.fromkeys(pd.read_csv(tmp_path / "r.csv", dtype=str)["run_dir"])) == ["0", "1", "2", "10", "old"]
    # a run dir given itself: its name; two DIRs: each DIR's name first
    assert set(results.gather([sweep / "0"])["run_dir"]) == {"0"}
    other = tmp_path / "other"
    write_run(other / "0", finished(40.0, 90.0, 490112, 90893890), paper_row="")
    assert list(dict.fromkeys(results.gather([sweep, other])["run_dir"]))[:2] == ["sweep/0", "sweep/1"]
    assert list(dict.fromkeys(results.gather([sweep, other])["run_dir"]))[-1] == "other/0"


def test_one_line_errors(monkeypatch, capsys, tmp_path, sweep, published_csv):
    (tmp_path / "empty").mkdir()
    for argv, message in [
        (["compare", str(tmp_path / "empty")], f"error: no metrics.csv below {tmp_path / 'empty'}"),
        (["plot", str(tmp_path / "empty"), "-o", str(tmp_path / "p.png")], f"error: no metrics.csv below {tmp_path / 'empty'}"),
        (["report", str(tmp_path / "empty"), "--summary"], f"error: no metrics.csv below {tmp_path / 'empty'}"),
        (["compare", str(tmp_path / "absent")], f"error: {tmp_path / 'absent'}: no such directory"),
        (["compare", str(sweep), "-o", "x.txt"], "error: x.txt: -o must end with .csv or .md"),
        (["report", str(sweep), "--summary", "-o", "x.xlsx"], "error: x.xlsx: -o must end with .csv or .md"),
        (["plot", str(sweep), "-o", "x.jpg"], "error: x.jpg: -o must end with .png, .pdf, .svg"),
        (["compare", str(sweep), "--published", str(tmp_path / "nope.csv")],
         f"error: {tmp_path / 'nope.csv'}: no such file (--published names a CSV of published rows)"),
        (["compare", str(sweep), "--bogus"], "error: compress compare: unrecognized arguments: --bogus"),
    ]:
        code, out, err = run_main(monkeypatch, capsys, *argv)
        assert (code, err) == (2, message + "\n"), argv
    (tmp_path / "foreign" / "logs").mkdir(parents=True)  # another tool's metrics.csv: not a run
    (tmp_path / "foreign" / "logs" / "metrics.csv").write_text("epoch,loss\n0,1.5\n")
    code, out, err = run_main(monkeypatch, capsys, "compare", str(tmp_path / "foreign"))
    assert (code, err) == (2, "error: logs: metrics.csv without a 'stage' column: not written by compress\n")
    (tmp_path / "header_only" / "run").mkdir(parents=True)  # beside real runs it is skipped
    (tmp_path / "header_only" / "run" / "metrics.csv").write_text(",".join(results.COLUMNS) + "\n")
    code, out, err = run_main(monkeypatch, capsys, "plot", str(tmp_path / "header_only"), "-o", str(tmp_path / "p.png"))
    assert (code, err) == (2, f"error: nothing to plot: the metrics.csv below {tmp_path / 'header_only'} hold no rows\n")
    code, out, err = run_main(monkeypatch, capsys, "compare", str(tmp_path / "foreign"), str(sweep),
                              "--published", str(published_csv))
    assert code == 0, err
    assert [ln.split("|")[1].strip() for ln in out.splitlines()[2:7]] == ["sweep/0", "sweep/1", "sweep/2", "sweep/10", "sweep/old"]
    assert out.strip().splitlines()[-1].startswith("5 runs, ")
    broken = tmp_path / "broken" / "run"
    broken.mkdir(parents=True)
    (broken / "metrics.csv").write_bytes(b"\xff\xfe\x00garbage\x00\n\x00")
    for command in ("compare", "report"):
        code, out, err = run_main(monkeypatch, capsys, command, str(tmp_path / "broken"))
        assert code == 2 and err.startswith(f"error: {broken / 'metrics.csv'}: not a readable metrics.csv")
        assert err.count("\n") == 1


def test_cli_compare_and_plot(sweep, published_csv, tmp_path):
    # the console script's code path, as a user runs it (no experiment to compose: links in the rows)
    (sweep / "old").rename(tmp_path / "old")
    md = tmp_path / "compare.md"
    proc = compress_cli("compare", str(sweep), "--published", str(published_csv), "-o", str(md), timeout=120)
    assert proc.returncode == 0, proc.stderr
    table_lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert len(table_lines) == 2 + 4 and md.read_text().splitlines() == table_lines
    assert proc.stdout.strip().splitlines()[-1] == f"4 runs, 2 beside a published row -> {md}"
    png = tmp_path / "plot.png"
    proc = compress_cli("plot", str(sweep), "--published", str(published_csv), "-o", str(png), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"3 finished runs of 4, 1 architecture(s) -> {png}"
    assert png_size(png)[0] > 800 and png.stat().st_size > 10_000


def test_a_run_that_chose_no_row_is_not_linked_through_its_experiment(tmp_path):
    # paper_row="" written (the run set paper_row=null) vs the column absent (a run from before it existed)
    write_run(tmp_path / "chose_none", finished(50.0, 91.0, 660157, 89460352), method="l1",
              experiment="cfdp_resnet56", paper_row="")
    write_run(tmp_path / "old", finished(50.0, 91.0, 660157, 89460352), experiment="cfdp_resnet56")
    lines = compare.runs(results.gather([tmp_path]), resolve=lambda name: "cfdp_t2_resnet56_cfdp")
    assert dict(zip(lines["run"], lines["paper_row"])) == {"chose_none": "", "old": "cfdp_t2_resnet56_cfdp"}


def test_mean_over_seeds_merges_the_repeats_of_a_setting(monkeypatch, capsys, tmp_path):
    """Runs differing only in seed: one line, mean / sample std / min / max of the final top-1; what every
    line shares (the budget) is left out of `setting`; a value holding commas stays one override."""
    root = tmp_path / "sweep"
    finals = {("l1", 0): 80.2, ("l1", 1): 80.6, ("cfdp", 0): 70.0, ("cfdp", 1): 71.0, ("cfdp", 2): 72.0}
    for i, ((method, seed), top1) in enumerate(finals.items()):
        write_run(root / str(i), finished(10.0 + seed, top1, 400000, 59000000), method=method, paper_row="")
        path = root / str(i) / "metrics.csv"
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            row["overrides"] = f"dataset.train_size=5000,method={method},method.steps=[{{name: l1, rate: 0.5}}],seed={seed}"
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    table = compare.mean_over(compare.runs(results.gather([root]), resolve=lambda name: ""), ["seed"])
    assert list(table.columns) == list(compare.MEAN_COLUMNS) and len(table) == 2
    l1, cfdp = table.to_dict("records")
    assert l1["setting"] == "method=l1" and (l1["runs"], l1["finished"]) == (2, 2)
    assert compare.setting_of("a=1,method.steps=[{name: l1, rate: 0.5}],seed=3", ["seed"]) == "a=1,method.steps=[{name: l1, rate: 0.5}]"
    assert l1["top1_mean"] == pytest.approx(80.4) and l1["top1_std"] == pytest.approx(0.2828, abs=1e-4)
    assert (cfdp["top1_min"], cfdp["top1_max"], cfdp["pre_top1"]) == (70.0, 72.0, 11.0)
    assert cfdp["top1_std"] == pytest.approx(1.0)
    code, out, err = run_main(monkeypatch, capsys, "report", str(root), "--summary", "--mean-over", "seed",
                              "-o", str(tmp_path / "m.md"))
    assert code == 0, err
    assert out.strip().endswith(f"5 runs in 2 settings (over seed) -> {tmp_path / 'm.md'}")
    assert "| method=cfdp" in (tmp_path / "m.md").read_text()
    code, out, err = run_main(monkeypatch, capsys, "report", str(root), "--summary", "--mean-over", " , ")
    assert code == 2 and err.strip() == "error: --mean-over: name at least one override key (e.g. --mean-over seed)"


def test_rounds_plot_draws_each_iterative_run_and_the_papers_tradeoff(sweep, tmp_path):
    """`compress plot DIR --rounds`: the course of every run with round_<k> rows (FGFP / AUP style:
    accepted, rolled back, final), the published trade-off drawn from our baseline."""
    fgfp = [("baseline", "", 91.98, 269722, 40551040, 10.0), ("compressed", "", 91.98, 269722, 40551040, 0.0),
            ("round_1", "accepted", 91.70, 233306, 40551040, 300.0),
            ("round_2", "rolled_back", 87.74, 196890, 40551040, 300.0),
            ("round_3", "accepted", 91.10, 180000, 40551040, 300.0), ("final", "", 91.40, 180000, 40551040, 900.0)]
    write_run(sweep / "fgfp", fgfp, method="fgfp", arch="resnet20", paper_row="fgfp-summary-resnet20",
              baseline=(91.98, 269722, 40551040))
    table = results.gather([sweep])
    stages = [r["stage"] for r in plot.course(table[table["run_dir"] == "fgfp"])]
    assert stages == ["baseline", "compressed", "round_1", "round_2", "round_3", "final"]
    assert [plot.stage_rank(s) for s in ("baseline", "round_0", "round_12", "final", "odd")][:4] == [-2, 0, 12, math.inf]
    published = compare.load_published()
    row = published[published["id"] == "fgfp-summary-resnet20"].to_dict("records")[0]
    assert plot.paper_tradeoff(row, 91.98) == (85.2, 90.46)  # -85.2 % parameters at -1.52 points
    out = tmp_path / "rounds.png"
    assert plot.plot_rounds(table, published, out) == 2  # the FGFP run and the hrank run with rounds
    assert png_size(out)[0] > 800 and out.stat().st_size > 10_000
    with pytest.raises(CompressError, match="^nothing to plot with --rounds: no run below has a round_<k> row"):
        plot.plot_rounds(table[table["run_dir"] == "0"], published, out)


def test_cli_rounds_plot_without_rounds_is_one_line(sweep, tmp_path, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "plot", str(sweep / "0"), "--rounds", "-o", str(tmp_path / "r.png"))
    assert code == 2 and err.startswith("error: nothing to plot with --rounds") and err.count("\n") == 1
    code, out, err = run_main(monkeypatch, capsys, "plot", str(sweep), "--rounds", "-o", str(tmp_path / "r.png"))
    assert code == 0 and out.strip() == f"1 run, round by round -> {tmp_path / 'r.png'}"
