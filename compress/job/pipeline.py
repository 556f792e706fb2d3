"""The stage list of `compress run`:

    config -> data + starting model -> baseline row -> method (one-shot `compress`, or `prepare`, its
    recovery fine-tune and rounds of `step` + fine-tune + validate with rollback) -> fine-tune -> final row
    -> model.pt

Each stage's row and state go through the run ledger (compress/job/ledger.py), so an interrupted run resumes
after its last finished stage or fine-tuning epoch without duplicating rows. The pipeline knows methods
only through the contract and capabilities of `compress.methods.base.Method`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from pathlib import Path

import torch
from torch import nn

from compress import CompressError, layers, methods, runtime
from compress import data as datasets
from compress.config import Config, ScheduleConfig
from compress.deploy import attacks, measure
from compress.job import checkpoints, sources
from compress.job.ledger import Progress, RunLedger, fingerprint
from compress.job.rounds import IterativeSchedule
from compress.methods.base import Context, Method
from compress.report import results
from compress.training import distributed, train

log = logging.getLogger("compress")


def resolve_device(spec: str) -> torch.device:
    if spec == "cuda" and not torch.cuda.is_available():
        raise CompressError("device: cuda was requested but no CUDA GPU is available (use device=cpu or device=auto)")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def build_method(options) -> Method:
    return methods.get(options.name)(options)


class Run:
    """One `compress run` in `run_dir`. `experiment` and `overrides` only label its rows."""

    def __init__(self, config: Config, run_dir: Path, experiment: str = "", overrides: str = "",
                 data: datasets.Data | None = None):
        self.config = config
        self._given_data = data  # the Python API's in-memory data sets (compress/api.py); None: from config.dataset
        self.run_dir = run_dir
        self.labels = {"experiment": experiment or "", "overrides": overrides or "", "paper_row": config.paper_row or ""}
        self.device = distributed.setup(config.device) or resolve_device(config.device)
        self.method = build_method(config.method)
        self._reference: nn.Module | None = None  # the baseline, for timing speed-ups (_latency_reference)
        self.starting_steps: list[dict] = []  # the compression the starting model.pt carried (_starting_model)
        self.spec = config.arch.spec  # the builder model.pt stores (compress.models.Spec)
        self.arch = self.spec.label   # its name in rows, logs and the methods' Context
        iterative = config.schedule.rounds > 0
        if self.method.requires_rounds and not iterative:
            recipe = f" (its recipe: schedule={self.method.recipe})" if self.method.recipe else ""
            raise CompressError(f"schedule.rounds: method '{self.method.name}' works in rounds; "
                                f"set schedule.rounds > 0{recipe}")
        if iterative and not self.method.iterative:
            raise CompressError(f"schedule.rounds: method '{self.method.name}' has no iterative step; "
                                "set schedule.rounds=0")

    # -- the stages -------------------------------------------------------------------------------------------
    def execute(self) -> Path:
        config = self.config
        open_ledger = lambda: RunLedger.open(self.run_dir, resume=config.resume, run_id=config.run_id,  # noqa: E731
                                             config_fingerprint=fingerprint(dataclasses.asdict(config)),
                                             writes=distributed.is_main())
        if distributed.is_main():  # data-parallel (torchrun): the other ranks read what rank 0 opened
            self.ledger = open_ledger()
        distributed.barrier()
        if not distributed.is_main():
            self.ledger = open_ledger()
        if self.ledger.done("final"):
            log.info("the run is already complete")
            return self.run_dir
        if config.threads:
            torch.set_num_threads(config.threads)
        log.info("%s", runtime.training_precision(self.device, config.schedule.amp))
        if config.schedule.compile and self.device.type == "cpu":
            log.info("schedule.compile: torch.compile (inductor) on the CPU: steps about 1.2x faster; compiling costs "
                     "minutes on a first run, seconds once its cache (TORCHINDUCTOR_CACHE_DIR) is warm "
                     "(docs/training-speed.md)")
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        self.data = self._load_data()
        self.ctx = self._context()

        model = self._starting_model()
        self._stage("baseline", lambda: model, measure_it=True)
        if config.schedule.rounds > 0:
            model = self._stage("compressed", lambda: self.method.prepare(model, self.ctx).to(self.device),
                                measure_it=self.method.changes_model, model=model)
            if config.schedule.prepare_epochs > 0:
                # Recover from `prepare` (e.g. layer conversion) before rounds are judged by the threshold.
                recovery = dataclasses.replace(config.schedule, epochs=config.schedule.prepare_epochs)
                model = self._stage("round_0", lambda: self._fit(model, recovery, "round_0"), status="accepted",
                                    model=model)
            model = self._rounds(model)
        elif self.method.parts():
            for index, part in enumerate(self.method.parts()):  # a row and a resume point per part
                model = self._stage(f"step_{index + 1}_{part}", lambda index=index, model=model: self.method.compress_part(
                    index, model, self.ctx).to(self.device), model=model)
            model = self._stage("compressed", lambda: model, measure_it=False, model=model)
        else:
            model = self._stage("compressed", lambda: self.method.compress(model, self.ctx).to(self.device),
                                measure_it=self.method.changes_model, model=model)
        model = self._stage("final", lambda: self._fit(model, config.schedule, "final"),
                            measure_it=config.schedule.epochs > 0, model=model)
        if distributed.is_main():
            checkpoints.atomic_save(self._pack(model), self.run_dir / "model.pt")
        log.info("done: %s", self.run_dir)
        return self.run_dir

    def _stage(self, stage: str, produce, *, measure_it: bool = True, status: str = "", model: nn.Module | None = None
               ) -> nn.Module:
        """Run a stage once: produce its model, record its row (measured, or the previous row's numbers
        when the stage left the model as it was). A stage already in the ledger returns `model` as is."""
        if self.ledger.done(stage):
            return model
        started = time.perf_counter()
        produced = produce()
        row = self._row(stage, produced, started, status) if measure_it else self._same_as_last(stage, started)
        if stage == "final":
            row.update(self._rounds_summary())
        if stage == "final" and self.config.measure.attacks:  # robust top-1 columns (compress/deploy/attacks.py)
            c = self.config
            row.update(attacks.robust_columns(produced, self.data.test, c.measure, mean=self.data.mean, std=self.data.std,
                                              seed=c.seed, amp=c.schedule.amp, device=self.device))
        if stage == "final" and self.config.measure.int8 and distributed.is_main():  # compress/deploy/int8.py
            row.update(self._int8_columns(produced))
        progress = dataclasses.replace(self.ledger.progress, baseline_val_top1=row["val_top1"]) if stage == "baseline" else None
        self._record(row, produced, progress)
        return produced

    def _rounds(self, model: nn.Module) -> nn.Module:
        s = self.config.schedule
        plan = IterativeSchedule.from_config(s, self.ledger.progress.baseline_val_top1)
        while not self.ledger.progress.rounds_over and self.ledger.progress.round < plan.rounds:
            progress = self.ledger.progress
            k = progress.round + 1
            started = time.perf_counter()
            snapshot, method_state = layers.clone(model), copy.deepcopy(self.method.state_dict())
            candidate = self.method.step(model, self.ctx, k, progress.step_scale)
            if candidate is None:
                log.info("round %d: the method has nothing left to compress; schedule ends", k)
                self.ledger.save(self._pack(snapshot), self.method.state_dict(),
                                 dataclasses.replace(progress, rounds_over=True))
                return snapshot
            # A round's fine-tune is redone from the round's start when interrupted (its step is deterministic).
            round_sched = dataclasses.replace(s, epochs=self.method.round_epochs(s.round_epochs))
            candidate = self._fit(candidate.to(self.device), round_sched, f"round_{k}", resumable=False)
            val_top1 = self._evaluate(candidate, self.data.val, "val")["top1"]
            if plan.accepts(val_top1):
                model = candidate
                self._record(self._row(f"round_{k}", model, started, "accepted"), model,
                             dataclasses.replace(progress, round=k))
                continue
            row = self._row(f"round_{k}", candidate, started, "rolled_back")
            model = snapshot  # the exact weights and structure accepted last
            shrink = self.method.rolled_back(method_state)
            outcome = plan.after_rollback(progress.rollbacks, progress.step_scale, shrink)
            log.info("round %d: val top-1 %.2f < %.2f: rolled back%s", k, val_top1, plan.threshold,
                     "; schedule ends" if outcome.over else f"; retrying with step scale {outcome.step_scale:g}")
            self._record(row, model, dataclasses.replace(progress, round=k, rollbacks=outcome.rollbacks,
                                                         step_scale=outcome.step_scale, rounds_over=outcome.over))
        return model

    # -- data, model, context -----------------------------------------------------------------------------------
    def _load_data(self):
        c = self.config
        data = self._given_data or datasets.load(c.dataset, mean=c.arch.mean, std=c.arch.std, search=c.paths.data,
                             cache_dir=Path(c.paths.cache).expanduser(), device=self.device,
                             channels_last=c.schedule.channels_last)
        log.info("data: %s — train %d, val %d (from %s), test %d", data.source, len(data.train), len(data.val),
                 data.val_from, len(data.test))
        return data

    def _starting_model(self) -> nn.Module:
        """The model as of the last recorded stage (resume), or the one `arch.checkpoint` names. When the
        fine-tunes distil, the model `arch.checkpoint` names is also the teacher (`self.teacher`), loaded
        again on resume and checked against the digest recorded when the run started."""
        self.teacher = None
        loaded = None
        if self.ledger.saved_model is None or self.config.schedule.distilling:
            loaded, self.starting_steps = sources.starting_point(self.config, self.data, self.device)
            loaded = loaded.to(self.device)
        else:
            self.starting_steps = sources.starting_steps(self.config)
        if self.config.schedule.distilling:
            self.teacher = layers.clone(loaded).eval()
            digest, recorded = checkpoints.digest(self.teacher), self.ledger.progress.teacher_digest
            if recorded is not None and recorded != digest:
                raise CompressError(f"arch.checkpoint: the teacher ({self.config.arch.checkpoint}) differs from the model "
                                    "this run started from; restore that file, or start a new run dir")
            self.ledger.remember(dataclasses.replace(self.ledger.progress, teacher_digest=digest))
        if self.ledger.saved_model is not None:
            model = sources.unpack(self.ledger.saved_model, self.spec, self.data.num_classes)
            self.method.load_state_dict(self.ledger.method_state)
            return model.to(self.device)
        return loaded

    def _calibration(self, batches: int, batch_size: int, augment: bool = False):
        """Deterministic batches from the training split (cycled when it is smaller than asked)."""
        limits = self.config.limits
        batches, batch_size = limits.cap(batches, limits.calibration_batches), limits.cap(batch_size, limits.batch_size)
        g = torch.Generator().manual_seed(self.config.seed)
        produced = 0
        while produced < batches:
            for x, _ in self.data.train.batches(batch_size, shuffle=True, augment=augment, generator=g):
                if produced == batches:
                    return
                produced += 1
                yield x.to(self.device)

    def _context(self) -> Context:
        return Context(device=self.device, arch=self.arch, num_classes=self.data.num_classes,
                       input_shape=self.data.image_shape, seed=self.config.seed, log=log,
                       calibration=self._calibration,
                       evaluate=lambda m: self._evaluate(m, self.data.val, "val")["top1"],
                       quick=self.config.limits.quick)

    def _evaluate(self, model: nn.Module, split, desc: str) -> dict:
        return train.evaluate(model, split, self.device, self.config.measure.eval_batch_size,
                              amp=self.config.schedule.amp, desc=desc)

    def _fit(self, model: nn.Module, sched: ScheduleConfig, stage: str, resumable: bool = True) -> nn.Module:
        """Fine-tune; a resumable fine-tune saves per-epoch state, so that, interrupted, it resumes at its epoch."""
        # Each fine-tune draws its own image order and augmentations: with the run's seed alone, every round
        # (and the final's first epochs) replayed the same batches, so a capped epoch (schedule.max_batches)
        # saw the same subset round after round instead of fresh images.
        model, _ = train.fit(model, self.data.train, self.data.val, sched, self.device,
                             seed=train.stage_seed(self.config.seed, stage),
                             resume=self.ledger.fit_resume_state(stage) if resumable else None,
                             on_epoch_end=(lambda s: self.ledger.save_fit(stage, s)) if resumable else None,
                             desc=stage, eval_batch_size=self.config.measure.eval_batch_size, teacher=self.teacher)
        return model

    # -- rows -------------------------------------------------------------------------------------------------------
    def _row(self, stage: str, model: nn.Module, started: float, status: str = "") -> dict:
        test = self._evaluate(model, self.data.test, f"{stage} test")
        val = self._evaluate(model, self.data.val, f"{stage} val")
        m = self.config.measure
        timed = m.latency and distributed.is_main()  # data-parallel: rank 0's row is the one kept
        row = {"run_id": self.ledger.run_id, **self.labels, "method": self.method.name, "arch": self.arch,
               "dataset": self.data.name, "seed": self.config.seed, "stage": stage, "status": status,
               "top1": round(test["top1"], 3), "top5": round(test["top5"], 3), "loss": round(test["loss"], 5),
               "val_top1": round(val["top1"], 3), "val_from": self.data.val_from,
               **measure.model_costs(model, self.data.image_shape, storage_bytes=self.method.storage_bytes(model),
                                     latency=timed, latency_repeats=m.latency_repeats, threads=self.config.threads,
                                     reference=self._latency_reference(stage, model) if timed else None,
                                     ort=m.ort_latency)}
        row["wall_s"] = round(time.perf_counter() - started, 2)
        return results.with_reductions(row, self.ledger.baseline or row)

    def _latency_reference(self, stage: str, model: nn.Module) -> nn.Module | None:
        """The baseline the speed-ups are timed against, in its timed form, made once: the model as loaded
        (None for the baseline row itself). On resume it is loaded again from `arch.checkpoint` (the
        teacher, when distilling)."""
        if stage == "baseline":
            self._reference = measure.deployable_cpu(model)
            return None
        if self._reference is None:
            loaded = self.teacher if self.teacher is not None else sources.starting_model(self.config, self.data, self.device)
            self._reference = measure.deployable_cpu(loaded)
        return self._reference

    def _int8_columns(self, model: nn.Module) -> dict:
        """The final model as `compress export --int8` makes it: its top-1 beside the float export's and the
        ONNX Runtime speed-ups. A model that misses the tolerance still gets its columns (the row records it)."""
        from compress.deploy import int8

        m = self.config.measure
        calibration, _ = int8.draw(self.data.train, m.int8_calibration)
        images, labels = int8.draw(self.data.test, m.int8_test_images)
        cpu_model = layers.clone(model).cpu().eval()
        done = int8.build(cpu_model, self.data.image_shape, calibration.cpu(), images.cpu(), labels.cpu(),
                          f"{len(images)} test images", threads=self.config.threads, repeats=m.latency_repeats,
                          tolerance=float("inf"), time_it=m.latency)
        log.info("int8: top-1 %.2f (float export %.2f), ONNX Runtime speed-up b1 %.2fx, b64 %.2fx on %s",
                 done.int8_top1, done.float_top1, done.speedup[1], done.speedup[64], done.cpu)
        return done.columns()

    def _rounds_summary(self) -> dict:
        """For the final row of an iterative run: how many rounds were accepted and rolled back."""
        if self.config.schedule.rounds <= 0:
            return {"rounds_accepted": "", "rounds_rolled_back": ""}
        rounds = [r for r in self.ledger.rows if r["stage"].startswith("round_") and r["stage"] != "round_0"]
        accepted = sum(r.get("status") == "accepted" for r in rounds)
        rolled_back = sum(r.get("status") == "rolled_back" for r in rounds)
        log.info("rounds: %d accepted, %d rolled back (of at most %d)", accepted, rolled_back, self.config.schedule.rounds)
        return {"rounds_accepted": accepted, "rounds_rolled_back": rolled_back}

    def _same_as_last(self, stage: str, started: float) -> dict:
        """The row of a stage that did not change the model: the numbers of the last row that describes the
        model as it is (a rolled-back round's row describes the candidate that was thrown away)."""
        last = next(r for r in reversed(self.ledger.rows) if r.get("status") != "rolled_back")
        return dict(last, stage=stage, status="", wall_s=round(time.perf_counter() - started, 2))

    def _pack(self, model: nn.Module) -> dict:
        """model.pt: the method's structure, after the structure the starting model.pt already had (a run from a
        compressed model then saves the two as one chain, which rebuilds both)."""
        method, meta = self.method.name, self.method.meta(model)
        steps = self.starting_steps + sources.compression_steps({"method": method, "meta": meta})
        if self.starting_steps:
            method, meta = ("chain", {"steps": steps}) if len(steps) > 1 else (steps[0]["method"], steps[0]["meta"])
        return checkpoints.pack(model, self.spec, method, meta, num_classes=self.data.num_classes,
                                input_shape=self.data.image_shape)

    def _record(self, row: dict, model: nn.Module, progress: Progress | None = None) -> None:
        self.ledger.record(row, self._pack(model), self.method.state_dict(), progress)
