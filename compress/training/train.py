"""Training and evaluation loops. The schedule is a `ScheduleConfig` (the `schedule` config group)."""
from __future__ import annotations

import contextlib
import logging
import math
import time
import zlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from compress import CompressError, runtime
from compress.config import ScheduleConfig
from compress.data.base import Split
from compress.training import distributed

log = logging.getLogger("compress")


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on CUDA when `enabled` (schedule.amp); a no-op elsewhere. Evaluation and the attacks
    run the model through this context, so every number reported on the CPU is computed in float32."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def training_autocast(device: torch.device, dtype: torch.dtype | None):
    """The training steps' context (forward, loss, a distillation teacher's forward): autocast to `dtype`
    (compress.runtime.training_dtype, decided once per fit: bfloat16 on CUDA and on a CPU with native
    bfloat16, when schedule.amp is on), or float32 for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, device: torch.device, batch_size: int = 500, amp: bool = False,
             desc: str = "eval") -> dict[str, float]:
    """top-1 / top-5 accuracy in percent and mean cross-entropy over the whole split."""
    was_training = model.training
    model.eval()
    correct1 = correct5 = 0
    loss_sum = 0.0
    n = 0
    k = min(5, _num_outputs(model, split, device))
    for x, y in tqdm(split.batches(batch_size), total=math.ceil(len(split) / batch_size), desc=desc,
                     leave=False, disable=None):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        topk = logits.topk(k, dim=1).indices
        hits = topk.eq(y[:, None])
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        n += y.numel()
    model.train(was_training)
    if n == 0:
        return {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}
    return {"top1": 100.0 * correct1 / n, "top5": 100.0 * correct5 / n, "loss": loss_sum / n}


def _num_outputs(model: nn.Module, split: Split, device: torch.device) -> int:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else 5


def make_optimizer(model: nn.Module, sched: ScheduleConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=sched.lr,
                           momentum=sched.momentum, weight_decay=sched.weight_decay,
                           nesterov=sched.nesterov and sched.momentum > 0)


def make_scheduler(opt: torch.optim.Optimizer, sched: ScheduleConfig, steps_per_epoch: int):
    """Stepped once per batch. A linear warm-up from lr/10 over `warmup_epochs` precedes every schedule
    but one-cycle (which warms up itself); the main schedule then runs over the remaining steps."""
    lr_sched = torch.optim.lr_scheduler
    total = max(1, sched.epochs * steps_per_epoch)
    if sched.scheduler == "onecycle":
        return lr_sched.OneCycleLR(opt, max_lr=sched.lr, total_steps=total)
    warm = min(sched.warmup_epochs * steps_per_epoch, total - 1)
    after_warmup = total - warm
    if sched.scheduler == "cosine":
        main = lr_sched.CosineAnnealingLR(opt, T_max=after_warmup)
    elif sched.scheduler == "multistep":
        # Milestones are epochs of the whole schedule; the main schedule's steps start after the warm-up.
        main = lr_sched.MultiStepLR(opt, [max(1, m * steps_per_epoch - warm) for m in sched.milestones], sched.gamma)
    else:  # constant (the choices are checked by ScheduleConfig)
        main = lr_sched.ConstantLR(opt, factor=1.0, total_iters=0)
    if warm <= 0:
        return main
    warmup = lr_sched.LinearLR(opt, start_factor=0.1, end_factor=1.0, total_iters=warm)
    return lr_sched.SequentialLR(opt, [warmup, main], milestones=[warm])


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target term: T^2 * KL(softmax(teacher / T) || softmax(student / T)), mean over the
    batch. The T^2 keeps its gradient on the scale of the cross-entropy's whatever T is."""
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), F.log_softmax(teacher_logits.float() / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


class FeatureTaps:
    """Forward hooks keeping the latest output of named modules (`outputs[name]`), removed by `close`."""

    def __init__(self, model: nn.Module, names: list[str], key: str = "schedule.distill_features"):
        modules = dict(model.named_modules())
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise CompressError(f"{key}: no module named {unknown[0]!r} in the model (names as in model.named_modules(), "
                                f"e.g. {', '.join(list(modules)[1:4])})")
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._keeper(n)) for n in names]

    def _keeper(self, name: str):
        def keep(module, inputs, output):
            self.outputs[name] = output
        return keep

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.outputs.clear()


