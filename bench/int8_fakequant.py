"""method=quant's fake quantisation (PyTorch) against the int8 file `compress export --int8` writes (ONNX
Runtime), on the same test images: each one's top-1 and the share of images with the same predicted class;
the int8 file made twice, with the fake quantisers' activation scales passed to ORT (what `--int8` does) and
with ORT calibrating every tensor itself.

    .venv/bin/python bench/int8_fakequant.py RUN_DIR [TEST_IMAGES]     # RUN_DIR: a finished method=quant run
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from compress.deploy import export, int8
from compress.job import sources


def main() -> None:
    torch.set_num_threads(1)
    saved = sources.load_saved(Path(sys.argv[1]))
    data = sources.run_data(saved)
    if data is None:
        sys.exit(f"{sys.argv[1]}: its data set cannot be found")
    calibration, _ = int8.draw(data.train, int8.CALIBRATION_IMAGES)
    x, y = int8.draw(data.test, int(sys.argv[2]) if len(sys.argv) > 2 else 5000)
    with torch.inference_mode():
        fake = torch.cat([saved.model(x[i:i + 500]) for i in range(0, len(x), 500)]).argmax(1)
    float_blob = export.onnx_bytes(int8.float_model(saved.model), saved.input_shape)
    overrides = int8.fake_quant_overrides(saved.model, float_blob, saved.input_shape)
    print(f"CPU: {int8.cpu_label()}; {len(x)} test images; {len(overrides)} activation scales from the model")
    pct = lambda a, b: 100 * float((a == b).float().mean())  # noqa: E731
    for name, given in [("ORT calibrates", {}), ("fake-quant scales", overrides)]:
        blob = int8.quantise(float_blob, calibration, reduce_range=int8.choose_reduce_range(), overrides=given)
        p = int8.ort_predictions(export.ort_session(blob, 1), x)
        print(f"{name}: int8 top-1 {pct(p, y):.2f}, fake-quant top-1 {pct(fake, y):.2f}, same class {pct(p, fake):.2f} %")
    plain = int8.ort_predictions(export.ort_session(float_blob, 1), x)
    print(f"float top-1 {pct(plain, y):.2f}; float vs fake-quant same class {pct(plain, fake):.2f} %")


if __name__ == "__main__":
    main()
