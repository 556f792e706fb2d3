"""Chained methods (`method=chain`) and stand-alone quantisation (`method=quant`): a row per step, the
model.pt of a chain reloading into every step's form, storage reflecting every step, resume by step."""
from __future__ import annotations

import pytest
import torch

from compress import CompressError, layers, models
from compress.job import checkpoints, sources
from compress.job.compose import compose
from compress.job.pipeline import Run
from compress.layers.quant import ActivationFakeQuant, quantised_widths
from compress.layers.series import series_kernel_of
from compress.methods import get
from tests.conftest import metrics_rows, noise_calibration
from tests.contexts import cpu_context

CHAIN = "method.steps=[{name: l1, compress_rate: 0.5}, {name: approxconv, harmonics: 2}, {name: quant, bits: 8}]"


rows = metrics_rows


calibration = noise_calibration()


def test_quant_fake_quantises_every_layer_and_packs_its_storage(threads):
    torch.manual_seed(0)
    model = models.build("resnet20", 10).eval()
    x = torch.randn(4, 3, 32, 32)
    before = model(x)
    method = get("quant")(get("quant").Options(bits=8, calibration_batches=2, calibration_batch_size=8))
    model = method.compress(model, cpu_context("resnet20", 10, 32, calibration=calibration))
    convs_and_linear = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(quantised_widths(model)) == len(convs_and_linear) == 20 and set(quantised_widths(model).values()) == {8}
    after = model.eval()(x)
    assert not torch.equal(before, after) and (after - before).abs().max() < 0.2 * before.abs().max()  # 8 bits: close
    # 8-bit weights + fp32 scales: about a quarter of the fp32 size
    dense = checkpoints.pack(layers.deployable(model), "resnet20", "none", {})
    fp32 = sum(v.numel() * v.element_size() for v in dense["state_dict"].values())
    assert 0.25 < method.storage_bytes(model) / fp32 < 0.32
    # model.pt round trip
    meta, state = method.meta(model), model.state_dict()
    fresh = get("quant").restore(models.build("resnet20", 10), meta, state)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.eval()(x), after)


def test_chain_steps_are_checked_with_their_index():
    base = ["dataset=synthetic", "arch=resnet20", "method=chain"]
    for override, message in [
        ("method.steps=[]", "method.steps: must be a list of 1 to 16 maps"),
        ("method.steps=[{name: nope}]", "method.steps[0].name: unknown method 'nope'"),
        ("method.steps=[{name: l1, compress_rate: 0.3}, {name: aup}]", "method.steps[1].name: 'aup' cannot be a step"),
        ("method.steps=[{name: chain}]", "method.steps[0].name: 'chain' cannot be a step"),
        ("method.steps=[{name: quant, bits: 99}]", "method.steps[0].bits: must be an integer in [2, 16]"),
        ("method.steps=[{name: quant, bitz: 8}]", "method.steps[0].bitz: not an option of method 'quant'"),
        ("method.steps=[7]", "method.steps[0]: must be a map with the method's name"),
    ]:
        with pytest.raises(CompressError) as e:
            compose(base + [override])
        assert str(e.value).startswith(message), (override, str(e.value))


def test_chain_run_has_a_row_per_step_and_its_model_pt_reloads(tmp_path, quick_args, threads):
    run_dir = tmp_path / "run"
    config = compose(quick_args + ["method=chain", CHAIN, "schedule.epochs=1", "schedule.max_batches=2"])
    Run(config, run_dir).execute()
    table = rows(run_dir)
    assert [r["stage"] for r in table] == ["baseline", "step_1_l1", "step_2_approxconv", "step_3_quant",
                                           "compressed", "final"]
    params = [int(r["params"]) for r in table]
    assert params[1] < params[0] and params[2] < params[1] and params[3] == params[2]  # pruned, then series-coded
    sizes = [int(r["size_bytes"]) for r in table]
    assert sizes[1] < sizes[0] and sizes[2] < sizes[1] and sizes[3] < 0.4 * sizes[2]  # every step shrinks storage
    assert int(table[1]["macs"]) < int(table[0]["macs"])
    packed = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    model = sources.unpack(packed, "resnet20", 10)
    assert any(series_kernel_of(m) is not None for m in model.modules())
    assert any(isinstance(m, ActivationFakeQuant) for m in model.modules())
    assert model.conv1.out_channels == 8  # l1 at rate 0.5: 16 -> 8
    again = tmp_path / "again"
    Run(compose(quick_args + [f"arch.checkpoint={run_dir / 'model.pt'}", "schedule.epochs=0"]), again).execute()
    assert rows(again)[0]["top1"] == table[-1]["top1"] and rows(again)[0]["params"] == table[-1]["params"]


def test_chain_resumes_after_its_last_finished_step(tmp_path, quick_args, threads):
    """A run stopped after step 1 continues with step 2, from step 1's recorded model."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    args = quick_args + ["method=chain", CHAIN, "schedule.epochs=0"]
    Run(compose(args), straight).execute()
    run = Run(compose(args), stopped)
    real = run.method.compress_part

    def stop_after_first(index, model, ctx):
        if index == 1:
            raise KeyboardInterrupt
        return real(index, model, ctx)

    run.method.compress_part = stop_after_first
    with pytest.raises(KeyboardInterrupt):
        run.execute()
    assert [r["stage"] for r in rows(stopped)] == ["baseline", "step_1_l1"]
    Run(compose(args + ["resume=true"]), stopped).execute()
    same = ("stage", "top1", "params", "macs", "size_bytes")
    assert [{k: r[k] for k in same} for r in rows(stopped)] == [{k: r[k] for k in same} for r in rows(straight)]
