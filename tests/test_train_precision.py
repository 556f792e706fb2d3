"""Training precision (schedule.amp): bfloat16 autocast for the training steps on a CPU with native bfloat16
(AMX-BF16 / AVX512-BF16 in /proc/cpuinfo), float32 with one log line elsewhere; evaluation always float32
on the CPU; the start log names the precision and the CPU's features."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress import runtime
from compress.config import ScheduleConfig
from compress.data import TensorSplit
from compress.data.synthetic import make_synthetic
from compress.job.compose import compose
from compress.job.pipeline import Run
from compress.training import train

CPU = torch.device("cpu")
MEAN, STD = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.25, 0.25, 0.25])
# Flags as this project's two machines report them: an Intel Xeon with AMX (native bf16) and an AMD EPYC
# with AVX2 only.
XEON_FLAGS = "fpu sse2 avx avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
EPYC_FLAGS = "fpu sse2 avx avx2 fma bmi2 sha_ni"


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the detection at a made-up /proc/cpuinfo, with oneDNN's own bf16 check answering yes."""
    def use(name: str, flags: str) -> None:
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nmodel name\t: {name}\nflags\t\t: {flags}\n\n"
                        f"processor\t: 1\nmodel name\t: {name}\nflags\t\t: {flags}\n")
        monkeypatch.setattr(runtime, "_CPUINFO", str(path))
    monkeypatch.setattr(runtime, "_onednn_bf16", lambda: True)
    return use


def test_bf16_is_chosen_where_the_cpu_has_it_natively(cpuinfo):
    cpuinfo("Intel(R) Xeon(R) Platinum 8480+", XEON_FLAGS)
    assert runtime.native_bf16()
    assert runtime.training_dtype(CPU, amp=True) is torch.bfloat16
    assert runtime.training_dtype(CPU, amp=False) is None
    line = runtime.training_precision(CPU, amp=True)
    assert line.startswith("training precision: bf16 autocast") and "Intel(R) Xeon(R) Platinum 8480+" in line
    assert all(f in line for f in ("AVX2", "AVX-512 VNNI", "AVX512-BF16", "AMX-BF16")) and "\n" not in line
    # AVX512-BF16 alone (Cooper Lake, Zen 4) is native too.
    cpuinfo("AMD EPYC 9654", "avx2 avx512f avx512_bf16")
    assert runtime.training_dtype(CPU, amp=True) is torch.bfloat16


def test_without_native_bf16_training_stays_float32_and_says_so(cpuinfo, monkeypatch):
    cpuinfo("AMD EPYC 7B13", EPYC_FLAGS)
    assert not runtime.native_bf16()
    assert runtime.training_dtype(CPU, amp=True) is None
    line = runtime.training_precision(CPU, amp=True)
    assert line.startswith("training precision: float32") and "no native bfloat16" in line
    assert "AMD EPYC 7B13, AVX2)" in line and "AMX" not in line.split("CPU:")[1]
    # The flags alone do not decide: oneDNN must run bfloat16 too.
    cpuinfo("Intel(R) Xeon(R) Platinum 8480+", XEON_FLAGS)
    monkeypatch.setattr(runtime, "_onednn_bf16", lambda: False)
    assert runtime.training_dtype(CPU, amp=True) is None


def test_unreadable_cpuinfo_means_float32(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "_CPUINFO", str(tmp_path / "absent"))
    assert runtime.training_dtype(CPU, amp=True) is None
    assert "float32" in runtime.training_precision(CPU, amp=True)


def test_cuda_keeps_its_bf16_autocast_whatever_the_cpu(cpuinfo):
    cpuinfo("AMD EPYC 7B13", EPYC_FLAGS)
    assert runtime.training_dtype(torch.device("cuda"), amp=True) is torch.bfloat16
    assert runtime.training_dtype(torch.device("cuda"), amp=False) is None


