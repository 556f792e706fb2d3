"""A real int8 model: ONNX Runtime's static quantisation of the float export (`compress export --int8`), checked
on real test images before anything is written (docs/int8.md).

- Format, chosen by measurement (results/2026-12-02-int8-*): QOperator (QLinearConv, QLinearAdd, ...), uint8
  activations (asymmetric, one scale + zero point per tensor, MinMax-calibrated), int8 weights per output
  channel (symmetric, -127..127). QDQ with int8 activations ran slower than float on the CPUs measured.
- Calibration: `calibration` (default 512) real training images of the run's data set, normalised as in
  training, drawn with a fixed seed. Random noise calibrates badly (about 2 points of top-1 on ResNet-56).
- reduce_range: uint8 x int8 products are summed in int16 pairs by AVX2's VPMADDUBSW, which saturates; ORT's
  documentation advises 7-bit weights (reduce_range) on CPUs without VNNI. It is chosen at run time from the
  CPU's flags (/proc/cpuinfo: avx512_vnni, avx_vnni, amx_int8) and logged.
- The check: the int8 file's top-1 on `check_images` (default 2,000) test images must be within
  INT8_TOLERANCE (1.0 point) of the float file's on the same images; otherwise nothing is written.
- Speed: the float and int8 files timed in ONNX Runtime in alternating blocks (`measure.interleaved_ms`) at
  batch 1 and batch 64, one session each with the given thread count.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import platform
import tempfile
from pathlib import Path

import torch

from compress import CompressError, runtime

log = logging.getLogger("compress")

INT8_TOLERANCE = 1.0        # points of top-1 the int8 file may lose against the float file
CALIBRATION_IMAGES = 512    # default --calibration
CHECK_IMAGES = 2000         # default test images of the top-1 check
SEED = 0                    # which training / test images (a fixed draw)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
SHOWN_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_vnni": "AVX-512 VNNI", "avx_vnni": "AVX-VNNI",
               "amx_int8": "AMX-INT8", "amx_bf16": "AMX-BF16"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags (compress.runtime.cpu_info: Linux /proc/cpuinfo; empty elsewhere)."""
    return runtime.cpu_info()[1]


def cpu_name() -> str:
    return runtime.cpu_info()[0] or platform.processor() or platform.machine()


def cpu_label(flags: set[str] | None = None) -> str:
    """'<model name> (AVX2, AVX-512, AVX-512 VNNI, AMX-INT8)': what every int8 figure is quoted with."""
    flags = cpu_flags() if flags is None else flags
    shown = [label for flag, label in SHOWN_FLAGS.items() if flag in flags]
    return f"{cpu_name()} ({', '.join(shown) if shown else 'no AVX2/AVX-512/VNNI/AMX flags seen'})"


def has_vnni(flags: set[str] | None = None) -> bool:
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in VNNI_FLAGS)


def choose_reduce_range(flags: set[str] | None = None) -> bool:
    """7-bit weights where uint8 x int8 would saturate (no VNNI dot-product instruction): ORT's advice."""
    return not has_vnni(flags)


