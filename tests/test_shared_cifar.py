"""Integration on the real CIFAR-10 test set with the published checkpoints (skips without ../shared).

`make test` evaluates ResNet-20 (one run, ~20 s); `make test-full` adds ResNet-32/44/56 in one sweep.
"""
from __future__ import annotations

import csv

import pytest

from tests.conftest import CIFAR, compress_cli, needs_shared

# Top-1 of akamaster's checkpoints on the 10,000 CIFAR-10 test images (../shared/README.md).
EXPECTED_TOP1 = {"resnet20": 91.73, "resnet32": 92.63, "resnet44": 93.10, "resnet56": 93.39}
# The committed CIFAR VGG-16-BN (weights/, half precision), measured on the CPU when it was committed.
VGG16_BN_TOP1 = 92.75
# The configs name the public URLs; the files are found by name in ../shared/pretrained (paths.weights).
EVALUATE = ["method=none", f"dataset.root={CIFAR}", "schedule.epochs=0", "dataset.val_size=500", "measure.latency=false"]


def stage_rows(path) -> list[dict]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["baseline", "compressed", "final"]
    return rows


@needs_shared
@pytest.mark.slow  # three more evaluations of 10,000 images (ResNet-56: 125M MACs each), ~80 s
def test_pretrained_deeper_cifar_resnets_reproduce_published_top1(tmp_path):
    archs = [a for a in EXPECTED_TOP1 if a != "resnet20"]
    sweep = tmp_path / "sweep"
    compress_cli("run", "-m", f"arch={','.join(archs)}", *EVALUATE, f"hydra.sweep.dir={sweep}", check=True, timeout=1200)
    found = {}
    for path in sweep.rglob("metrics.csv"):
        rows = stage_rows(path)
        found[rows[0]["arch"]] = float(rows[0]["top1"])
    assert found == {a: EXPECTED_TOP1[a] for a in archs}


@needs_shared
def test_pretrained_resnet20_reproduces_published_top1_and_val_from_test_is_honest(tmp_path, caplog):
    """The published checkpoint, evaluated end to end by the CLI, gives the published top-1. Held out of
    train/, validation reads ~100 % for a checkpoint trained on all of it (decisions are blind);
    val_from=test validates on one fixed half of the test set and reports the other: the two agree."""
    from compress.job.compose import compose
    from compress.job.pipeline import Run

    blind, honest = tmp_path / "blind", tmp_path / "honest"
    compress_cli("run", "arch=resnet20", *EVALUATE, f"hydra.run.dir={blind}", check=True, timeout=600)
    rows = stage_rows(blind / "metrics.csv")
    assert {float(r["top1"]) for r in rows} == {EXPECTED_TOP1["resnet20"]}  # nothing compressed, nothing trained
    assert int(rows[0]["params"]) == 269722 and int(rows[0]["macs"]) == 40551040
    held_out = rows[0]
    assert held_out["val_from"] == "train" and float(held_out["val_top1"]) > 99.0
    with caplog.at_level("INFO", logger="compress"):  # in process: the imports once
        Run(compose(["arch=resnet20", *EVALUATE, "dataset.val_from=test"]), honest).execute()
    row = stage_rows(honest / "metrics.csv")[0]
    assert row["val_from"] == "test"
    assert abs(float(row["val_top1"]) - float(row["top1"])) < 1.0, row
    # the two halves together are the whole test set: their mean is the published number
    assert (float(row["val_top1"]) + float(row["top1"])) / 2 == pytest.approx(EXPECTED_TOP1["resnet20"], abs=0.01)
    assert "val 5000 (from test), test 5000" in caplog.text


@needs_shared
@pytest.mark.slow  # 10,000 + 5,000 images through VGG-16-BN (313M MACs each), ~3 min on one core
def test_committed_vgg16_bn_reaches_its_measured_top1(tmp_path):
    """The project's own CIFAR VGG-16-BN (weights/, named by the arch config), evaluated end to end: the
    top-1 measured when it was committed (docs/scap.md), and >= 92 % as issue 13 asked."""
    run = tmp_path / "vgg"
    compress_cli("run", "arch=vgg16_bn", "method=none", f"dataset.root={CIFAR}", "schedule.epochs=0",
                 "measure.latency=false", f"hydra.run.dir={run}", check=True, timeout=1200)
    row = stage_rows(run / "metrics.csv")[0]
    assert int(row["params"]) == 14_991_946 and int(row["macs"]) == 313_463_808
    assert float(row["top1"]) == VGG16_BN_TOP1 >= 92.0
    # held out of train/ before it was trained: validation is honest for it (not ~100 %)
    assert row["val_from"] == "train" and abs(float(row["val_top1"]) - float(row["top1"])) < 1.0