class Distiller:
    """The distillation part of a fine-tune's loss (schedule.distill, temperature, distill_features): the
    teacher, frozen in eval mode, sees the same augmented batch as the student."""

    def __init__(self, teacher: nn.Module, student: nn.Module, sched: ScheduleConfig):
        self.teacher, self.weight, self.temperature = teacher.eval(), float(sched.distill), sched.temperature
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.feature_weight, self.names = float(sched.feature_weight), list(sched.distill_features)
        self.student_taps = FeatureTaps(student, self.names)
        self.teacher_taps = FeatureTaps(self.teacher, self.names)

    def loss(self, x: torch.Tensor, y: torch.Tensor, student_logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
        """(1 - distill) * CE + distill * KD + feature_weight * mean over features of MSE (student's taps are
        filled by the student's forward that produced `student_logits`)."""
        with torch.no_grad():
            teacher_logits = self.teacher(x)
        loss = student_logits.new_zeros(())
        if self.weight < 1:
            loss = loss + (1 - self.weight) * F.cross_entropy(student_logits, y, label_smoothing=label_smoothing)
        if self.weight > 0:
            loss = loss + self.weight * distillation_loss(student_logits, teacher_logits, self.temperature)
        if self.names:
            terms = []
            for n in self.names:
                s, t = self.student_taps.outputs[n], self.teacher_taps.outputs[n]
                if s.shape != t.shape:
                    raise CompressError(f"schedule.distill_features: {n!r} gives {tuple(s.shape)} in the compressed "
                                        f"model but {tuple(t.shape)} in the teacher; name modules whose outputs keep "
                                        "their shape")
                terms.append(F.mse_loss(s.float(), t.float()))
            loss = loss + self.feature_weight * torch.stack(terms).mean()
        return loss

    def __enter__(self) -> "Distiller":
        return self

    def __exit__(self, *exc) -> None:
        self.student_taps.close()
        self.teacher_taps.close()


def stage_seed(seed: int, stage: str) -> int:
    """The data-order seed of one fine-tune of a run: the run's seed mixed with the stage's name
    ("round_3", "final"), stable across processes (unlike hash()), so a resumed stage replays its batches."""
    return (seed * 1_000_003 + zlib.crc32(stage.encode())) % 2**62


def fit(model: nn.Module, train: Split, val: Split, sched: ScheduleConfig, device: torch.device, *, seed: int = 0,
        resume: dict | None = None, on_epoch_end: Callable[[dict], None] | None = None, desc: str = "train",
        eval_batch_size: int = 500, teacher: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """Train for sched.epochs, keep the weights of the best epoch by validation top-1 (never test).

    `resume` is a state dict produced by a previous call's `on_epoch_end`; training continues after its
    last finished epoch with the same optimizer, scheduler and random state. `teacher` (required when the
    schedule distils, ignored otherwise) is the model distilled from.
    """
    epochs = sched.epochs
    info = {"epochs_run": 0, "best_epoch": None, "best_val_top1": None}
    if epochs <= 0:
        return model, info
    if sched.distilling and teacher is None:
        raise CompressError("schedule.distill: this fine-tune has no teacher to distil from")
    if sched.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, sched)
    batches_per_epoch = math.ceil(len(train) / sched.batch_size)
    if sched.max_batches:
        batches_per_epoch = min(batches_per_epoch, sched.max_batches)
    scheduler = make_scheduler(opt, sched, batches_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    start, best_top1, best_state, best_epoch = 0, -1.0, None, None
    if resume:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        start, best_top1, best_state, best_epoch = (resume["epoch"], resume["best_val_top1"],
                                                    resume["best_state"], resume["best_epoch"])
        log.info("%s: resuming after epoch %d (best val top-1 %.2f at epoch %s)", desc, start, best_top1, best_epoch)
    step_dtype = runtime.training_dtype(device, sched.amp)  # once: it reads the CPU's flags
    if distributed.world_size() > sched.batch_size:
        raise CompressError(f"schedule.batch_size: {sched.batch_size} images cannot be split over "
                            f"{distributed.world_size()} data-parallel ranks")
    # Data-parallel under torchrun: each rank steps on its shard of the global batch (compress/training/distributed.py).
    step_model = distributed.wrap(model, device)
    # torch.compile (inductor) on CUDA and CPU, opt-in: on the CPU it pays back only with a warm cache
    # (docs/training-speed.md). Evaluation runs `model`, eagerly.
    step_model = torch.compile(step_model) if sched.compile and device.type in ("cuda", "cpu") else step_model
    smoothing = sched.label_smoothing
    with contextlib.ExitStack() as stack:
        distiller = stack.enter_context(Distiller(teacher, model, sched)) if sched.distilling else None
        for epoch in range(start, epochs):
            model.train()
            running, seen = 0.0, 0
            epoch_started = time.perf_counter()
            bar = tqdm(train.batches(sched.batch_size, shuffle=True, augment=True, generator=generator,
                                     max_batches=batches_per_epoch),
                       total=batches_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}", leave=False, disable=None)
            for x, y in bar:
                x, y = distributed.shard(x, y)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with training_autocast(device, step_dtype):
                    logits = step_model(x)
                    loss = (distiller.loss(x, y, logits, smoothing) if distiller is not None
                            else F.cross_entropy(logits, y, label_smoothing=smoothing))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                scheduler.step()
                running += loss.item() * y.numel()
                seen += y.numel()
                bar.set_postfix(loss=f"{running / seen:.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            running, seen = distributed.total([running, seen])
            distributed.share_buffers(model)  # the ranks evaluate, and keep the best epoch, alike
            images_per_s = seen / max(time.perf_counter() - epoch_started, 1e-9)
            val_top1 = evaluate(model, val, device, eval_batch_size, sched.amp, desc="val")["top1"]
            log.info("%s epoch %d/%d: train loss %.4f, val top-1 %.2f (%.0f images/s%s)", desc, epoch + 1, epochs,
                     running / max(seen, 1), val_top1, images_per_s, ", distilling" if distiller is not None else "")
            if val_top1 > best_top1:
                best_top1, best_epoch = val_top1, epoch + 1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            info.update(epochs_run=epoch + 1, best_epoch=best_epoch, best_val_top1=best_top1)
            if on_epoch_end:
                on_epoch_end({"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                              "best_val_top1": best_top1, "best_state": best_state, "best_epoch": best_epoch})
    if best_state is not None:
        model.load_state_dict(best_state)
    log.info("%s: kept epoch %s (val top-1 %.2f)", desc, best_epoch, best_top1)
    return model, info
