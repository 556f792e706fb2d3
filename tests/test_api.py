"""The Python API (compress/api.py): an in-memory model and data through the CLI's pipeline."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from compress import CompressError, api

ROOT = Path(__file__).resolve().parents[1]


class Pairs(torch.utils.data.Dataset):
    """(CHW float image, int label): class-dependent means plus noise, so a model can learn them."""

    def __init__(self, n: int, classes: int = 4, size: int = 16, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        centres = torch.linspace(-1, 1, classes)[:, None, None, None]
        self.images = centres[self.labels] + 0.3 * torch.randn(n, 3, size, size, generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def small_cnn(classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes))


def test_l1_halves_the_macs_of_an_in_memory_model_and_returns_the_cli_rows(tmp_path):
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = api.Datasets(train=Pairs(96), test=Pairs(48, seed=1))
    result = api.compress(model, "l1", data=data, target_macs=0.5, schedule={"epochs": 1, "batch_size": 32},
                          run_dir=tmp_path / "run", threads=1)
    rows = result.rows.set_index("stage")
    assert list(rows.index) == ["baseline", "compressed", "final"]
    assert rows.loc["compressed", "macs"] == pytest.approx(0.5 * rows.loc["baseline", "macs"], rel=0.01)
    assert rows.loc["final", "params"] < rows.loc["baseline", "params"]
    # the same rows the CLI writes, in its columns
    cli_columns = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert list(result.rows.columns) == cli_columns
    # the returned model is the pruned one, and the caller's model is untouched
    assert result.model(torch.zeros(2, 3, 16, 16)).shape == (2, 4)
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(c.out_channels for c in convs) < 96
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # held-out validation from train (no val given): decisions never read the test set
    assert set(result.rows["val_from"]) == {"train"}


def test_resume_returns_the_finished_run_without_recomputing(tmp_path):
    data, model = api.Datasets(train=Pairs(64), test=Pairs(32, seed=1)), small_cnn()
    first = api.compress(model, "l1", data=data, target_macs=0.5, run_dir=tmp_path / "run", threads=1)
    again = api.compress(model, "l1", data=data, target_macs=0.5, run_dir=tmp_path / "run", threads=1,
                         resume=True)
    assert again.rows.equals(first.rows)
    assert torch.equal(again.model(data.test[0][0][None]), first.model(data.test[0][0][None]))
    # another model is another run: refused, not mixed into this one's rows
    with pytest.raises(CompressError, match="resume: the config differs"):
        api.compress(small_cnn(), "l1", data=data, target_macs=0.5, run_dir=tmp_path / "run", threads=1, resume=True)


def test_export_of_the_result_matches_pytorch(tmp_path):
    pytest.importorskip("onnxruntime")
    data = api.Datasets(train=Pairs(64), test=Pairs(32, seed=1))
    result = api.compress(small_cnn(), "l1", data=data, target_macs=0.5, run_dir=tmp_path / "run", threads=1)
    done = result.export(tmp_path / "model.onnx")
    assert done.path.is_file() and done.size_bytes > 0


def test_a_dataset_config_dict_goes_through_the_same_loader(tmp_path):
    result = api.compress(small_cnn(10), "none", data={"name": "synthetic", "image_size": 16},
                          mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], run_dir=tmp_path / "run", threads=1)
    assert result.rows["dataset"].iloc[0] == "synthetic"
    assert result.rows["macs"].iloc[0] > 0


@pytest.mark.parametrize("call, key", [
    (lambda d, m: api.compress("resnet", "l1", data=d), "model"),
    (lambda d, m: api.compress(m, "l1", data=[1, 2]), "data"),
    (lambda d, m: api.compress(m, "l1", data=d, target_macs=7), "method.target_macs"),
    (lambda d, m: api.compress(m, "nope", data=d), "method"),
    (lambda d, m: api.compress(m, "l1", data=d, schedule={"epochs": -1}), "schedule.epochs"),
    (lambda d, m: api.compress(m, "l1", data=api.Datasets(train=[(1, 2)], test=Pairs(8))), "data.train"),
    (lambda d, m: api.compress(m, "l1", data=api.Datasets(train=Pairs(64), test=Pairs(8, size=8))), "data.test"),
])
def test_bad_input_raises_one_compress_error_naming_the_key(tmp_path, call, key):
    data = api.Datasets(train=Pairs(64), test=Pairs(16, seed=1))
    with pytest.raises(CompressError) as e:
        call(data, small_cnn())
    assert key in str(e.value) and "\n" not in str(e.value)


def test_the_readme_api_example_runs(tmp_path, monkeypatch):
    """The README's "Python API" example, as written there (run in a temporary folder)."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no <!-- api-example --> python block"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(match.group(1), "README.md (api example)", "exec"), namespace)
    result = namespace["result"]
    rows = result.rows.set_index("stage")
    assert rows.loc["compressed", "macs_reduction_pct"] == pytest.approx(50, abs=1)
    assert (tmp_path / "mobilenet_v2_half.onnx").is_file()
