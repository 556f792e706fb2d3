"""`compress export RUN_DIR|model.pt`: a deployable file (ONNX, TorchScript, or an int8 ONNX file), checked
before it is written: outputs against PyTorch, or (int8) top-1 on real test images against the float file.
Errors are `CompressError`s; the CLI prints them as one line, exit 2."""
from __future__ import annotations

from pathlib import Path

from compress import CompressError
from compress.commands.report import parser


def export_model(argv: list[str]) -> None:
    """`compress export PATH`: the run's model as an ONNX or TorchScript file, checked against PyTorch."""
    from compress.deploy import export, int8
    from compress.job import sources

    p = parser("compress export", "Write a run's compressed model as a deployable file and check its outputs.")
    p.add_argument("path", type=Path, help="a run dir (its model.pt) or a model.pt file")
    p.add_argument("--format", default="onnx", choices=export.FORMATS, help="onnx (default) or torchscript")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: model.onnx / model.torchscript.pt beside model.pt)")
    p.add_argument("--images", type=int, default=64, help="images the check runs on (default 64)")
    p.add_argument("--tolerance", type=float, default=export.TOLERANCE, help="largest max-abs logit difference (default 1e-4)")
    p.add_argument("--int8", action="store_true",
                   help="static int8 quantisation with ONNX Runtime (onnx only), checked on real test images")
    p.add_argument("--calibration", type=int, default=int8.CALIBRATION_IMAGES,
                   help=f"--int8: training images that calibrate the activation ranges (default {int8.CALIBRATION_IMAGES})")
    p.add_argument("--test-images", type=int, default=int8.CHECK_IMAGES,
                   help=f"--int8: test images of the top-1 check (default {int8.CHECK_IMAGES}, a fixed draw)")
    p.add_argument("--threads", type=int, default=1, help="--int8: ONNX Runtime threads of the timing (default 1)")
    args = p.parse_args(argv)
    if not 1 <= args.images <= 10_000:
        raise CompressError(f"--images: {args.images} is not in [1, 10000]")
    if not 0 <= args.tolerance < float("inf"):
        raise CompressError(f"--tolerance: {args.tolerance} is not a number >= 0")
    if args.int8:
        if args.format != "onnx":
            raise CompressError(f"--int8: an int8 file is ONNX only (--format onnx), not {args.format}")
        if not 1 <= args.calibration <= 100_000:
            raise CompressError(f"--calibration: {args.calibration} is not in [1, 100000]")
        if not 1 <= args.test_images <= 1_000_000:
            raise CompressError(f"--test-images: {args.test_images} is not in [1, 1000000]")
        if not 1 <= args.threads <= 128:
            raise CompressError(f"--threads: {args.threads} is not in [1, 128]")
    saved = sources.load_saved(args.path)
    folder = args.path if args.path.is_dir() else args.path.parent
    if args.int8:
        export_int8(saved, args, args.output or folder / "model.int8.onnx")
        return
    output = args.output or folder / ("model.onnx" if args.format == "onnx" else "model.torchscript.pt")
    images, images_from = sources.check_images(saved, args.images)
    done = export.export(saved.model, args.format, output, saved.input_shape, images, images_from, args.tolerance)
    print(f"{done.path}: {done.fmt}, {done.size_bytes:,} bytes ({saved.arch}, method {saved.method}); "
          f"checked on {done.images_from}: {done.criterion}")


def export_int8(saved, args, output: Path) -> None:
    """`compress export --int8`: quantise, check top-1 against the float file, time both, then write."""
    import torch

    from compress.deploy import int8
    from compress.job import sources

    data = sources.run_data(saved)
    if data is None:
        raise CompressError(f"--int8: {args.path}: the run's data set cannot be found here (calibration and the top-1 check "
              "need real images)")
    torch.set_num_threads(args.threads)
    calibration, _ = int8.draw(data.train, args.calibration)
    images, labels = int8.draw(data.test, args.test_images)
    images_from = f"{len(images)} test images of {data.source}"
    done = int8.build(saved.model, saved.input_shape, calibration, images, labels, images_from, threads=args.threads)
    int8.write(done.blob, output)
    choice = ("on (no VNNI: 7-bit weights, no uint8 x int8 saturation)" if done.reduce_range
              else "off (VNNI/AMX int8 dot products)")
    print(f"CPU: {done.cpu}; reduce_range {choice}")
    print(f"{output}: int8 onnx (QOperator, uint8 activations, per-channel int8 weights"
          f"{', reduce_range' if done.reduce_range else ''}), {len(done.blob):,} bytes ({saved.arch}, method "
          f"{saved.method}); calibrated on {done.calibration} training images"
          + (f", {done.fake_quant_scales} activation scales from the model's fake quantisers" if done.fake_quant_scales else ""))
    print(f"top-1 on {images_from}: int8 {done.int8_top1:.2f}, float {done.float_top1:.2f} "
          f"(tolerance {int8.INT8_TOLERANCE:g} point)")
    print(f"ONNX Runtime speed-up over the float export, {args.threads} thread(s), timed interleaved on "
          f"{done.cpu}: batch 1 {done.speedup[1]:.2f}x ({done.float_ms[1]:.3f} -> {done.int8_ms[1]:.3f} ms), "
          f"batch 64 {done.speedup[64]:.2f}x ({done.float_ms[64]:.2f} -> {done.int8_ms[64]:.2f} ms)")
