"""The papers' published numbers (configs/tables/published.csv, `compress.report.papers`) and the `paper_row` links.

The table loads with its types; its ids are unique; it holds every entry of every table (counts pinned per
paper and table); a handful of values per paper are checked against the paper text as printed; every
experiment (YAML files and the ApproxConv table) names a row that exists, and an unknown id stops a run
with one line naming `paper_row`.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from compress import CompressError
from compress.job.compose import compose
from compress.report import papers
from compress.report.papers import approxconv_rows
from compress.report.results import COLUMNS as METRICS_COLUMNS
from tests.conftest import REPO

EXPERIMENT_FILES = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def table():
    return papers.published()


# -- the table -----------------------------------------------------------------------------------------------
def test_the_table_loads_with_its_types(table):
    assert list(table.columns) == list(papers.COLUMNS)
    assert list(table.columns[:16]) == [
        "id", "paper", "table", "row", "arch", "dataset", "method", "setting", "baseline_top1", "pre_top1", "top1",
        "params", "params_reduction_pct", "macs", "macs_reduction_pct", "note"]
    for c in papers.NUMBER_COLUMNS:
        assert table[c].dtype == float, c
    for c in papers.TEXT_COLUMNS:  # text: str everywhere, "" for empty (never NaN)
        assert table[c].map(lambda v: isinstance(v, str)).all(), c
    assert set(table["paper"]) == {"cfdp", "approxconv", "fgfp", "scap"}
    assert set(table["dataset"]) == {"cifar10", "imagenet"}
    assert (table["top1"].dropna().between(0, 100)).all()


def test_ids_are_unique_and_readable(table):
    assert table["id"].is_unique
    assert all(re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", i) for i in table["id"])
    assert all(i.startswith(p + "-") for i, p in zip(table["id"], table["paper"]))
    assert papers.ids() == frozenset(table["id"])


def test_the_table_holds_every_entry_of_every_table(table):
    counts = table.groupby(["paper", "table"]).size().to_dict()
    assert counts == {
        ("cfdp", "Table 1"): 10, ("cfdp", "Table 2"): 10, ("cfdp", "Table 3"): 8, ("cfdp", "Table 4"): 14,
        ("cfdp", "Table 5"): 4, ("cfdp", "Table 6"): 4, ("cfdp", "Table 7"): 6,
        ("cfdp", "Table 8"): 28,  # FGSM and PGD x Original and CFDP x 7 epsilons
        ("cfdp", "Figure 3 (Section 4.3.1 text)"): 1,
        ("approxconv", "Table 1"): 26,  # ResNet-20 and ResNet-32 entries of each printed row
        ("approxconv", "Table 2"): 19, ("approxconv", "Table 3"): 10, ("approxconv", "Table 4"): 19,
        ("fgfp", "Key Results"): 2, ("scap", "Abstract"): 1,
    }
    assert set(table["arch"]) == {"vgg16_bn", "resnet56", "googlenet", "resnet50_imagenet", "resnet20", "resnet32",
                                  "resnet18_imagenet", "convnext_tiny_imagenet"}


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-9)


@pytest.mark.parametrize("id, expected", [
    # CFDP: Table 2 (ResNet-56) and its baseline, Table 1 (VGG-16-BN), Table 3's two HRank rows, Table 4, 8
    ("cfdp-t2-resnet56-cfdp-1", dict(top1=93.97, baseline_top1=93.26, macs=90.35e6, macs_reduction_pct=28.0,
                                     params=0.66e6, params_reduction_pct=22.3)),
    ("cfdp-t2-resnet56-baseline-1", dict(top1=93.26, macs=125.49e6, params=0.85e6, macs_reduction_pct=0.0)),
    ("cfdp-t2-resnet56-fpgm-1", dict(top1=93.49, macs=59.44e6, params=math.nan, params_reduction_pct=math.nan)),
    ("cfdp-t1-vgg16_bn-cfdp-1", dict(top1=94.10, macs=131.17e6, params=2.76e6, params_reduction_pct=81.6)),
    ("cfdp-t1-vgg16_bn-l1-1", dict(top1=93.40, macs=206.00e6, macs_reduction_pct=34.3, params=5.40e6)),
    ("cfdp-t3-googlenet-hrank-1", dict(top1=94.53, macs=0.69e9, params=2.74e6)),
    ("cfdp-t3-googlenet-hrank-2", dict(top1=95.04, macs=0.65e9, params=2.86e6)),
    ("cfdp-t3-googlenet-cfdp-1", dict(top1=95.25, baseline_top1=95.05, macs=0.65e9)),
    ("cfdp-t4-resnet50_imagenet-cfdp-1", dict(top1=76.10, baseline_top1=76.15, macs=2.26e9, params=15.09e6)),
    ("cfdp-t4-resnet50_imagenet-hrank-1", dict(top1=75.56, macs=2.26e9, params=15.09e6)),
    ("cfdp-t5-vgg16_bn-lfq-lsp", dict(top1=94.10)),
    ("cfdp-t6-vgg16_bn-bs8", dict(top1=93.53)),
    ("cfdp-t7-vgg16_bn-random", dict(top1=93.60)),
    ("cfdp-t8-vgg16_bn-fgsm-cfdp-eps0.05", dict(top1=66.52)),
    ("cfdp-t8-vgg16_bn-pgd-original-eps0.3", dict(top1=20.07)),
    # ApproxConv: Table 1 Cos / Cheb rows (Pre, Post; params on the ResNet-32 entry), Tables 2-4
    ("approxconv-t1-resnet20-cos-3332", dict(pre_top1=87.22, top1=90.75, baseline_top1=91.73, top1_delta=-0.98,
                                             params=math.nan)),
    ("approxconv-t1-resnet20-cos-3322", dict(pre_top1=51.43, top1=89.55, top1_delta=-2.18)),
    ("approxconv-t1-resnet32-cos-3332", dict(pre_top1=87.74, top1=91.51, baseline_top1=92.78, params=0.27e6)),
    ("approxconv-t1-resnet20-cos-2223", dict(pre_top1=39.63, top1=86.87)),  # kept as printed, flagged in note
    ("approxconv-t1-resnet32-cheb-2222", dict(pre_top1=15.39, top1=88.16, params=0.21e6)),
    ("approxconv-t1-resnet32-cos-3222", dict(top1=88.4)),
    ("approxconv-t2-resnet18_imagenet-cos-63322", dict(pre_top1=56.59, top1=67.90, params=5.94e6, top1_delta=-1.86)),
    ("approxconv-t2-resnet18_imagenet-cheb-43322", dict(pre_top1=11.35, top1=64.66, top1_delta=-5.1)),
    ("approxconv-t3-convnext_tiny_imagenet-cos-7x3-7x3-5x9-5x3", dict(pre_top1=62.40, top1=79.28, params=0.19e6)),
    ("approxconv-t4-resnet18_imagenet-cos-63332-q8", dict(top1=68.12, baseline_top1=68.97, top1_delta=-0.85)),
    ("approxconv-t4-resnet18_imagenet-conv2d-q4", dict(top1=69.28, baseline_top1=69.76, params=11.68e6)),
    # FGFP and SCAP: only their summaries' numbers
    ("fgfp-summary-resnet20", dict(params_reduction_pct=85.2, top1_delta=-1.52, top1=math.nan, params=math.nan)),
    ("fgfp-summary-resnet50_imagenet", dict(params_reduction_pct=69.1, top1_delta=-1.63)),
    ("scap-abstract-vgg16_bn", dict(baseline_top1=93.44, top1=91.77, params_reduction_pct=96.3,
                                    macs_reduction_pct=90.11, top1_delta=-1.67)),
])
def test_values_as_the_papers_print_them(id, expected):
    row = papers.row(id)
    for key, value in expected.items():
        assert _close(row[key], value), (id, key, row[key], value)


def test_values_that_look_wrong_are_kept_and_flagged():
    cos, cheb = papers.row("approxconv-t1-resnet20-cos-2223"), papers.row("approxconv-t1-resnet20-cheb-2223")
    assert (cos["pre_top1"], cheb["pre_top1"]) == (39.63, 23.63) and "looks wrong" in cos["note"]
    assert "Table 2" in papers.row("approxconv-t4-resnet18_imagenet-cheb-63332-q8")["note"]
    assert "does not match" in papers.row("cfdp-t1-vgg16_bn-zhao-1")["note"]
    assert "not printed" in papers.row("scap-abstract-vgg16_bn")["note"]


def test_row_returns_a_copy_and_unknown_ids_fail_with_one_line():
    row = papers.row("cfdp-t2-resnet56-cfdp-1")
    assert list(row) == list(papers.COLUMNS) and row["method"] == "CFDP" and row["setting"] == ""
    row["top1"] = 0.0
    assert papers.row("cfdp-t2-resnet56-cfdp-1")["top1"] == 93.97
    with pytest.raises(CompressError) as e:
        papers.row("nope")
    assert str(e.value) == "paper_row: unknown id 'nope' (see configs/tables/published.csv)"


# -- paper_row links ------------------------------------------------------------------------------------------
def test_every_table_experiment_names_an_existing_row():
    rows = approxconv_rows()
    assert all(row.paper_row in papers.ids() for row in rows), [r.paper_row for r in rows if r.paper_row not in papers.ids()]
    assert len({row.paper_row for row in rows}) == len(rows)
    for row in rows:  # the published row is the same entry: arch, data set, series, harmonics, bits
        published = papers.row(row.paper_row)
        assert (published["arch"], published["dataset"]) == (row.arch, row.dataset), row.name
        assert published["method"] == {"cos": "CosConv", "cheb": "ChebConv", None: "Baseline"}[row.series], row.name
        if row.quant_bits is not None:
            assert f"bits={row.quant_bits}" in published["setting"], row.name


@pytest.mark.parametrize("name", EXPERIMENT_FILES)
def test_every_experiment_file_names_an_existing_row(name):
    config = compose([f"experiment={name}"])
    assert config.paper_row in papers.ids(), name
    published = papers.row(config.paper_row)
    assert published["arch"] == config.arch.name and published["dataset"] == config.dataset.name, name


def test_experiment_files_and_table_rows_compose_with_their_row():
    assert compose(["experiment=cfdp_resnet56"]).paper_row == "cfdp-t2-resnet56-cfdp-1"
    assert compose(["experiment=approxconv_resnet20_cos_3322"]).paper_row == "approxconv-t1-resnet20-cos-3322"
    assert compose([]).paper_row is None  # the default job names none
    assert compose(["paper_row=cfdp-t8-vgg16_bn-pgd-cfdp-eps0.05"]).paper_row == "cfdp-t8-vgg16_bn-pgd-cfdp-eps0.05"
    assert compose(["experiment=cfdp_resnet56", "paper_row=null"]).paper_row is None


@pytest.mark.parametrize("value", ["nope", "123", "x" * 5000, "cfdp-t2-resnet56-cfdp-1 "])
def test_an_unknown_paper_row_fails_with_one_line_naming_it(value):
    with pytest.raises(CompressError) as e:
        compose([f"paper_row='{value}'"])
    message = str(e.value)
    assert message.startswith("paper_row: unknown id ") and "\n" not in message and len(message) < 200


def test_the_cli_stops_on_an_unknown_paper_row(cli_in_process):
    answer = cli_in_process.run(["run", "experiment=cfdp_resnet56", "paper_row=nope"])
    assert answer["code"] == 2, answer
    lines = answer["stderr"].strip().splitlines()
    assert len(lines) == 1 and "paper_row" in lines[0] and "nope" in lines[0], lines


def test_metrics_rows_carry_the_paper_row(tmp_path: Path):
    from compress.job.pipeline import Run

    # new columns only ever come last: paper_row right after the latency spread, the later ones after it
    assert METRICS_COLUMNS.index("paper_row") == METRICS_COLUMNS.index("latency_iqr_ms_b64") + 1
    run = Run(compose(["experiment=cfdp_resnet56", "device=cpu"]), tmp_path / "run", experiment="cfdp_resnet56")
    assert run.labels["paper_row"] == "cfdp-t2-resnet56-cfdp-1"
    assert Run(compose(["device=cpu"]), tmp_path / "other").labels["paper_row"] == ""
