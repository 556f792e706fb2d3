"""`compress export`: every kind of compressed layer reaches a deployable file whose runtime computes what
PyTorch computes (ONNX Runtime and TorchScript), and bad input is one line with nothing written."""
from __future__ import annotations

import pytest
import torch

from compress import CompressError, cli, models
from compress.deploy import export
from compress.job import sources
from compress.job.compose import compose
from compress.job.pipeline import Run
from compress.layers.quant import ActivationFakeQuant
from compress.methods import get
from tests.conftest import noise_calibration
from tests.contexts import cpu_context

pytest.importorskip("onnxruntime")


calibration = noise_calibration()


def compressed(name: str, **options) -> torch.nn.Module:
    """ResNet-20 compressed by `name` on random weights: the layer kinds a run's model.pt can hold."""
    torch.manual_seed(0)
    model = models.build("resnet20", 10).eval()
    method = get(name)(get(name).Options(**options))
    ctx = cpu_context("resnet20", 10, 32, calibration=calibration, quick=True)
    if method.one_shot:
        return method.compress(model, ctx).eval()
    model = method.prepare(model, ctx)
    for k in (1, 2):
        model = method.step(model, ctx, k, 1.0)
    return model.eval()


CASES = {
    "l1": dict(compress_rate=0.5),            # pruned channels, routed shortcuts
    "approxconv": dict(harmonics=2),          # series-generated kernels
    "fgfp": dict(layers=["layer3.*"]),        # one FGF layer, then AUP masks
    "aup": dict(pr=0.2),                       # unstructured masks
    "quant": dict(bits=8, calibration_batches=2, calibration_batch_size=8),  # fake-quantised weights and inputs
}


@pytest.mark.parametrize("fmt", export.FORMATS)
@pytest.mark.parametrize("name", list(CASES))
def test_export_matches_pytorch_for_every_layer_kind(name, fmt, tmp_path, threads):
    model = compressed(name, **CASES[name])
    images = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    done = export.export(model, fmt, tmp_path / f"model.{fmt}", (3, 32, 32), images, "random")
    assert done.path.is_file() and done.size_bytes == done.path.stat().st_size
    again = export.run_exported(fmt, done.path.read_bytes(), images[:3])  # the file alone, any batch size
    with torch.inference_mode():
        reference = model(images[:3])
    if name == "quant" and fmt == "onnx":  # rounding boundaries: see compress/deploy/export.py
        assert done.criterion.startswith("quantised activations") and torch.equal(again.argmax(1), reference.argmax(1))
    else:
        assert done.max_abs_diff <= export.TOLERANCE and torch.allclose(again, reference, atol=export.TOLERANCE, rtol=0)
    if name == "l1":  # pruned: the file is smaller than the unpruned model's
        plain = export.export(models.build("resnet20", 10).eval(), fmt, tmp_path / "plain", (3, 32, 32), images, "random")
        assert done.size_bytes < 0.45 * plain.size_bytes
    if name == "quant":
        assert any(isinstance(m, ActivationFakeQuant) for m in model.modules())


def test_export_refuses_a_file_whose_outputs_differ(tmp_path, monkeypatch, threads):
    model = models.build("resnet20", 10).eval()
    real = export.run_exported
    monkeypatch.setattr(export, "run_exported", lambda fmt, blob, images: real(fmt, blob, images) + 1e-3)
    target = tmp_path / "model.onnx"
    with pytest.raises(CompressError, match=r"differ from PyTorch's by 0.001\d* \(max abs\) > 0.0001 on 4 images; nothing written"):
        export.export(model, "onnx", target, (3, 32, 32), torch.randn(4, 3, 32, 32), "random")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temporary


def test_quantised_outputs_are_judged_by_agreement_not_by_rounding_flips():
    reference = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    one_step = reference + torch.tensor([[0.02, 0.0, 0.0], [0.0, 0.0, 0.0]])  # a level flip: 0.02 > 1e-4
    assert export.compare_outputs(one_step, reference, 1e-4, quantised=False)[2] is not None
    assert export.compare_outputs(one_step, reference, 1e-4, quantised=True)[2] is None
    swapped = reference[:, [1, 0, 2]]  # another class wins on both images
    assert "same top-1 on 0.0 %" in export.compare_outputs(swapped, reference, 1e-4, quantised=True)[2]


def test_export_command_writes_a_checked_onnx_file_of_a_run(tmp_path, quick_args, threads, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    Run(compose(quick_args + ["method=l1", "method.compress_rate=0.5", "schedule.epochs=0"]), run_dir).execute()
    monkeypatch.setattr("sys.argv", ["compress", "export", str(run_dir), "--images", "8"])
    cli.main()
    printed = capsys.readouterr().out
    assert (run_dir / "model.onnx").is_file()
    assert "max abs logit difference" in printed and "checked on 8 random inputs" in printed
    ort = export.ort_session(run_dir / "model.onnx")
    assert [i.name for i in ort.get_inputs()] == ["images"] and ort.get_inputs()[0].shape[1:] == [3, 32, 32]


@pytest.mark.parametrize("args, message", [
    (["missing_dir"], "missing_dir: no such file or directory"),
    (["{empty}", "--format", "tflite"], "compress export: argument --format: invalid choice"),
    (["{empty}", "--images", "0"], "--images: 0 is not in [1, 10000]"),
    (["{empty}"], "no model.pt (the run has not finished"),
    (["{junk}"], "is not a readable PyTorch checkpoint"),
])
def test_export_bad_input_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    monkeypatch.chdir(tmp_path)
    subs = {"{empty}": str(tmp_path / "empty"), "{junk}": str(tmp_path / "junk.pt")}
    monkeypatch.setattr("sys.argv", ["compress", "export", *[subs.get(a, a) for a in args]])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "junk.pt"]  # nothing written


def test_a_quantised_model_pt_names_its_classes_through_the_parametrized_weight():
    state = compressed("quant", **CASES["quant"]).state_dict()
    assert "linear.weight" not in state and "linear.parametrizations.weight.original" in state
    assert sources._num_classes("resnet20", state) == 10
