"""The run ledger: a run directory's resumable state (`state.pt`) and its rows (`metrics.csv`).

Every finished stage is recorded twice, in this order: into `state.pt` (written atomically, with the
model and the method's state as they are after the stage) and then appended to `metrics.csv`. A resumed
run rewrites `metrics.csv` from the state, so the file never holds a row twice or a row the state lacks.
Inside a fine-tune, the state also holds the last finished epoch (`train`), so a killed fine-tune resumes
at its epoch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from compress import CompressError
from compress.job import checkpoints
from compress.report import results

log = logging.getLogger("compress")


# Keys added to the config after runs were first recorded, with their defaults: left out of the fingerprint
# while at those defaults, so that a run started before a key existed still resumes after an upgrade.
LATER_KEYS = {
    "dataset.val_from": "train",
    **{f"{group}.{key}": value for group in ("schedule", "pretrain") for key, value in
       (("distill", 0.0), ("temperature", 4.0), ("distill_features", []), ("feature_weight", 1.0))},
    "measure.ort_latency": True,
    # the builder spec (docs/own-model.md); runs of the papers' architectures leave them at these
    "arch.source": "compress", "arch.target": None, "arch.kwargs": {},
}


def fingerprint(config: dict) -> str:
    """What must be equal for `resume=true` to continue a run (where it runs, how fast, and labels do not count)."""
    keep = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()
            if k not in ("resume", "run_id", "threads", "overrides", "paper_row")}
    for dotted, default in LATER_KEYS.items():
        group, key = dotted.split(".")
        if isinstance(keep.get(group), dict) and keep[group].get(key, default) == default:
            keep[group].pop(key, None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Progress:
    """Where a run's schedule stands, besides its rows and model: the one typed record of it. Stored in
    state.pt under these field names (the keys runs recorded before it existed used), so old runs resume."""

    round: int = 0                              # rounds finished (accepted or rolled back)
    rounds_over: bool = False                   # the schedule ended early (stop after a rollback, nothing left)
    rollbacks: int = 0
    step_scale: float = 1.0                     # the method's step size after shrinking rollbacks
    baseline_val_top1: Optional[float] = None   # what the rounds' threshold is judged against
    teacher_digest: Optional[str] = None        # the distillation teacher the run started from

    @classmethod
    def of(cls, state: dict) -> "Progress":
        return cls(**{f.name: state[f.name] for f in dataclasses.fields(cls) if state.get(f.name) is not None})


class RunLedger:
    def __init__(self, run_dir: Path, state: dict[str, Any], writes: bool = True):
        self.run_dir = run_dir
        self.writes = writes  # False on the other ranks of a data-parallel run: rank 0 alone writes
        self.metrics_path = run_dir / "metrics.csv"
        self.state_path = run_dir / "state.pt"
        self.state = state

    @classmethod
    def open(cls, run_dir: Path, *, resume: bool, config_fingerprint: str, run_id: str, writes: bool = True
             ) -> "RunLedger":
        """A new ledger, or (resume) the one the directory holds; refuses to overwrite a run, or to
        resume one started with another config. `writes=False` (data-parallel ranks other than 0, opened
        after rank 0's): the same state in memory, never written."""
        run_dir.mkdir(parents=True, exist_ok=True)
        ledger = cls(run_dir, {}, writes)
        if resume and ledger.state_path.is_file():
            try:
                ledger.state = torch.load(ledger.state_path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise CompressError(f"resume: {ledger.state_path} is not a readable run state "
                                    f"({type(e).__name__}); start a new run dir") from e
            if ledger.state.get("config") != config_fingerprint:
                raise CompressError(f"resume: the config differs from the one {run_dir} was started with; "
                                    "resume with the same overrides, or start a new run dir")
            if writes:
                results.write_rows(ledger.metrics_path, ledger.rows)
            log.info("resuming %s: stages done: %s", run_dir, ", ".join(r["stage"] for r in ledger.rows) or "none")
        elif writes and (ledger.metrics_path.exists() or ledger.state_path.exists()):
            raise CompressError(f"hydra.run.dir: {run_dir} already holds a run; pass resume=true to continue it, "
                                "or choose another hydra.run.dir")
        else:
            ledger.state = {"run_id": run_id, "config": config_fingerprint, "rows": []}
        return ledger

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def run_id(self) -> str:
        return self.state["run_id"]

    @property
    def rows(self) -> list[dict]:
        return self.state.setdefault("rows", [])

    @property
    def baseline(self) -> dict | None:
        return self.rows[0] if self.rows else None

    def done(self, stage: str) -> bool:
        return any(r["stage"] == stage for r in self.rows)

    @property
    def progress(self) -> Progress:
        return Progress.of(self.state)

    @property
    def method_state(self) -> dict:
        return self.state.get("method_state") or {}

    @property
    def saved_model(self) -> dict | None:
        """The packed model as of the last recorded stage (None before the first)."""
        return self.state.get("model")

    # -- writing ------------------------------------------------------------------------------------------
    def remember(self, progress: Progress) -> None:
        """Hold `progress` in memory: it is written with the next stage (a run not yet started leaves no file)."""
        self.state.update(dataclasses.asdict(progress))

    def save(self, packed_model: dict | None = None, method_state: dict | None = None,
             progress: Progress | None = None) -> None:
        if progress is not None:
            self.remember(progress)
        if packed_model is not None:
            self.state["model"] = packed_model
            self.state["method_state"] = method_state or {}
        if self.writes:
            checkpoints.atomic_save(self.state, self.state_path)

    def record(self, row: dict, packed_model: dict, method_state: dict, progress: Progress | None = None) -> None:
        """A stage is done: its row goes into the state (atomically), then into metrics.csv."""
        self.rows.append(row)
        self.state["train"] = None  # the stage's fine-tune is over: nothing to resume inside it
        self.save(packed_model, method_state, progress)
        if self.writes:
            results.append_row(self.metrics_path, row)
        log.info("%-10s top-1 %.2f (val %.2f)  params %s (nonzero %s)  MACs %.2fM  %s", row["stage"], row["top1"],
                 row["val_top1"], row["params"], row["params_nonzero"], row["macs"] / 1e6, row.get("status", ""))

    def fit_resume_state(self, stage: str) -> dict | None:
        """The per-epoch fine-tuning state saved inside `stage`, if it was interrupted there."""
        prior = self.state.get("train")
        return prior["fit"] if prior and prior["stage"] == stage else None

    def save_fit(self, stage: str, fit_state: dict) -> None:
        self.state["train"] = {"stage": stage, "fit": fit_state}
        if self.writes:
            checkpoints.atomic_save(self.state, self.state_path)
