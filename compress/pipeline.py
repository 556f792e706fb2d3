"""The stage sequence of `compress run`:

    config -> data + model -> baseline row -> method (one-shot `compress`, or `prepare` then rounds of
    `step` + fine-tune + validate with rollback) -> fine-tune -> final row -> model.pt

Every finished stage is appended to metrics.csv and recorded in state.pt (written atomically), so an
interrupted run resumes (`resume=true`) after its last finished stage or fine-tuning epoch without
duplicating rows. The pipeline knows methods only through `compress.methods.base.Method`.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress import CompressError, checkpoints, data as datasets, measure, methods, models, results, train
from compress.methods.base import Context, Method

log = logging.getLogger("compress")

SCHEDULERS = ("constant", "multistep", "cosine", "onecycle")


# ----------------------------------------------------------------------------------------------------
# validation of plain config values (Hydra checks the keys; this checks the values)
def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise CompressError(f"{key}: {msg}")


def validate(cfg: dict) -> None:
    _check(cfg["device"] in ("auto", "cpu", "cuda"), "device", f"must be auto, cpu or cuda, got {cfg['device']!r}")
    _check(isinstance(cfg["seed"], int) and cfg["seed"] >= 0, "seed", f"must be a non-negative integer, got {cfg['seed']!r}")
    d = cfg["dataset"]
    for key in ("train_size", "test_size"):
        _check(d.get(key) is None or (isinstance(d[key], int) and d[key] >= 1), f"dataset.{key}",
               f"must be null or a positive integer, got {d.get(key)!r}")
    _check(isinstance(d["val_size"], int) and d["val_size"] >= 1, "dataset.val_size",
           f"must be a positive integer (decisions need a validation split), got {d['val_size']!r}")
    for group in ("schedule", "pretrain"):
        s = cfg[group]
        num = lambda k: isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool)  # noqa: E731
        _check(isinstance(s["epochs"], int) and s["epochs"] >= 0, f"{group}.epochs", f"must be an integer >= 0, got {s['epochs']!r}")
        _check(num("lr") and s["lr"] > 0, f"{group}.lr", f"must be > 0, got {s['lr']!r}")
        _check(isinstance(s["batch_size"], int) and s["batch_size"] >= 1, f"{group}.batch_size",
               f"must be a positive integer, got {s['batch_size']!r}")
        _check(num("momentum") and 0 <= s["momentum"] < 1, f"{group}.momentum", f"must be in [0, 1), got {s['momentum']!r}")
        _check(num("weight_decay") and s["weight_decay"] >= 0, f"{group}.weight_decay", f"must be >= 0, got {s['weight_decay']!r}")
        _check(s["scheduler"] in SCHEDULERS, f"{group}.scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {s['scheduler']!r}")
        _check(num("label_smoothing") and 0 <= s["label_smoothing"] < 1, f"{group}.label_smoothing",
               f"must be in [0, 1), got {s['label_smoothing']!r}")
        _check(isinstance(s["rounds"], int) and s["rounds"] >= 0, f"{group}.rounds", f"must be an integer >= 0, got {s['rounds']!r}")
        for key in ("round_epochs", "prepare_epochs"):
            _check(isinstance(s[key], int) and s[key] >= 0, f"{group}.{key}", f"must be an integer >= 0, got {s[key]!r}")
        _check(s["on_rollback"] in ("stop", "shrink"), f"{group}.on_rollback", f"must be stop or shrink, got {s['on_rollback']!r}")
        _check(num("shrink_factor") and 0 < s["shrink_factor"] < 1, f"{group}.shrink_factor",
               f"must be in (0, 1), got {s['shrink_factor']!r}")
        _check(s["min_top1"] is None or (num("min_top1") and 0 <= s["min_top1"] <= 100), f"{group}.min_top1",
               f"must be null or a percentage in [0, 100], got {s['min_top1']!r}")
        _check(s["max_drop"] is None or (num("max_drop") and s["max_drop"] >= 0), f"{group}.max_drop",
               f"must be null or >= 0 (percentage points), got {s['max_drop']!r}")
        _check(s.get("max_batches") is None or (isinstance(s["max_batches"], int) and s["max_batches"] >= 1),
               f"{group}.max_batches", f"must be null or a positive integer, got {s.get('max_batches')!r}")
    m = cfg["measure"]
    _check(isinstance(m["latency_repeats"], int) and m["latency_repeats"] >= 1, "measure.latency_repeats",
           f"must be a positive integer, got {m['latency_repeats']!r}")


def resolve_device(spec: str) -> torch.device:
    if spec == "cuda" and not torch.cuda.is_available():
        raise CompressError("device: cuda was requested but no CUDA GPU is available (use device=cpu or device=auto)")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def build_method(params: dict) -> Method:
    name = params.get("name")
    cls = methods.get(name)
    kwargs = {k: v for k, v in params.items() if k != "name"}
    # Constructors reject unknown keys themselves (Method.__init__ with a CompressError); a plain
    # TypeError from a signature without **kwargs is turned into the same one-line error.
    accepted = [p.name for p in inspect.signature(cls.__init__).parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    try:
        return cls(**kwargs)
    except TypeError as e:
        unknown = next((k for k in kwargs if k not in accepted), None)
        if unknown is None:
            raise
        raise CompressError(f"method.{unknown}: not an option of method '{name}' (options: {', '.join(accepted)})") from e


def smoke_overrides(cfg: dict) -> dict:
    """Quick mode: synthetic data shaped like the configured set, random weights, a few batches."""
    cfg = copy.deepcopy(cfg)
    for group in ("schedule", "pretrain"):
        s = cfg[group]
        s.update(epochs=min(s["epochs"], 1), round_epochs=min(s["round_epochs"], 1), rounds=min(s["rounds"], 2),
                 prepare_epochs=min(s["prepare_epochs"], 1),
                 max_batches=2, batch_size=min(s["batch_size"], 16), compile=False)
    cfg["measure"]["latency"] = False
    return cfg


# ----------------------------------------------------------------------------------------------------
class Run:
    """One `compress run`: owns the run directory, the rows and the resumable state."""

    def __init__(self, cfg: dict, run_dir: Path):
        validate(cfg)
        self.cfg = smoke_overrides(cfg) if cfg.get("smoke") else cfg
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.csv"
        self.state_path = run_dir / "state.pt"
        self.device = resolve_device(cfg["device"])
        self.method = build_method(cfg["method"])  # before any heavy work: bad options fail fast
        self.arch = cfg["arch"]["name"]
        self.cache = Path(cfg["paths"]["cache"]).expanduser()
        self.state: dict[str, Any] = {}
        self.baseline: dict | None = None

    # -- state --------------------------------------------------------------------------------------
    def _config_fingerprint(self) -> str:
        keep = {k: v for k, v in self.cfg.items() if k not in ("resume", "run_id", "threads", "overrides")}
        return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _save_state(self, model: nn.Module, **extra) -> None:
        self.state.update(extra)
        self.state["model"] = checkpoints.pack(model, self.arch, self.method.name, self.method.meta(model))
        self.state["method_state"] = self.method.state_dict()
        checkpoints.atomic_save(self.state, self.state_path)

    def _record(self, row: dict, model: nn.Module, **extra) -> None:
        """A stage is done: its row goes into the state (atomically) and then into metrics.csv."""
        self.state.setdefault("rows", []).append(row)
        self._save_state(model, train=None, **extra)
        results.append_row(self.metrics_path, row)
        log.info("%-10s top-1 %.2f (val %.2f)  params %s (nonzero %s)  MACs %.2fM  %s", row["stage"], row["top1"],
                 row["val_top1"], row["params"], row["params_nonzero"], row["macs"] / 1e6, row.get("status", ""))

    def _done(self, stage: str) -> bool:
        return any(r["stage"] == stage for r in self.state.get("rows", []))

    # -- data, context ------------------------------------------------------------------------------
    def _load_data(self) -> None:
        cfg = self.cfg
        self.data = datasets.load(cfg["dataset"], mean=cfg["arch"]["mean"], std=cfg["arch"]["std"],
                                  search=cfg["paths"]["data"], cache_dir=self.cache, device=self.device,
                                  channels_last=cfg["schedule"].get("channels_last", True), smoke=cfg.get("smoke", False))
        log.info("data: %s — train %d, val %d, test %d", self.data.source, len(self.data.train), len(self.data.val),
                 len(self.data.test))

    def _calibration(self, batches: int, batch_size: int, augment: bool = False):
        """Deterministic batches from the training split (cycled when it is smaller than asked)."""
        if self.cfg.get("smoke"):
            batches, batch_size = min(batches, 2), min(batch_size, 16)
        g = torch.Generator().manual_seed(self.cfg["seed"])
        produced = 0
        while produced < batches:
            for x, _ in self.data.train.batches(batch_size, shuffle=True, augment=augment, generator=g):
                if produced == batches:
                    return
                produced += 1
                yield x.to(self.device)

    def context(self) -> Context:
        return Context(device=self.device, arch=self.arch, num_classes=self.data.num_classes,
                       input_shape=self.data.image_shape, seed=self.cfg["seed"], log=log,
                       calibration=self._calibration,
                       evaluate=lambda m: self._evaluate(m, self.data.val, "val")["top1"],
                       quick=bool(self.cfg.get("smoke")))

    def _evaluate(self, model: nn.Module, split, desc: str) -> dict:
        return train.evaluate(model, split, self.device, self.cfg["measure"]["eval_batch_size"],
                              amp=bool(self.cfg["schedule"].get("amp")), desc=desc)

    # -- model --------------------------------------------------------------------------------------
    def _fresh_model(self) -> nn.Module:
        return models.build(self.arch, self.data.num_classes)

    def _unpack(self, packed: dict) -> nn.Module:
        """A model from this project's own format, restoring any compressed structure."""
        if packed.get("arch") != self.arch:
            raise CompressError(f"arch.checkpoint: the file holds a '{packed.get('arch')}' model, not arch.name={self.arch}")
        model = self._fresh_model()
        model = methods.get(packed["method"]).restore(model, packed.get("meta") or {}, packed["state_dict"])
        checkpoints.load_into(model, packed["state_dict"], "the saved model")
        return model

    def load_model(self) -> nn.Module:
        spec = self.cfg["arch"]["checkpoint"]
        if self.cfg.get("smoke"):
            log.info("smoke mode: random weights (arch.checkpoint=%s not loaded)", spec)
            return self._fresh_model()
        if spec is None:
            return self._pretrained_here()
        if spec == "torchvision":
            return self._torchvision_weights()
        path = checkpoints.resolve(str(spec), self.cfg["paths"]["weights"], self.cache)
        obj = checkpoints.read(path)
        log.info("weights: %s", path)
        if obj.get("format") == checkpoints.FORMAT:
            return self._unpack(obj)
        model = self._fresh_model()
        checkpoints.load_into(model, checkpoints.plain_state_dict(obj), str(path))
        return model

    def _torchvision_weights(self) -> nn.Module:
        import torchvision

        model = self._fresh_model()
        name = self.arch.removesuffix("_imagenet")
        try:
            weights = torchvision.models.get_model_weights(name).DEFAULT
            sd = weights.get_state_dict(progress=True)
        except Exception as e:
            raise CompressError(f"arch.checkpoint: could not fetch torchvision's {name} weights ({type(e).__name__}); "
                                "offline? pass arch.checkpoint=/path/to/weights.pth") from e
        checkpoints.load_into(model, sd, f"torchvision {name}")
        return model

    def _pretrained_here(self) -> nn.Module:
        """No checkpoint given: train from scratch with the pretrain schedule, once; cache the result."""
        cfg = self.cfg
        key = hashlib.sha256(json.dumps([self.arch, self.data.name, self.data.source, self.data.num_classes,
                                         cfg["dataset"], cfg["pretrain"], cfg["seed"]], sort_keys=True,
                                        default=str).encode()).hexdigest()[:12]
        final = self.cache / "pretrained" / f"{self.arch}-{self.data.name}-{key}.pt"
        partial = final.with_suffix(".partial.pt")
        if final.is_file():
            log.info("weights: pretrained earlier, cached at %s", final)
            return self._unpack(checkpoints.read(final))
        final.parent.mkdir(parents=True, exist_ok=True)
        resume = torch.load(partial, map_location="cpu", weights_only=True) if partial.is_file() else None
        log.info("arch.checkpoint is null: pretraining %s for %d epochs (cache: %s)", self.arch,
                 cfg["pretrain"]["epochs"], final)
        model = self._fresh_model().to(self.device)
        model, _ = train.fit(model, self.data.train, self.data.val, cfg["pretrain"], self.device, seed=cfg["seed"],
                             resume=resume, on_epoch_end=lambda s: checkpoints.atomic_save(s, partial), desc="pretrain",
                             eval_batch_size=cfg["measure"]["eval_batch_size"])
        checkpoints.atomic_save(checkpoints.pack(model, self.arch, "none", {}), final)
        partial.unlink(missing_ok=True)
        return model

    # -- measurement --------------------------------------------------------------------------------
    def measure_row(self, stage: str, model: nn.Module, started: float, status: str = "") -> dict:
        test = self._evaluate(model, self.data.test, f"{stage} test")
        val = self._evaluate(model, self.data.val, f"{stage} val")
        shape = self.data.image_shape
        row = {"run_id": self.state["run_id"], "experiment": self.cfg.get("experiment") or "",
               "overrides": self.cfg.get("overrides") or "", "method": self.method.name, "arch": self.arch,
               "dataset": self.data.name, "seed": self.cfg["seed"], "stage": stage, "status": status,
               "top1": round(test["top1"], 3), "top5": round(test["top5"], 3), "loss": round(test["loss"], 5),
               "val_top1": round(val["top1"], 3), "params": measure.count_params(model),
               "params_nonzero": measure.count_nonzero(model), "macs": measure.count_macs(model, shape)}
        if self.cfg["measure"]["latency"]:
            deploy = measure.deployable(self.method.export(measure.clone(model)))
            reps = self.cfg["measure"]["latency_repeats"]
            row["latency_ms_b1"] = round(measure.latency_ms(deploy, shape, 1, reps), 3)
            row["latency_ms_b64"] = round(measure.latency_ms(deploy, shape, 64, reps), 3)
        else:
            row["latency_ms_b1"] = row["latency_ms_b64"] = float("nan")
        size = self.method.storage_bytes(model)
        row["size_bytes"] = size if size is not None else checkpoints.serialized_size(model)
        row["wall_s"] = round(time.perf_counter() - started, 2)
        return results.with_reductions(row, self.baseline)

    def _same_as_last(self, stage: str, started: float) -> dict:
        """The row of a stage that did not change the model: the previous row's numbers."""
        row = dict(self.state["rows"][-1], stage=stage, status="")
        row["wall_s"] = round(time.perf_counter() - started, 2)
        return row

    # -- the stages ---------------------------------------------------------------------------------
    def _fit(self, model: nn.Module, sched: dict, stage: str, resumable: bool = True) -> nn.Module:
        """Fine-tune. A resumable fine-tune saves per-epoch state so that, interrupted, it resumes at its
        epoch; a round's fine-tune is redone from the round's start instead (its step is deterministic)."""
        prior = self.state.get("train")
        resume = prior["fit"] if resumable and prior and prior["stage"] == stage else None

        def on_epoch_end(fit_state: dict) -> None:
            self.state["train"] = {"stage": stage, "fit": fit_state}
            checkpoints.atomic_save(self.state, self.state_path)

        model, _ = train.fit(model, self.data.train, self.data.val, sched, self.device, seed=self.cfg["seed"],
                             resume=resume, on_epoch_end=on_epoch_end if resumable else None, desc=stage,
                             eval_batch_size=self.cfg["measure"]["eval_batch_size"])
        return model

    def _threshold(self) -> float | None:
        s = self.cfg["schedule"]
        bounds = []
        if s["min_top1"] is not None:
            bounds.append(float(s["min_top1"]))
        if s["max_drop"] is not None:
            bounds.append(self.state["baseline_val_top1"] - float(s["max_drop"]))
        return max(bounds) if bounds else None

    def _rounds(self, model: nn.Module, ctx: Context) -> nn.Module:
        s = self.cfg["schedule"]
        round_sched = dict(s, epochs=s["round_epochs"])
        threshold = self._threshold()
        while not self.state.get("rounds_over") and self.state.get("round", 0) < s["rounds"]:
            k = self.state.get("round", 0) + 1
            started = time.perf_counter()
            snapshot, method_state = measure.clone(model), copy.deepcopy(self.method.state_dict())
            candidate = self.method.step(model, ctx, k, self.state.get("step_scale", 1.0))
            if candidate is None:
                log.info("round %d: the method has nothing left to compress; schedule ends", k)
                self._save_state(snapshot, rounds_over=True)
                return snapshot
            candidate = self._fit(candidate.to(self.device), round_sched, f"round_{k}", resumable=False)
            val_top1 = self._evaluate(candidate, self.data.val, "val")["top1"]
            if threshold is not None and val_top1 < threshold:
                row = self.measure_row(f"round_{k}", candidate, started, "rolled_back")
                model = snapshot  # the exact weights and structure accepted last
                self.method.load_state_dict(method_state)
                rollbacks = self.state.get("rollbacks", 0) + 1
                over = s["on_rollback"] == "stop" or rollbacks > s["max_rollbacks"]
                scale = self.state.get("step_scale", 1.0) * (1.0 if over else s["shrink_factor"])
                log.info("round %d: val top-1 %.2f < %.2f: rolled back%s", k, val_top1, threshold,
                         "; schedule ends" if over else f"; retrying with step scale {scale:g}")
                self._record(row, model, round=k, rollbacks=rollbacks, step_scale=scale, rounds_over=over)
            else:
                model = candidate
                self._record(self.measure_row(f"round_{k}", model, started, "accepted"), model, round=k)
        return model

    def execute(self) -> Path:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.get("resume") and self.state_path.is_file():
            self.state = torch.load(self.state_path, map_location="cpu", weights_only=True)
            if self.state.get("config") != self._config_fingerprint():
                raise CompressError(f"resume: the config differs from the one {self.run_dir} was started with; "
                                    "resume with the same overrides, or start a new run dir")
            results.write_rows(self.metrics_path, self.state.get("rows", []))
            log.info("resuming %s: stages done: %s", self.run_dir, ", ".join(r["stage"] for r in self.state["rows"]) or "none")
            if self._done("final"):
                log.info("the run is already complete")
                return self.run_dir
        elif self.metrics_path.exists() or self.state_path.exists():
            raise CompressError(f"hydra.run.dir: {self.run_dir} already holds a run; pass resume=true to continue it, "
                                "or choose another hydra.run.dir")
        else:
            self.state = {"run_id": cfg["run_id"], "config": self._config_fingerprint(), "rows": []}
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg["threads"]))
        torch.manual_seed(cfg["seed"])
        random.seed(cfg["seed"])
        self._load_data()
        ctx = self.context()

        started = time.perf_counter()
        if "model" in self.state:
            model = self._unpack(self.state["model"]).to(self.device)
            self.method.load_state_dict(self.state.get("method_state") or {})
        else:
            model = self.load_model().to(self.device)
        rows = self.state["rows"]
        self.baseline = rows[0] if rows else None
        if not self._done("baseline"):
            row = self.measure_row("baseline", model, started)
            self.baseline = row
            self._record(row, model, baseline_val_top1=row["val_top1"])

        iterative = cfg["schedule"]["rounds"] > 0
        if self.method.requires_rounds and not iterative:
            raise CompressError(f"schedule.rounds: method '{self.method.name}' works in rounds; set schedule.rounds > 0")
        if not self._done("compressed"):
            started = time.perf_counter()
            step = self.method.prepare if iterative else self.method.compress
            unchanged = getattr(type(self.method), step.__name__) is getattr(Method, step.__name__)
            model = step(model, ctx).to(self.device)
            # A method that leaves the model untouched (method=none) gets the measurement just taken.
            row = self._same_as_last("compressed", started) if unchanged else self.measure_row("compressed", model, started)
            self._record(row, model)
        if iterative and cfg["schedule"]["prepare_epochs"] > 0 and not self._done("round_0"):
            # Recover from `prepare` (e.g. layer conversion) before pruning rounds are judged by the threshold.
            started = time.perf_counter()
            model = self._fit(model, dict(cfg["schedule"], epochs=cfg["schedule"]["prepare_epochs"]), "round_0")
            self._record(self.measure_row("round_0", model, started, "accepted"), model)
        if iterative:
            model = self._rounds(model, ctx)
        started = time.perf_counter()
        model = self._fit(model, cfg["schedule"], "final")
        trained = cfg["schedule"]["epochs"] > 0
        self._record(self.measure_row("final", model, started) if trained else self._same_as_last("final", started), model)
        checkpoints.atomic_save(checkpoints.pack(model, self.arch, self.method.name, self.method.meta(model)),
                                self.run_dir / "model.pt")
        log.info("done: %s", self.run_dir)
        return self.run_dir
