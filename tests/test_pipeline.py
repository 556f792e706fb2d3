"""`compress run` end to end on the synthetic data set: outputs, reload, errors, resume, rollback, report."""
from __future__ import annotations

import csv

import pytest
import torch

from compress import CompressError
from compress.job import checkpoints
from compress.job.compose import compose
from compress.job.pipeline import Run
from compress.methods import METHODS, Method
from compress.report import results
from compress.report.results import COLUMNS
from tests.conftest import PRETRAINED, compress_cli, interrupt_after_first_epoch, metrics_rows, needs_shared

# metrics.csv's columns as the README documents them: users' scripts read them by name and position, so
# a new column only ever comes last (the latency spread came with torch.utils.benchmark).
METRICS_COLUMNS = [
    "run_id", "method", "arch", "dataset", "seed", "stage", "status", "top1", "top5", "loss", "val_top1", "params",
    "params_nonzero", "macs", "params_reduction_pct", "macs_reduction_pct", "top1_delta", "latency_ms_b1",
    "latency_ms_b64", "size_bytes", "wall_s", "experiment", "overrides", "latency_iqr_ms_b1", "latency_iqr_ms_b64",
    "paper_row", "val_from", "rounds_accepted", "rounds_rolled_back",
    "speedup_b1", "speedup_b64", "ort_latency_ms_b1", "ort_speedup_b1",
]


rows = metrics_rows


