"""The committed evidence: every file in results/ has its commands in results/README.md, every results/ or
docs/img/ file a document names exists, the `compress report` CSVs parse as report rows, and a summary
table agrees with the rows it was made from (FGFP's two-seed mean, issue 13).

These read committed files only (no ../shared, no training): they fail when a closing note's evidence is
renamed, dropped or edited by hand.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
DOCUMENTS = [REPO / "README.md", REPO / "CONTRIBUTING.md", RESULTS / "README.md", *sorted((REPO / "docs").glob("*.md"))]
NAMED_FILE = re.compile(r"((?:results|docs/img)/[A-Za-z0-9_.-]+\.(?:csv|md|txt|png))")
REPORT_COLUMNS = {"run_dir", "run_id", "method", "arch", "seed", "stage", "top1", "params", "params_nonzero", "macs"}


def _report_csvs() -> list[Path]:
    return [p for p in sorted(RESULTS.glob("*.csv")) if REPORT_COLUMNS <= set(pd.read_csv(p, nrows=0).columns)]


# A command line of results/README.md: indented as a code block, a program (with environment assignments first).
COMMAND_LINE = re.compile(r"^(?: {4}|\t)\s*(?:[A-Z_]+=\S+\s+)*(?:compress|python|\.venv/bin/\S+|bash|scripts/\S+|make|"
                          r"torchrun)\b", re.M)


def _entry(readme: str, name: str) -> str:
    """What results/README.md says about `name`: from its first mention to the next section heading."""
    start = readme.find(name)
    if start < 0:
        return ""
    end = readme.find("\n## ", start)
    return readme[start:] if end < 0 else readme[start:end]


def test_every_results_file_has_its_commands_in_the_results_readme():
    readme = (RESULTS / "README.md").read_text()
    files = [p.name for p in RESULTS.iterdir() if p.is_file() and p.name != "README.md"]
    assert files, "results/ holds no measured rows"
    assert [name for name in files if name not in readme] == []
    # named, and followed in its section by at least one command line that produces it
    assert [name for name in files if not COMMAND_LINE.search(_entry(readme, name))] == []


def test_an_entry_without_a_command_is_caught():
    assert COMMAND_LINE.search(_entry("x.csv: the rows of a run.\n\n    compress report outputs -o x.csv\n", "x.csv"))
    assert not COMMAND_LINE.search(_entry("x.csv: the rows, commands below.\n\n## Next\n\n    compress run\n", "x.csv"))


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_results_or_figure_file_a_document_names_exists(document):
    named = set(NAMED_FILE.findall(document.read_text()))
    assert [name for name in sorted(named) if not (REPO / name).is_file()] == []


def test_report_csvs_are_rows_of_runs_with_a_baseline_and_no_machine_paths():
    csvs = _report_csvs()
    assert len(csvs) >= 10
    for path in csvs:
        rows = pd.read_csv(path)
        assert len(rows) > 0, path.name
        # run_dir is written relative to where `compress report` ran: a path of this machine would not
        # lead a reader anywhere
        assert not rows["run_dir"].astype(str).str.startswith("/").any(), path.name
        for run_id, run in rows.groupby("run_id"):
            stages = list(run["stage"])
            assert "baseline" in stages, (path.name, run_id)
            assert (run["params_nonzero"] <= run["params"]).all(), (path.name, run_id)


def test_fgfp_two_seed_mean_is_the_mean_of_its_final_rows():
    """Issue 13's FGFP figure: seeds 0 and 1 at exactly 85 % fewer non-zero parameters, mean top-1 90.00."""
    seed0 = pd.read_csv(RESULTS / "2026-11-26-fgfp-resnet20-cpu-fresh.csv")
    seed1 = pd.read_csv(RESULTS / "2026-11-26-fgfp-resnet20-cpu-fgfp18.csv")
    finals = pd.concat([seed0[(seed0["method"] == "fgfp") & (seed0["stage"] == "final")],
                        seed1[(seed1["method"] == "fgfp") & (seed1["stage"] == "final")]])
    assert sorted(finals["seed"]) == [0, 1]
    baselines = pd.concat([seed0[(seed0["method"] == "fgfp") & (seed0["stage"] == "baseline")],
                           seed1[(seed1["method"] == "fgfp") & (seed1["stage"] == "baseline")]])
    # exactly the largest count at 85 % fewer non-zero parameters than the baseline's (ResNet-20: 269,722)
    assert (finals["params_nonzero"] == 40_458).all()
    assert (finals["params_nonzero"].to_numpy() <= 0.15 * baselines["params_nonzero"].to_numpy()).all()
    assert (finals["params_nonzero"].to_numpy() + 1 > 0.15 * baselines["params_nonzero"].to_numpy()).all()
    summary = (RESULTS / "2026-11-26-fgfp-resnet20-cpu-seeds-mean.md").read_text().splitlines()
    header = [c.strip() for c in summary[0].strip("|").split("|")]
    row = dict(zip(header, (c.strip() for c in summary[2].strip("|").split("|"))))
    assert int(row["runs"]) == 2
    assert float(row["top1_mean"]) == pytest.approx(finals["top1"].mean(), abs=0.005)
    assert float(row["top1_min"]) == finals["top1"].min() and float(row["top1_max"]) == finals["top1"].max()
    # the target: at most 2.0 points under the baseline's top-1 on the reported test half
    assert float(row["pre_top1"]) - float(row["top1_mean"]) <= 2.0
