"""Deployable files from a compressed model, checked after writing: `compress export`.

- onnx: `torch.onnx.export` (the TorchScript-based exporter, opset 17: 0.3 s for a CIFAR ResNet, where the
  dynamo exporter takes 7-10 s and gives the same graph for these convnets), one input `images` (N, C, H, W)
  with a dynamic batch axis, one output `logits`. Checked with ONNX Runtime on the CPU.
- torchscript: `torch.jit.trace`, checked by loading the file back with `torch.jit.load`.

What is exported is `compress.layers.deployable(model)`: prune masks baked into zeros, series (ApproxConv)
and FGF kernels generated once and stored as plain convolution weights, fake-quantised weights stored as
their quantised values (float32 numbers on the b-bit grid: the file holds floats, not packed integers; the
`size_bytes` column of a quantised run counts the packed form), and input fake-quantisers as the
quantise-dequantise arithmetic they run (Div, Round, Clip, Mul), so the file computes what the trained
model computes.

The check: the runtime's logits against PyTorch's (the model as given, in eval mode) on a batch of images;
a max absolute difference above the tolerance (1e-4) fails the export and leaves no file behind.

Models with input fake-quantisers cannot meet 1e-4: their activations are rounded to a grid, and a
convolution that ONNX Runtime computes 1e-6 away from PyTorch (another summation order) lands on the
neighbouring level whenever its value is that close to a rounding boundary; the step then propagates
(measured on ResNet-20 at 8 bits: max 0.2, mean 0.024 on logits of magnitude ~3, the same top-1 class on
every image). For them the check is the quantised model's own contract instead: the same top-1 class on at
least 99 % of the check images and a mean absolute logit difference under 1 % of the mean |logit|; the
max difference is still reported.
"""
from __future__ import annotations

import dataclasses
import importlib
import io
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from compress import CompressError

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = 1e-4
QUANTISED_AGREEMENT = 0.99    # fraction of check images with the same top-1 class (models with input quantisers)
QUANTISED_MEAN_DIFF = 0.01    # mean |difference| as a fraction of the mean |logit|
OPSET = 17


def require(module: str):
    """Import an optional runtime (onnx, onnxruntime), or one line saying how to get it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise CompressError(f"export: the '{module}' package is not installed; `make install` installs it "
                            f"(or: pip install onnx onnxruntime)") from None


def _plain(model: nn.Module) -> nn.Module:
    from compress.layers import deployable

    # Contiguous (NCHW) weights: the exported graph must not depend on PyTorch's memory format.
    return deployable(model).cpu().eval().to(memory_format=torch.contiguous_format)


def onnx_bytes(model: nn.Module, input_shape: tuple[int, int, int]) -> bytes:
    """The deployable form of `model` as an ONNX model (bytes), batch axis dynamic."""
    require("onnx")
    plain = _plain(model)
    example = torch.zeros(2, *input_shape)
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the exporter's deprecation and tracer notices are not the user's concern
        warnings.simplefilter("ignore")
        torch.onnx.export(plain, (example,), buffer, dynamo=False, opset_version=OPSET, input_names=["images"],
                          output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


def torchscript_bytes(model: nn.Module, input_shape: tuple[int, int, int]) -> bytes:
    plain = _plain(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(plain, torch.zeros(2, *input_shape), check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    return buffer.getvalue()


def ort_session(onnx_model: bytes | Path, threads: int | None = None):
    """An ONNX Runtime CPU session with an explicit thread count (default: PyTorch's)."""
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    source = str(onnx_model) if isinstance(onnx_model, Path) else onnx_model
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_exported(fmt: str, blob: bytes, images: torch.Tensor) -> torch.Tensor:
    """The logits the exported file computes for `images`, in its own runtime."""
    images = images.detach().cpu().contiguous().float()
    if fmt == "onnx":
        session = ort_session(blob)
        return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = torch.jit.load(io.BytesIO(blob), map_location="cpu")
    with torch.inference_mode():
        return loaded(images)


@dataclasses.dataclass
class Exported:
    path: Path
    fmt: str
    size_bytes: int
    max_abs_diff: float
    images: int
    images_from: str
    criterion: str  # what the check required, in words


def _has_input_quantisers(model: nn.Module) -> bool:
    from compress.layers.quant import ActivationFakeQuant

    return any(isinstance(m, ActivationFakeQuant) for m in model.modules())


def compare_outputs(exported: torch.Tensor, reference: torch.Tensor, tolerance: float, quantised: bool
                    ) -> tuple[float, str, str | None]:
    """(max abs difference, the criterion in words, why it failed or None)."""
    diff = (exported.float() - reference.float()).abs()
    largest = float(diff.max()) if diff.numel() else 0.0
    if not quantised:
        criterion = f"max abs logit difference {largest:.2e} <= {tolerance:g}"
        failure = f"differ from PyTorch's by {largest:.3g} (max abs) > {tolerance:g}"
        return largest, criterion, None if largest <= tolerance else failure
    agreement = float((exported.argmax(1) == reference.argmax(1)).float().mean())
    relative = float(diff.mean() / reference.abs().mean().clamp_min(1e-12))
    criterion = (f"quantised activations: same top-1 on {100 * agreement:.1f} % of images "
                 f"(>= {100 * QUANTISED_AGREEMENT:g}), mean abs difference {100 * relative:.2f} % of mean |logit| "
                 f"(<= {100 * QUANTISED_MEAN_DIFF:g}), max {largest:.2e}")
    ok = agreement >= QUANTISED_AGREEMENT and relative <= QUANTISED_MEAN_DIFF
    return largest, criterion, None if ok else f"disagree with PyTorch's ({criterion})"


def export(model: nn.Module, fmt: str, path: Path, input_shape: tuple[int, int, int], images: torch.Tensor,
           images_from: str, tolerance: float = TOLERANCE) -> Exported:
    """Write `model` to `path` in `fmt` and check it; the file appears only when the check passes."""
    if fmt not in FORMATS:
        raise CompressError(f"--format: '{fmt}' is not one of {', '.join(FORMATS)}")
    blob = onnx_bytes(model, input_shape) if fmt == "onnx" else torchscript_bytes(model, input_shape)
    reference_model = model.cpu().eval()
    with torch.inference_mode():
        reference = reference_model(images.cpu().float().contiguous())
    exported = run_exported(fmt, blob, images)
    if exported.shape != reference.shape:
        raise CompressError(f"export: the {fmt} file's output has shape {tuple(exported.shape)}, PyTorch's "
                            f"{tuple(reference.shape)}; nothing written")
    largest, criterion, failure = compare_outputs(exported, reference, tolerance, _has_input_quantisers(model))
    if failure is not None:
        raise CompressError(f"export: the {fmt} file's logits {failure} on {len(images)} images; nothing written")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
    return Exported(path, fmt, len(blob), largest, len(images), images_from, criterion)

