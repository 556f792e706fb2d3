"""Weights a config names by file name: the project's committed CIFAR VGG-16-BN, found in paths.weights."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from compress import CompressError
from compress.job import checkpoints, sources
from tests.conftest import REPO, compress_cli

WEIGHTS = REPO / "weights"


def test_the_committed_vgg16_bn_is_the_file_its_name_and_config_say(tmp_path):
    from compress.job.compose import compose

    spec = compose(["arch=vgg16_bn"]).arch.checkpoint
    assert checkpoints.PROJECT_WEIGHTS == WEIGHTS
    path = checkpoints.resolve(spec, [str(tmp_path)], tmp_path)  # found from anywhere, whatever paths.weights
    assert path == WEIGHTS / spec
    # the name's hex suffix is the file's sha256 prefix (torch.hub's convention): a replaced file is caught
    suffix = spec.rsplit("-", 1)[1].split(".")[0]
    assert hashlib.sha256(path.read_bytes()).hexdigest().startswith(suffix)
    saved = checkpoints.read(path)
    assert saved["arch"] == "vgg16_bn" and saved["method"] == "none"
    floats = [t for t in saved["state_dict"].values() if t.is_floating_point()]
    assert {t.dtype for t in floats} == {torch.float16}  # stored in half precision: 30 MB instead of 60
    model = sources.from_file(spec, "vgg16_bn", 10, [str(WEIGHTS)], tmp_path)  # strict: every key and shape
    assert sum(p.numel() for p in model.parameters()) == 14_991_946
    assert next(model.parameters()).dtype == torch.float32  # loaded back as float32


def test_a_relative_checkpoint_is_looked_up_in_paths_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    second.mkdir()
    (second / "net-0123abcd.pt").write_bytes(b"x")
    assert checkpoints.resolve("net-0123abcd.pt", [str(first), str(second)], tmp_path) == second / "net-0123abcd.pt"
    (tmp_path / "net-0123abcd.pt").write_bytes(b"y")  # a path that exists from here wins
    assert checkpoints.resolve("net-0123abcd.pt", [str(second)], tmp_path) == Path("net-0123abcd.pt")
    with pytest.raises(CompressError, match=r"arch.checkpoint: no such file: other.pt \(looked here, in "
                                            r"paths.weights and the project's weights/: .*first, .*second, .*weights\)"):
        checkpoints.resolve("other.pt", [str(first), str(second)], tmp_path)
    with pytest.raises(CompressError, match="arch.checkpoint: no such file: /nowhere/net.pt$"):
        checkpoints.resolve("/nowhere/net.pt", [str(second)], tmp_path)


def test_a_missing_named_checkpoint_is_one_line_and_exit_2(tmp_path):
    proc = compress_cli("run", "dataset=synthetic", "arch=vgg16_bn", "arch.checkpoint=missing-0123abcd.pt",
                        "method=none", f"hydra.run.dir={tmp_path / 'run'}", timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "arch.checkpoint: no such file: missing-0123abcd.pt" in lines[0], proc.stderr
