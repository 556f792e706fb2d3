"""Knowledge distillation in the fine-tunes (schedule.distill, temperature, distill_features): the loss, the
teacher's effect on training, and the pipeline's teacher (the model as loaded, resume-safe)."""
from __future__ import annotations

import dataclasses
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress import CompressError
from compress.config import ScheduleConfig
from compress.data import TensorSplit
from compress.data.synthetic import make_synthetic
from compress.job.compose import compose
from compress.job.pipeline import Run
from compress.training import train
from tests.conftest import compress_cli, interrupt_after_first_epoch, metrics_rows

MEAN, STD = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25])


rows = metrics_rows


# ---- the loss -------------------------------------------------------------------------------------------
def test_distillation_loss_is_t_squared_kl_and_zero_for_the_teacher_itself():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    teacher = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    t = 4.0
    p = F.softmax(teacher / t, dim=1)
    by_hand = (p * (p.log() - F.log_softmax(student / t, dim=1))).sum(dim=1).mean() * t * t
    assert math.isclose(train.distillation_loss(student, teacher, t).item(), by_hand.item(), rel_tol=1e-5)
    assert train.distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)
    # At a high temperature the gradient keeps the cross-entropy's scale (the T^2 factor), rather than vanishing.
    s = student.clone().requires_grad_(True)
    train.distillation_loss(s, teacher, 100.0).backward()
    assert 1e-3 < s.grad.abs().max().item() < 10


class Tiny(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.features(x))


def test_loss_mixes_ce_kd_and_features_by_their_weights(threads):
    torch.manual_seed(0)
    student, teacher = Tiny(), Tiny()
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        t_logits = teacher.eval()(x)
    for weight, features in ((0.0, ["features"]), (0.3, []), (1.0, ["features.1", "head"])):
        sched = ScheduleConfig(distill=weight, temperature=2.0, distill_features=features, feature_weight=0.5)
        with train.Distiller(teacher, student, sched) as distiller:
            s_logits = student(x)
            got = distiller.loss(x, y, s_logits, 0.0).item()
            s_feats = dict(distiller.student_taps.outputs)
            t_feats = dict(distiller.teacher_taps.outputs)
        expected = (1 - weight) * F.cross_entropy(s_logits, y).item() \
            + weight * train.distillation_loss(s_logits, t_logits, 2.0).item()
        if features:
            expected += 0.5 * sum(F.mse_loss(s_feats[n], t_feats[n]).item() for n in features) / len(features)
        assert got == pytest.approx(expected, rel=1e-5)
        assert set(s_feats) == set(features)
    # Hooks are removed on exit: the student's forward no longer fills anything.
    assert not any(m._forward_hooks for m in student.modules())
    # distill=1: the labels do not matter at all
    with train.Distiller(teacher, student, ScheduleConfig(distill=1.0)) as d:
        logits = student(x)
        assert d.loss(x, y, logits, 0.0).item() == pytest.approx(d.loss(x, 3 - y, logits, 0.0).item())


def test_unknown_or_reshaped_feature_modules_name_the_key(threads):
    student, teacher = Tiny(width=8), Tiny(width=6)
    with pytest.raises(CompressError, match=r"^schedule.distill_features: no module named 'layer9'"):
        train.Distiller(teacher, student, ScheduleConfig(distill_features=["layer9"]))
    with train.Distiller(teacher, student, ScheduleConfig(distill_features=["features.0"])) as d:
        x = torch.randn(2, 3, 8, 8)
        with pytest.raises(CompressError, match=r"^schedule.distill_features: 'features.0' gives \(2, 8, 8, 8\)"):
            d.loss(x, torch.tensor([0, 1]), student(x), 0.0)


def test_fit_with_a_teacher_pulls_the_student_towards_it(threads):
    """distill=1 and no labels' say: a fresh student trained on the teacher's soft targets ends closer to the
    teacher (KL on held-out images) than the same student trained on labels alone."""
    raw, labels = make_synthetic(512, 4, 8, seed=0)
    split = TensorSplit(raw, labels % 4, MEAN, STD, channels_last=False)
    held_out = TensorSplit(*make_synthetic(128, 4, 8, seed=1), MEAN, STD, channels_last=False)
    torch.manual_seed(1)
    teacher = Tiny()
    torch.manual_seed(2)
    fresh = Tiny()
    base = ScheduleConfig(epochs=3, lr=0.05, batch_size=64, channels_last=False, amp=False, scheduler="constant")
    gaps = {}
    for weight in (0.0, 1.0):
        student = Tiny()
        student.load_state_dict(fresh.state_dict())
        sched = dataclasses.replace(base, distill=weight)
        student, _ = train.fit(student, split, held_out, sched, torch.device("cpu"), seed=0,
                               teacher=teacher if weight else None)
        x, _ = next(held_out.batches(128))
        with torch.no_grad():
            gaps[weight] = train.distillation_loss(student.eval()(x), teacher.eval()(x), 1.0).item()
    assert gaps[1.0] < 0.5 * gaps[0.0], gaps


