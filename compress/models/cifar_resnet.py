"""CIFAR ResNets (He et al. 2016) with the parameter-free "option A" shortcut.

Parameter names match akamaster/pytorch_resnet_cifar10 (conv1, bn1, layer{1,2,3}.{i}.conv1/bn1/conv2/bn2,
linear) so its published checkpoints load as they are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample space by `stride` and route input channels to output channels, the
    other output channels being zero (no parameters).

    Unpruned it zero-pads the channel axis: input channel i goes to output channel `pad_front + i`.
    Structured pruning can remove channels on either side independently (the shortcut is the only place
    where the residual streams of two stages meet), so after `set_routes` it holds an explicit routing:
    input channel `in_index[r]` -> output channel `out_index[r]`, `out_channels` outputs in all. The routing
    lives in non-persistent buffers (pretrained checkpoints hold nothing for this module); pruned models
    record it in their `meta` (see compress.prune.engine).
    """

    def __init__(self, pad_front: int, pad_back: int, stride: int = 2):
        super().__init__()
        self.pad_front, self.pad_back, self.stride = pad_front, pad_back, stride
        self.in_channels: int | None = None  # known once routed
        self.out_channels: int | None = None
        self.register_buffer("in_index", None, persistent=False)
        self.register_buffer("out_index", None, persistent=False)

    @property
    def routed(self) -> bool:
        return self.in_index is not None

    def set_routes(self, in_channels: int, out_channels: int, in_index, out_index) -> None:
        """Route input channel `in_index[r]` to output channel `out_index[r]` (both 1-D, equal length)."""
        device = self.in_index.device if self.in_index is not None else None
        in_index = torch.as_tensor(in_index, dtype=torch.long, device=device).flatten()
        out_index = torch.as_tensor(out_index, dtype=torch.long, device=device).flatten()
        if in_index.shape != out_index.shape:
            raise ValueError("ShortcutA routes need as many input as output indices")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.in_index, self.out_index = in_index, out_index
        # The pad fast path applies while the routes are "all inputs, in order, to a contiguous block".
        contiguous = len(in_index) == in_channels and (
            len(in_index) == 0
            or (
                torch.equal(in_index.cpu(), torch.arange(in_channels))
                and torch.equal(out_index.cpu(), torch.arange(len(out_index)) + int(out_index[0]))
            )
        )
        if contiguous:
            front = int(out_index[0]) if len(out_index) else out_channels
            self.pad_front, self.pad_back = front, out_channels - front - len(out_index)
        else:
            self.pad_front = self.pad_back = None

    def set_padding_routes(self, in_channels: int) -> None:
        """Make the unpruned zero-padding explicit as routes (needed before pruning)."""
        out_channels = in_channels + self.pad_front + self.pad_back
        index = torch.arange(in_channels)
        self.set_routes(in_channels, out_channels, index, index + self.pad_front)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One autograd node for the whole shortcut, so that graph tracers (Torch-Pruning) see this module
        # as a single operation between its input and output. TorchScript's tracer cannot record a Python
        # autograd Function, so a trace (`compress export --format torchscript`) records the plain ops.
        if torch.jit.is_tracing():
            return self._route(x)
        return _RouteChannels.apply(x, self)

    def _route(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_front is not None:
            return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))
        out = x.new_zeros(x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        out.index_copy_(1, self.out_index, x.index_select(1, self.in_index))
        return out

    def extra_repr(self) -> str:
        if self.pad_front is not None:
            return f"pad=({self.pad_front}, {self.pad_back}), stride={self.stride}"
        return f"{self.in_channels}->{self.out_channels}, routes={len(self.in_index)}, stride={self.stride}"


class _RouteChannels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, shortcut: ShortcutA) -> torch.Tensor:
        ctx.shortcut, ctx.input_shape = shortcut, x.shape
        return shortcut._route(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shortcut, stride = ctx.shortcut, ctx.shortcut.stride
        grad_input = grad.new_zeros(ctx.input_shape)
        strided = grad_input[:, :, ::stride, ::stride]
        if shortcut.pad_front is not None:
            strided.copy_(grad[:, shortcut.pad_front : grad.shape[1] - shortcut.pad_back])
        else:
            strided.index_copy_(1, shortcut.in_index, grad.index_select(1, shortcut.out_index))
        return grad_input, None


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1, mid_planes: int | None = None):
        super().__init__()
        mid = planes if mid_planes is None else mid_planes
        self.conv1 = nn.Conv2d(in_planes, mid, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            extra = planes - in_planes
            self.shortcut: nn.Module = ShortcutA(extra // 2, extra - extra // 2, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, num_classes: int = 10, widths: tuple[int, int, int] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for stage, (planes, stride) in enumerate(zip(widths, (1, 2, 2)), start=1):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet(depth: int, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(depth, num_classes)