def quantise(float_onnx: bytes, calibration: torch.Tensor, *, reduce_range: bool,
             exclude: tuple[str, ...] = (), overrides: dict | None = None) -> bytes:
    """The int8 (QOperator, uint8 activations, per-channel int8 weights) form of a float ONNX model,
    MinMax-calibrated on `calibration` (normalised images). `exclude`: node names left in float; `overrides`:
    tensor name -> (scale, zero point) of activations whose quantisation is given (a method=quant model's)."""
    from compress.deploy.export import require

    require("onnx")
    q = require("onnxruntime.quantization")

    class Reader(q.CalibrationDataReader):
        """The calibration images in batches of 64, as the graph's `images` input."""

        def __init__(self):
            self.batches = iter([calibration[i:i + 64].contiguous().float().numpy()
                                 for i in range(0, len(calibration), 64)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    reader = Reader()
    root = logging.getLogger()  # the quantiser warns on the root logger about every integer shape tensor it skips
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return _quantise_static(q, float_onnx, reader, reduce_range, exclude, overrides or {})
    finally:
        root.setLevel(level)


def _constants_inlined(float_onnx: bytes) -> bytes:
    """The exporter shares identical constants (e.g. the zero biases of a freshly initialised model) through
    Identity nodes; ORT's quantiser needs each Conv's bias as an initializer of its own. Copy them in."""
    import onnx

    model = onnx.load_from_string(float_onnx)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    shared = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in initializers]
    if not shared:
        return float_onnx
    for node in shared:
        copy = onnx.TensorProto()
        copy.CopyFrom(initializers[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)
    return model.SerializeToString()


def _quantise_static(q, float_onnx: bytes, reader, reduce_range: bool, exclude: tuple[str, ...], overrides: dict
                     ) -> bytes:
    import numpy as np

    extra = {"TensorQuantOverrides": {name: [{"scale": np.array(scale, dtype=np.float32),
                                              "zero_point": np.array(zero, dtype=np.uint8)}]
                                      for name, (scale, zero) in overrides.items()}} if overrides else None
    with tempfile.TemporaryDirectory(prefix="compress-int8-") as tmp:
        source, target = Path(tmp) / "float.onnx", Path(tmp) / "int8.onnx"
        source.write_bytes(_constants_inlined(float_onnx))
        q.quantize_static(str(source), str(target), reader, quant_format=q.QuantFormat.QOperator, per_channel=True,
                          reduce_range=reduce_range, activation_type=q.QuantType.QUInt8,
                          weight_type=q.QuantType.QInt8, nodes_to_exclude=list(exclude) or None,
                          calibrate_method=q.CalibrationMethod.MinMax, extra_options=extra)
        return target.read_bytes()


def ort_top1(session, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Top-1 (%) of an ONNX Runtime session on normalised `images`."""
    correct = 0
    for i in range(0, len(images), batch):
        logits = session.run(["logits"], {"images": images[i:i + batch].contiguous().float().numpy()})[0]
        correct += int((torch.from_numpy(logits).argmax(1) == labels[i:i + batch]).sum())
    return 100.0 * correct / max(1, len(images))


def ort_predictions(session, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    out = [torch.from_numpy(session.run(["logits"], {"images": images[i:i + batch].contiguous().float().numpy()})[0])
           for i in range(0, len(images), batch)]
    return torch.cat(out).argmax(1)


def ort_speedups(sessions: list, input_shape: tuple[int, int, int], repeats: int = 7, threads: int | None = None
                 ) -> dict[int, "object"]:
    """batch -> measure.Interleaved of the sessions (the first is the reference), timed in alternation."""
    from compress.deploy import measure

    timed = {}
    for batch in (1, 64):
        x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(batch))
        timed[batch] = measure.interleaved_ms([measure.ort_call(s, x) for s in sessions], repeats, threads)
    return timed


@dataclasses.dataclass
class Int8Result:
    blob: bytes
    float_top1: float
    int8_top1: float
    images: int
    images_from: str
    calibration: int
    reduce_range: bool
    fake_quant_scales: int  # activation scales taken from a method=quant model's quantisers
    cpu: str
    float_ms: dict          # batch -> median ms
    int8_ms: dict
    speedup: dict           # batch -> int8 speed-up over float (median of paired ratios)

    def columns(self) -> dict:
        """The int8 columns of a metrics row."""
        return {"int8_top1": round(self.int8_top1, 3), "int8_float_top1": round(self.float_top1, 3),
                "int8_check_images": self.images, "int8_calibration": self.calibration,
                "int8_reduce_range": self.reduce_range, "int8_size_bytes": len(self.blob),
                "int8_ort_latency_ms_b1": round(self.int8_ms[1], 3), "int8_ort_latency_ms_b64": round(self.int8_ms[64], 3),
                "int8_speedup_b1": round(self.speedup[1], 3), "int8_speedup_b64": round(self.speedup[64], 3),
                "int8_cpu": self.cpu}


INT8_COLUMNS = ("int8_top1", "int8_float_top1", "int8_check_images", "int8_calibration", "int8_reduce_range",
                "int8_size_bytes", "int8_ort_latency_ms_b1", "int8_ort_latency_ms_b64", "int8_speedup_b1",
                "int8_speedup_b64", "int8_cpu")


def fake_quant_overrides(model: torch.nn.Module, float_onnx: bytes, input_shape: tuple[int, int, int]) -> dict:
    """For a method=quant model: the ONNX input tensor of every conv / linear layer whose input it fake-quantises
    -> (scale, zero point) of that quantiser, computed as `fake_quant_range` computes them, so that the int8
    file quantises those activations on the very grid the quantisation-aware fine-tune trained with.

    Layers and the graph's Conv / Gemm nodes are matched in execution order (the exporter traces the forward
    pass); a count mismatch gives no overrides (ORT's calibration decides) rather than a wrong match."""
    import onnx

    from compress.layers.quant import INPUT_QUANT, ActivationFakeQuant

    called: list[torch.nn.Module] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: called.append(mod))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    graph = onnx.load_from_string(float_onnx).graph
    producer = {out: n for n in graph.node for out in n.output}
    nodes = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    if len(nodes) != len(called):
        log.warning("int8: %d conv/linear layers ran but the graph has %d Conv/Gemm nodes: the activation "
                    "ranges come from calibration, not from the fake quantisers", len(called), len(nodes))
        return {}
    overrides = {}
    for module, node in zip(called, nodes):
        quantiser = getattr(module, INPUT_QUANT, None)
        if not isinstance(quantiser, ActivationFakeQuant) or not bool(quantiser.observed) or quantiser.bits != 8:
            continue
        low = min(float(quantiser.running_min), 0.0)
        high = max(float(quantiser.running_max), 0.0)
        scale = torch.clamp(torch.tensor((high - low) / 255, dtype=torch.float32), min=torch.finfo(torch.float32).tiny)
        zero = int(torch.round(torch.tensor(-low, dtype=torch.float32) / scale))
        previous = overrides.get(node.input[0])
        if previous is not None and previous != (float(scale), zero):  # one tensor feeding two quantised layers
            continue
        overrides[node.input[0]] = (float(scale), max(0, min(255, zero)))
        source = producer.get(node.input[0])
        if source is not None and source.op_type == "Relu" and zero == 0:
            # ORT fuses a Relu into the operator before it (QLinearConv, QLinearAdd) and quantises that operator's
            # output: the same scale there with zero point 0 (uint8 clamps the negatives: the Relu itself).
            overrides[source.input[0]] = (float(scale), 0)
    return overrides


def float_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its input fake-quantisers (method=quant) removed: the float graph ORT quantises. Its
    weights are the ones the model computes with (fake-quantised ones on their grid)."""
    from compress import layers
    from compress.layers.quant import INPUT_QUANT, ActivationFakeQuant, _quantise_input

    plain = layers.clone(model)
    for module in plain.modules():
        if isinstance(getattr(module, INPUT_QUANT, None), ActivationFakeQuant):
            for key, hook in list(module._forward_pre_hooks.items()):
                if hook is _quantise_input:
                    del module._forward_pre_hooks[key]
            delattr(module, INPUT_QUANT)
    return plain


def build(model: torch.nn.Module, input_shape: tuple[int, int, int], calibration: torch.Tensor,
          test_images: torch.Tensor, test_labels: torch.Tensor, images_from: str, *, threads: int | None = None,
          repeats: int = 7, reduce_range: bool | None = None, exclude: tuple[str, ...] = (),
          tolerance: float = INT8_TOLERANCE, time_it: bool = True) -> Int8Result:
    """Quantise `model`'s float export, check its top-1 against the float file's, time both. Raises
    CompressError (nothing is written: the caller writes `blob`) when the int8 top-1 is too low."""
    from compress.deploy import export

    flags = cpu_flags()
    if reduce_range is None:
        reduce_range = choose_reduce_range(flags)
    cpu = cpu_label(flags)
    log.info("int8: %s; %s", cpu, "reduce_range=True (7-bit weights: no VNNI, uint8 x int8 would saturate)"
             if reduce_range else "reduce_range=False (VNNI/AMX int8 dot products)")
    float_blob = export.onnx_bytes(float_model(model), input_shape)
    overrides = fake_quant_overrides(model, float_blob, input_shape)
    if overrides:
        log.info("int8: %d activation scales taken from the model's fake quantisers (method=quant)", len(overrides))
    blob = quantise(float_blob, calibration, reduce_range=reduce_range, exclude=exclude, overrides=overrides)
    sessions = [export.ort_session(float_blob, threads), export.ort_session(blob, threads)]
    float_top1 = ort_top1(sessions[0], test_images, test_labels)
    int8_top1 = ort_top1(sessions[1], test_images, test_labels)
    if int8_top1 < float_top1 - tolerance:
        raise CompressError(f"export: the int8 model's top-1 {int8_top1:.2f} is more than {tolerance:g} point(s) below "
                            f"the float model's {float_top1:.2f} on {images_from} (calibrated on {len(calibration)} "
                            f"training images); nothing written")
    float_ms, int8_ms, speedup = {}, {}, {}
    if time_it:
        for batch, timed in ort_speedups(sessions, input_shape, repeats, threads).items():
            float_ms[batch], int8_ms[batch], speedup[batch] = timed.median_ms[0], timed.median_ms[1], timed.speedup[1]
    else:
        float_ms = int8_ms = speedup = {1: float("nan"), 64: float("nan")}
    return Int8Result(blob, float_top1, int8_top1, len(test_images), images_from, len(calibration), reduce_range,
                      len(overrides), cpu, float_ms, int8_ms, speedup)


def write(blob: bytes, path: Path) -> None:
    """Atomically: a temporary beside `path`, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def draw(split, count: int, seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` images and labels of a split, a fixed random draw (the splits are sorted by class)."""
    n = len(split)
    count = min(count, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count]
    chosen = torch.zeros(n, dtype=torch.bool)
    chosen[order] = True  # a mask, not a per-image lookup: the split is read once, batch by batch
    images, labels = [], []
    start = 0
    for x, y in split.batches(1000):
        keep = chosen[start:start + len(y)].to(y.device)
        if keep.any():
            images.append(x[keep])
            labels.append(y[keep])
        start += len(y)
    return torch.cat(images), torch.cat(labels)
