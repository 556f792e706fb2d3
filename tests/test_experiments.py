"""Every experiment config runs end to end in smoke mode, so no config rots (slow: `make test-full`; the fast
in-process checks are tests/test_experiment_table.py and tests/test_method_contract.py)."""
from __future__ import annotations

import csv

import pytest

from compress.report.papers import approxconv_rows
from tests.conftest import REPO, compress_cli

# The YAML files and the rows of the ApproxConv table (compress/job/experiments.py registers them).
EXPERIMENTS = sorted([p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")]
                     + [row.name for row in approxconv_rows()])


@pytest.mark.slow
def test_every_experiment_runs_in_smoke_mode(tmp_path):
    assert EXPERIMENTS, "no experiment configs"
    sweep = tmp_path / "sweep"
    proc = compress_cli("run", "-m", "experiment=glob(*)", "debug=smoke", f"paths.cache={tmp_path / 'cache'}",
                        "threads=2", f"hydra.sweep.dir={sweep}", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    finished = {}
    for path in sweep.rglob("metrics.csv"):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        overrides = (path.parent / ".hydra" / "overrides.yaml").read_text()
        name = next(ln.split("experiment=")[1].strip() for ln in overrides.splitlines() if "experiment=" in ln)
        finished[name] = [r["stage"] for r in rows]
    assert sorted(finished) == EXPERIMENTS
    for name, stages in finished.items():
        assert stages[0] == "baseline" and stages[-1] == "final", (name, stages)
