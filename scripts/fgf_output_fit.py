"""Why an FGF conversion loses the layer: fit one conv's FGF to its pretrained *weights* (what
`method=fgfp` does) and then to its *outputs* on real inputs, and compare both by the output correlation
and the top-1 right after conversion (BatchNorm statistics re-estimated on training images):
what `method.fit=outputs` adds to the default `weights`.

    .venv/bin/python scripts/fgf_output_fit.py --layer layer3.1.conv1 \
        --checkpoint ../shared/pretrained/resnet20-12fca82f.th --data ../shared/cifar10

Measured (docs/fgfp.md, "Known limits"): the output fit helps little, because one separable bump across
the input channels cannot hold what the layer computes; recovery has to come from fine-tuning.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from compress.data.cifar import load_cifar10
from compress.job import sources
from compress.layers import fgf

SPEC = dict(terms=15, step=0.25, grid="pixel", amplitude=False)  # FGFPOptions' defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--layer", default="layer3.1.conv1")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="CIFAR-10 root")
    parser.add_argument("--images", type=int, default=1024, help="training images whose layer inputs are fitted")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.02)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    arch = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "arch" / f"{args.arch}.yaml")
    mean, std = (torch.tensor(list(arch[k])).view(1, 3, 1, 1) for k in ("mean", "std"))
    data, _, _ = load_cifar10(Path(args.data), False, Path.home() / ".cache" / "compress" / "data")
    norm = lambda u8: (u8.float() / 255 - mean) / std  # noqa: E731
    # the image-folder layout is sorted by class: take the training images in a random order
    train = data["train_x"][torch.randperm(len(data["train_x"]))[:max(args.images, 2560)]]
    test, labels = data["test_x"], data["test_y"]
    load = lambda: sources.from_file(args.checkpoint, args.arch, 10, [], Path.home() / ".cache" / "compress")  # noqa: E731

    @torch.no_grad()
    def top1(model) -> float:
        model.train()  # re-estimate the BatchNorm statistics for the converted layer, then evaluate
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        for i in range(0, 2560, 128):
            model(norm(train[i:i + 128]))
        model.eval()
        hits = sum(int((model(norm(test[i:i + 500])).argmax(1) == labels[i:i + 500]).sum())
                   for i in range(0, len(test), 500))
        return 100.0 * hits / len(test)  # the whole test set: its image-folder order is by class too

    base = load()
    conv = base.get_submodule(args.layer)
    inputs = []
    hook = conv.register_forward_hook(lambda mod, i, o: inputs.append(i[0].detach()))
    with torch.no_grad():
        base.eval()
        for i in range(0, args.images, 128):
            base(norm(train[i:i + 128]))
    hook.remove()
    x = torch.cat(inputs)
    with torch.no_grad():
        y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding)
    model = load()
    error = fgf.convert(model, [args.layer], SPEC, 100, 0.05, [0.25, 1.0, 1.75])[args.layer]
    layer = model.get_submodule(args.layer)
    start = fgf.output_correlation(layer, x, fgf.standardised(y))
    print(f"{args.layer}: weight fit, relative error {error:.3f}, output correlation {start:.3f}, "
          f"top-1 {top1(model):.2f} (dense: {top1(load()):.2f})")
    _, end = fgf.fit_outputs(layer, x, y, args.steps, args.lr)  # what method.fit=outputs does
    print(f"{args.layer}: then fitted to its outputs ({args.steps} Adam steps on {x.shape[0]} images' inputs), "
          f"output correlation {end:.3f}, top-1 {top1(model):.2f}")


if __name__ == "__main__":
    main()