def test_fit_refuses_to_distil_without_a_teacher(threads):
    raw, labels = make_synthetic(16, 4, 8, seed=0)
    split = TensorSplit(raw, labels, MEAN, STD, channels_last=False)
    with pytest.raises(CompressError, match="^schedule.distill: this fine-tune has no teacher"):
        train.fit(Tiny(), split, split, ScheduleConfig(distill=0.5, amp=False), torch.device("cpu"))


@pytest.mark.parametrize("override,key", [
    ("schedule.distill=1.5", "schedule.distill"), ("schedule.temperature=0", "schedule.temperature"),
    ("pretrain.distill=0.5", "pretrain.distill"), ("schedule.feature_weight=-1", "schedule.feature_weight"),
])
def test_bad_distillation_settings_are_one_line_errors(override, key):
    with pytest.raises(CompressError, match=f"^{key}: "):
        compose(["dataset=synthetic", "arch=resnet20", "method=none", override])


# ---- in the pipeline ---------------------------------------------------------------------------------------
def test_every_fine_tune_distils_from_the_model_as_loaded(tmp_path, quick_args, monkeypatch, threads, caplog):
    """The teacher handed to each fine-tune (round_0, rounds, final) is the baseline's weights, in eval mode."""
    seen = []
    real_fit = train.fit

    def spy(model, *args, teacher=None, desc="", **kwargs):
        seen.append((desc, teacher))
        return real_fit(model, *args, teacher=teacher, desc=desc, **kwargs)

    monkeypatch.setattr(train, "fit", spy)
    config = compose(quick_args + ["method=aup", "schedule.rounds=2", "schedule.prepare_epochs=1", "schedule.epochs=1",
                                   "schedule.round_epochs=1", "schedule.max_batches=2", "schedule.distill=0.5"])
    with caplog.at_level("INFO", logger="compress"):
        Run(config, tmp_path / "run").execute()
    assert [d for d, _ in seen] == ["pretrain", "round_0", "round_1", "round_2", "final"]
    assert seen.pop(0)[1] is None  # pretraining from scratch (0 epochs here) has no teacher
    baseline = torch.load(next((tmp_path / "cache" / "pretrained").glob("*.pt")), weights_only=True)["state_dict"]
    for _, teacher in seen:
        assert not teacher.training
        assert all(torch.equal(v.cpu(), baseline[k]) for k, v in teacher.state_dict().items())
    assert "images/s, distilling)" in caplog.text


@pytest.mark.slow  # three runs and a kill, ~40 s: make test-full
def test_a_distilling_run_resumes_to_the_same_rows_and_refuses_a_changed_teacher(tmp_path, quick_args):
    """Resume reloads the teacher from arch.checkpoint, checks it is the one the run started from, and ends
    with the rows of an uninterrupted run."""
    teacher_file = tmp_path / "teacher.pt"
    compress_cli("run", *quick_args, "schedule.epochs=0", f"hydra.run.dir={tmp_path / 'src'}", check=True)
    teacher_file.write_bytes((tmp_path / "src" / "model.pt").read_bytes())
    common = [*quick_args, f"arch.checkpoint={teacher_file}", "method=l1", "method.compress_rate=0.3",
              "schedule.distill=0.5", "schedule.epochs=2", "dataset.train_size=384"]
    straight, killed, copy = tmp_path / "straight", tmp_path / "killed", tmp_path / "copy"
    compress_cli("run", *common, f"hydra.run.dir={straight}", check=True)
    interrupt_after_first_epoch([*common, f"hydra.run.dir={killed}"], killed)
    shutil.copytree(killed, copy)
    compress_cli("run", *common, f"hydra.run.dir={killed}", "resume=true", check=True)
    assert "final: resuming after epoch" in (killed / "compress.log").read_text()
    same = ("stage", "top1", "val_top1", "params", "macs")
    assert [{k: r[k] for k in same} for r in rows(killed)] == [{k: r[k] for k in same} for r in rows(straight)]

    # The teacher file changed since the run started: resuming is refused with one line naming the key.
    changed = torch.load(teacher_file, weights_only=True)
    changed["state_dict"] = {k: (v + 1 if v.is_floating_point() else v) for k, v in changed["state_dict"].items()}
    torch.save(changed, teacher_file)
    before = (copy / "metrics.csv").read_text()
    proc = compress_cli("run", *common, f"hydra.run.dir={copy}", "resume=true")
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("error: arch.checkpoint: the teacher") and "differs" in line
    assert (copy / "metrics.csv").read_text() == before  # nothing done is lost
