"""Data-parallel fine-tuning and pretraining under torchrun:

    torchrun --standalone --nproc_per_node=N -m compress run hydra.run.dir=DIR [overrides]

Every rank runs the same pipeline on the same data. Only training is split: each global batch
(`schedule.batch_size`, the same batch as one process would take, augmented identically) is cut into N
shards, one per rank, and DistributedDataParallel averages the gradients (gloo on the CPU, nccl on CUDA
GPUs, one GPU per rank). Everything else — scoring, calibration, pruning, evaluation, rollback decisions —
runs on every rank on the full data: it is deterministic given the seed, so the ranks agree, and DDP
checks that every rank holds the same shapes when it wraps the model (and starts them from rank 0's
weights). BatchNorm statistics are per rank during a step (as in DDP without SyncBatchNorm); after each
epoch rank 0's running statistics are broadcast, so the ranks evaluate and choose the best epoch alike.
Rank 0 alone writes rows, state, model and logs; a resumed run reads the same state on every rank.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from compress import CompressError


def launched() -> bool:
    """Started by torchrun with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        raise CompressError(f"WORLD_SIZE: {os.environ.get('WORLD_SIZE')!r} is not a number (set by torchrun)") from None


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    return torch.distributed.get_world_size() if _initialised() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _initialised() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device_spec: str) -> torch.device | None:
    """Join torchrun's process group once (nccl when this rank gets a CUDA GPU, else gloo) and return this
    rank's device; None when not launched by torchrun (one process, the usual device rules)."""
    if not launched():
        return None
    cuda = device_spec in ("cuda", "auto") and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not _initialised():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    return torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")


def teardown() -> None:
    if _initialised():
        torch.distributed.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` for training steps: DistributedDataParallel over the ranks (the model itself with one)."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shard(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a global batch: every world_size-th image, starting at its rank. A batch with
    fewer images than ranks (an epoch's last) is repeated, so that every rank takes part in the step."""
    n, r = world_size(), rank()
    if n == 1:
        return x, y
    index = torch.arange(r, max(len(x), n), n, device=x.device) % len(x)
    return x.index_select(0, index), y.index_select(0, index)


def total(values: list[float]) -> list[float]:
    """Sums over the ranks (the values themselves with one)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def share_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if world_size() == 1:
        return
    for buffer in model.buffers():
        if buffer.dtype != torch.bool:  # flags (a quantiser's `observed`) are set alike on every rank
            torch.distributed.broadcast(buffer.data, src=0)