class Tiny(nn.Module):
    """Conv-BN-ReLU-pool-linear that records the dtype its conv computed in, per train/eval mode."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.seen: dict[str, set] = {"train": set(), "eval": set()}

    def forward(self, x):
        h = self.conv(x)
        self.seen["train" if self.training else "eval"].add(h.dtype)
        return self.head(F.adaptive_avg_pool2d(F.relu(self.bn(h)), 1).flatten(1))


def _splits(n: int = 64):
    raw, labels = make_synthetic(n, 4, 8, seed=0)
    return TensorSplit(raw, labels, MEAN, STD), TensorSplit(raw[:32], labels[:32], MEAN, STD)


@pytest.mark.parametrize("native", [True, False])
def test_fit_trains_in_bf16_only_where_native_and_evaluates_in_float32(monkeypatch, threads, native):
    monkeypatch.setattr(runtime, "native_bf16", lambda: native)
    train_split, val = _splits()
    torch.manual_seed(0)
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, info = train.fit(model, train_split, val, ScheduleConfig(epochs=2, batch_size=16, lr=0.05, amp=True), CPU)
    assert model.seen["train"] == ({torch.bfloat16} if native else {torch.float32})
    assert model.seen["eval"] == {torch.float32}  # fit's validation, hence the best epoch, in float32
    assert info["epochs_run"] == 2 and 0 <= info["best_val_top1"] <= 100
    # The weights (and the optimizer's step) stay float32, and training moved them.
    assert all(v.dtype == before[k].dtype for k, v in model.state_dict().items())
    assert not torch.equal(model.conv.weight, before["conv.weight"])
    # evaluate (every reported top-1) is float32 even when asked for amp: the same numbers as without.
    with_amp, without = train.evaluate(model, val, CPU, amp=True), train.evaluate(model, val, CPU, amp=False)
    assert with_amp == without and model.seen["eval"] == {torch.float32}


def test_a_bf16_step_tracks_the_float32_step(monkeypatch, threads):
    """One SGD step of the same model on the same batch in both precisions: the losses agree to bf16's
    precision and the updated weights point the same way."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 4, (32,))
    results = {}
    for precision, native in (("fp32", False), ("bf16", True)):
        monkeypatch.setattr(runtime, "native_bf16", lambda native=native: native)
        torch.manual_seed(1)
        model = Tiny().train()
        with train.training_autocast(CPU, runtime.training_dtype(CPU, True)):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        results[precision] = (loss.item(), model.conv.weight.grad.flatten().clone(), model.seen["train"])
    (l32, g32, seen32), (l16, g16, seen16) = results["fp32"], results["bf16"]
    assert seen32 == {torch.float32} and seen16 == {torch.bfloat16}
    assert l16 == pytest.approx(l32, rel=2e-2)
    assert F.cosine_similarity(g16, g32, dim=0).item() > 0.98


def _run_log(caplog, tmp_path: Path, quick_args: list[str], *overrides: str) -> list[str]:
    config = compose(quick_args + ["schedule.epochs=0", "dataset.train_size=64", *overrides])
    with caplog.at_level(logging.INFO, logger="compress"):
        Run(config, tmp_path / "run").execute()
    return [r.getMessage() for r in caplog.records]


def test_the_run_log_starts_with_the_training_precision_and_the_cpu(caplog, tmp_path, quick_args, cpuinfo):
    cpuinfo("AMD EPYC 7B13", EPYC_FLAGS)
    lines = _run_log(caplog, tmp_path, quick_args, "device=cpu", "schedule.compile=true")
    precision = [m for m in lines if m.startswith("training precision:")]
    assert precision == [runtime.training_precision(CPU, True)] and "no native bfloat16" in precision[0]
    assert lines.index(precision[0]) < next(i for i, m in enumerate(lines) if m.startswith("data: "))
    compiled = [m for m in lines if m.startswith("schedule.compile:")]
    assert len(compiled) == 1 and "TORCHINDUCTOR_CACHE_DIR" in compiled[0]


@pytest.mark.parametrize("override, expected", [
    ("schedule.amp=banana", "schedule.amp"),
    ("schedule.amp=bf16", "schedule.amp"),  # amp is on/off; the precision follows the device
    ("schedule.compile=maybe", "schedule.compile"),
    ("pretrain.amp=[]", "pretrain.amp"),
])
def test_bad_precision_values_fail_with_one_line(cli_in_process, tmp_path, quick_args, override, expected):
    result = cli_in_process.run(["run", *quick_args, override, f"hydra.run.dir={tmp_path / 'r'}"])
    assert result["code"] == 2, result
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result["stderr"]


@pytest.mark.slow
def test_compiled_cpu_training_matches_eager(threads):
    """schedule.compile on the CPU (inductor; a cold compile takes a while): the same fine-tune as eager,
    to float32 rounding."""
    train_split, val = _splits()
    results = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 4))
        sched = ScheduleConfig(epochs=2, batch_size=16, lr=0.05, amp=False, compile=compile_)
        model, _ = train.fit(model, train_split, val, sched, CPU)
        results.append((model[0].weight.detach().clone(), train.evaluate(model, val, CPU)["loss"]))
    (w_eager, loss_eager), (w_compiled, loss_compiled) = results
    assert torch.allclose(w_eager, w_compiled, atol=1e-4)
    assert loss_compiled == pytest.approx(loss_eager, rel=1e-3)