def test_run_writes_metrics_config_log_and_reloadable_model(tmp_path, quick_args):
    run_dir = tmp_path / "run"
    compress_cli("run", *quick_args, "schedule.epochs=1", f"hydra.run.dir={run_dir}", check=True)
    table = rows(run_dir)
    assert [r["stage"] for r in table] == ["baseline", "compressed", "final"]
    assert list(table[0]) == COLUMNS == METRICS_COLUMNS  # the README's columns, in its order
    assert all(r["method"] == "none" and r["arch"] == "resnet20" and r["dataset"] == "synthetic" for r in table)
    assert int(table[0]["params"]) == 269722 and int(table[0]["macs"]) == 40551040
    assert float(table[0]["params_reduction_pct"]) == 0.0
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "compress.log").is_file()
    saved = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    assert saved["format"] == checkpoints.FORMAT and saved["arch"] == "resnet20"

    again = tmp_path / "again"
    compress_cli("run", *quick_args, f"arch.checkpoint={run_dir / 'model.pt'}", "schedule.epochs=0",
                 f"hydra.run.dir={again}", check=True)
    assert rows(again)[0]["top1"] == table[-1]["top1"]

    # A finished run's directory is never overwritten by a new run (only resume=true continues it).
    before = (run_dir / "metrics.csv").read_text()
    proc = compress_cli("run", *quick_args, "schedule.epochs=1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2 and "resume=true" in proc.stderr
    assert (run_dir / "metrics.csv").read_text() == before


def test_a_run_from_a_compressed_model_pt_saves_a_model_pt_that_reloads(tmp_path, quick_args):
    """Fine-tuning (method=none) or pruning again a pruned model.pt: the saved file keeps the structure it
    started from (as one chain when both steps change it), so it reloads and exports."""
    from compress.job import sources

    args = [a for a in quick_args if not a.startswith("method=")] + ["schedule.epochs=0"]
    pruned, tuned, again = tmp_path / "pruned", tmp_path / "tuned", tmp_path / "again"
    compress_cli("run", *args, "method=l1", "method.compress_rate=0.5", f"hydra.run.dir={pruned}", check=True)
    compress_cli("run", *args, "method=none", f"arch.checkpoint={pruned / 'model.pt'}", f"hydra.run.dir={tuned}",
                 check=True)
    compress_cli("run", *args, "method=l1", "method.compress_rate=0.5", f"arch.checkpoint={pruned / 'model.pt'}",
                 f"hydra.run.dir={again}", check=True)
    params = {run: int(rows(run)[-1]["params"]) for run in (pruned, tuned, again)}
    assert params[tuned] == params[pruned] < 269722 and params[again] < params[pruned]
    for run, method in ((tuned, "l1"), (again, "chain")):
        saved = sources.load_saved(run)
        assert saved.method == method
        assert sum(p.numel() for p in saved.model.parameters()) == params[run]
        assert saved.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("override,expected", [
    ("no_such_option=1", "error: no_such_option: unknown config option"),
    ("schedule.epochs=-1", "error: schedule.epochs: must be an integer in [0, "),
    ("schedule.lr=0", "error: schedule.lr: must be a number in (0, "),
    ("dataset.val_size=0", "error: dataset.val_size: must be an integer in [1, "),
    ("schedule.epochs=abc", "error: schedule.epochs: Value 'abc' of type 'str' could not be converted to Integer"),
    ("method.no_such_key=3", "error: method.no_such_key: unknown config option"),
    # what the user probably meant, never "+key=" (a key no schema has would be dropped silently)
    ("smoke=true", "error: smoke: unknown config option (did you mean debug=smoke?)"),
    ("schedule.epoch=3", "error: schedule.epoch: unknown config option (did you mean: schedule.epochs?)"),
    ("+schedule.epoch=3", "error: schedule.epoch: unknown config option (did you mean: schedule.epochs?)"),
    ("+no_such_option=1", "error: no_such_option: unknown config option"),
    ("++method.no_such_key=3", "error: method.no_such_key: unknown config option"),
    ("dataset=" + "x" * 300, "error: dataset: must name one of its presets, got 'xxx"),  # past a file name's length
    ("method=no_such_method", "Could not find 'method/no_such_method'"),
    ("method=aup", "error: schedule.rounds: method 'aup' works in rounds; set schedule.rounds > 0"),
    ("device=cuda" if not torch.cuda.is_available() else "device=nonsense", "error: device: "),
])
def test_bad_config_values_fail_with_one_line(cli_in_process, tmp_path, quick_args, override, expected):
    # The real `compress.cli.main` (in a long-lived process, the stages stubbed out: every check here
    # happens before them); the console scripts' own process is exercised by the end-to-end tests below.
    result = cli_in_process.run(["run", *quick_args, override, f"hydra.run.dir={tmp_path / 'r'}"])
    assert result["code"] == 2, result
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result["stderr"]
    assert not (tmp_path / "r" / "metrics.csv").exists()


def test_missing_data_root_names_where_it_looked(tmp_path):
    proc = compress_cli("run", f"dataset.root={tmp_path / 'nowhere'}", "measure.latency=false",
                        f"hydra.run.dir={tmp_path / 'r'}", f"paths.cache={tmp_path / 'c'}")
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert "dataset.root" in line and str(tmp_path / "nowhere") in line


@needs_shared
def test_checkpoint_of_another_arch_names_the_mismatching_keys(tmp_path, quick_args):
    ckpt = PRETRAINED / "resnet32-d509ac18.th"
    proc = compress_cli("run", *quick_args, f"arch.checkpoint={ckpt}", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert "does not match" in line and "unexpected: layer1.3.conv1.weight" in line


def test_corrupted_checkpoint_is_a_clear_error(tmp_path, quick_args):
    bad = tmp_path / "broken.th"
    bad.write_bytes(b"\x80\x02this is not a checkpoint" * 10)
    proc = compress_cli("run", *quick_args, f"arch.checkpoint={bad}", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert "arch.checkpoint" in line and "not a readable PyTorch checkpoint" in line


def test_killed_run_resumes_from_last_epoch_without_duplicate_rows(tmp_path, quick_args):
    run_dir = tmp_path / "run"
    args = [*quick_args, "schedule.epochs=4", "dataset.train_size=512", f"hydra.run.dir={run_dir}"]
    err = interrupt_after_first_epoch(args, run_dir)
    assert "resume=true" in err
    assert [r["stage"] for r in rows(run_dir)] == ["baseline", "compressed"]
    interrupted_at = torch.load(run_dir / "state.pt", map_location="cpu", weights_only=True)["train"]["fit"]["epoch"]
    assert 1 <= interrupted_at < 4

    compress_cli("run", *args, "resume=true", check=True)
    assert [r["stage"] for r in rows(run_dir)] == ["baseline", "compressed", "final"]
    log = (run_dir / "compress.log").read_text()
    assert f"resuming after epoch {interrupted_at}" in log
    assert len({r["run_id"] for r in rows(run_dir)}) == 1

    # Resuming a finished run changes nothing; a different config is refused (in process: the same code path
    # after the CLI's parsing, without two more interpreter start-ups).
    before = (run_dir / "metrics.csv").read_text()
    same = [a for a in args if not a.startswith("hydra.run.dir=")] + ["resume=true"]
    Run(compose(same), run_dir).execute()
    assert (run_dir / "metrics.csv").read_text() == before
    with pytest.raises(CompressError, match="resume: the config differs"):
        Run(compose(same + ["schedule.lr=0.5"]), run_dir).execute()


# ---- the iterative schedule, in process, with a method that only perturbs weights ------------------------
class _Perturb(Method):
    """Test method: each step zeroes every conv weight (whatever `step_scale`, which it records) — destroys
    accuracy, so every round falls under any threshold above chance."""

    name = "_perturb_test"
    one_shot, iterative, changes_model = False, True, False
    scales: list[float] = []

    def step(self, model, ctx, round_index, step_scale):
        _Perturb.scales.append(step_scale)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.mul_(0.0)
        return model


@pytest.fixture
def perturb(monkeypatch, threads):
    """`_Perturb` registered for the test only (`method.name=_perturb_test` on method=none's options)."""
    monkeypatch.setitem(METHODS, _Perturb.name, _Perturb)
    _Perturb.scales.clear()
    return _Perturb


def test_rollback_restores_the_exact_previous_weights(tmp_path, quick_args, perturb):
    # An unreachable threshold: every round (which zeroes all conv weights) is rolled back.
    config = compose(quick_args + [
        "method.name=_perturb_test", "schedule.rounds=3", "schedule.round_epochs=1", "schedule.max_batches=2",
        "schedule.epochs=0", "schedule.min_top1=100", "schedule.on_rollback=shrink", "schedule.max_rollbacks=1",
        "schedule.prepare_epochs=0"])
    Run(config, tmp_path / "run").execute()
    table = rows(tmp_path / "run")
    assert [(r["stage"], r["status"]) for r in table] == [
        ("baseline", ""), ("compressed", ""), ("round_1", "rolled_back"), ("round_2", "rolled_back"), ("final", "")]
    assert perturb.scales == [1.0, 0.5]  # shrink once, then stop after max_rollbacks
    assert (table[-1]["rounds_accepted"], table[-1]["rounds_rolled_back"]) == ("0", "2")  # where it ended
    assert float(table[-1]["top1"]) == float(table[0]["top1"])
    cached = next((tmp_path / "cache" / "pretrained").glob("*.pt"))
    pretrained = torch.load(cached, map_location="cpu", weights_only=True)["state_dict"]
    final = torch.load(tmp_path / "run" / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    assert pretrained.keys() == final.keys()
    assert all(torch.equal(pretrained[k], final[k]) for k in pretrained)


def test_prepare_epochs_fine_tune_before_the_rounds(tmp_path, quick_args, perturb):
    config = compose(quick_args + [
        "method.name=_perturb_test", "schedule.rounds=1", "schedule.round_epochs=0", "schedule.prepare_epochs=1",
        "schedule.max_batches=2", "schedule.epochs=0"])
    Run(config, tmp_path / "run").execute()
    assert [(r["stage"], r["status"]) for r in rows(tmp_path / "run")] == [
        ("baseline", ""), ("compressed", ""), ("round_0", "accepted"), ("round_1", "accepted"), ("final", "")]
    # round_0 is the recovery after prepare, not a round of the schedule
    assert (rows(tmp_path / "run")[-1]["rounds_accepted"], rows(tmp_path / "run")[-1]["rounds_rolled_back"]) == ("1", "0")


def test_report_gathers_runs(cli_in_process, tmp_path):
    # Two runs' metrics.csv, written as the pipeline writes them (results.append_row).
    for seed in (0, 1):
        (tmp_path / "sweep" / str(seed)).mkdir(parents=True)
        for i, stage in enumerate(("baseline", "compressed", "final")):
            row = {c: "" for c in COLUMNS}
            row.update(run_id=f"r{seed}", method="l1", arch="resnet20", dataset="synthetic", seed=seed, stage=stage,
                       top1=41.005 + 10 * seed + 3.3333 * i, top1_delta=-1.25 * i, params=269722 - 1000 * i,
                       params_reduction_pct=0.371 * i, macs=40551040, macs_reduction_pct=0.0, latency_ms_b1=1.5,
                       size_bytes=1100000, overrides=f"seed={seed}")
            results.append_row(tmp_path / "sweep" / str(seed) / "metrics.csv", row)
    out = tmp_path / "table.csv"
    proc = cli_in_process.run(["report", str(tmp_path / "sweep"), "-o", str(out)])
    assert proc["code"] == 0, proc
    with out.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 6 and {r["seed"] for r in table} == {"0", "1"}
    assert {r["run_dir"] for r in table} == {"0", "1"}  # relative to the DIR given
    # stdout: a Markdown table of the default columns, one line per row, then a one-line summary.
    lines = proc["stdout"].strip().splitlines()
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines if line.startswith("|")]
    header, rule, body = cells[0], cells[1], cells[2:]
    assert header == ["run_dir", "experiment", "overrides", "method", "arch", "stage", "status", "top1", "top1_delta",
                      "params", "params_reduction_pct", "macs", "macs_reduction_pct", "latency_ms_b1", "size_bytes"]
    assert all(set(c) <= set("-:") and c for c in rule)
    printed = {(r[0], r[header.index("stage")]): r for r in body}
    assert len(body) == 6 and len(printed) == 6
    for r in table:  # every printed row is its CSV row, floats with two decimals
        line = printed[(r["run_dir"], r["stage"])]
        assert line[header.index("top1")] == f"{float(r['top1']):.2f}"
        assert line[header.index("top1_delta")] == f"{float(r['top1_delta']):.2f}"
        assert line[header.index("params")] == r["params"] and line[header.index("macs")] == r["macs"] == "40551040"
        assert line[header.index("overrides")] == f"seed={r['seed']}" and line[header.index("experiment")] == ""
    assert lines[-1] == f"6 rows from 2 runs -> {out}"
    proc = cli_in_process.run(["report", str(tmp_path / "empty_nothing")])
    assert proc["code"] == 2 and proc["stderr"] == f"error: {tmp_path / 'empty_nothing'}: no such directory\n"


def test_every_fine_tune_draws_its_own_images(tmp_path, quick_args, perturb, monkeypatch):
    # With an epoch capped below the training set (schedule.max_batches), each round must see other images
    # than the last one, and the final fine-tune others again: one seed for all replayed the same subset.
    from compress.data.base import TensorSplit

    first_batches, real_batches = [], TensorSplit.batches

    def spying(self, batch_size, *, shuffle=False, augment=False, generator=None, max_batches=None):
        stream = real_batches(self, batch_size, shuffle=shuffle, augment=augment, generator=generator,
                              max_batches=max_batches)
        if augment:  # a training epoch
            x, y = next(stream)
            first_batches.append(x.clone())
            yield x, y
        yield from stream

    monkeypatch.setattr(TensorSplit, "batches", spying)
    config = compose(quick_args + [
        "method.name=_perturb_test", "schedule.rounds=3", "schedule.round_epochs=1", "schedule.max_batches=1",
        "schedule.epochs=1", "schedule.prepare_epochs=0"])
    Run(config, tmp_path / "run").execute()
    assert [r["stage"] for r in rows(tmp_path / "run")][-4:] == ["round_1", "round_2", "round_3", "final"]
    assert len(first_batches) == 4
    assert all(not torch.equal(a, b) for i, a in enumerate(first_batches) for b in first_batches[i + 1:])
