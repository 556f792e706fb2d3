"""Integration on the real CIFAR-10 test set with the published checkpoints (skips without ../shared)."""
from __future__ import annotations

import csv

from tests.conftest import CIFAR, compress_cli, needs_shared

# Top-1 of akamaster's checkpoints on the 10,000 CIFAR-10 test images (../shared/README.md).
EXPECTED_TOP1 = {"resnet20": 91.73, "resnet32": 92.63, "resnet44": 93.10, "resnet56": 93.39}


@needs_shared
def test_pretrained_cifar_resnets_reproduce_published_top1(tmp_path):
    # The configs name the public URLs; the files are found by name in ../shared/pretrained (paths.weights).
    sweep = tmp_path / "sweep"
    compress_cli("run", "-m", f"arch={','.join(EXPECTED_TOP1)}", "method=none", f"dataset.root={CIFAR}",
                 "schedule.epochs=0", "dataset.val_size=500", "measure.latency=false",
                 f"hydra.sweep.dir={sweep}", check=True, timeout=1200)
    found = {}
    for path in sweep.rglob("metrics.csv"):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        assert [r["stage"] for r in rows] == ["baseline", "compressed", "final"]
        found[rows[0]["arch"]] = float(rows[0]["top1"])
    assert found == EXPECTED_TOP1
