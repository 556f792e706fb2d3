"""The objective of a hyper-parameter search (`compress run -m hparams_search=<name> method=<m> ...`, the
presets in configs/hparams_search/, run by hydra-optuna-sweeper; docs/search.md): the largest reduction whose
final top-1 stays within `max_drop` points of the baseline's.

Each trial is an ordinary run with its own directory and metrics.csv. When it ends, the `SearchObjective`
Hydra callback (the presets put it under `hydra.callbacks.search`) reads that metrics.csv and hands the
sweeper `objective(rows, ...)`: the reduction when the drop is within `max_drop`, a penalty below every
admissible value otherwise. The sweeper maximises it and writes optimization_results.yaml into the sweep
directory; the callback adds search.csv there, one line per trial, best first.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from compress import CompressError
from compress.checks import is_number, require, require_choice

log = logging.getLogger("compress.job.search")

METRICS = ("macs_reduction_pct", "params_reduction_pct")  # what is maximised: columns of metrics.csv
ACCURACIES = ("val_top1", "top1")  # which top-1 the drop is measured on
# Every penalised value is at most 100 - OFFSET = -100 (a reduction is at most 100 %), below the value of any
# admissible trial (its reduction, above -100 % unless the model more than doubled).
OFFSET = 200.0
KEY = "hydra.callbacks.search"  # where the presets put the callback, and so its options


@dataclass(frozen=True)
class TrialResult:
    """What one finished run scores: its reduction, the top-1 before and after, the drop, the value."""

    reduction: float
    baseline_top1: float
    final_top1: float
    drop: float          # baseline_top1 - final_top1 (negative: the compressed model scores higher)
    admissible: bool     # drop <= max_drop
    value: float         # what the sweeper maximises


def check_settings(max_drop: Any, metric: Any, accuracy: Any, penalty: Any) -> None:
    """CompressError naming the key, for a setting out of range."""
    require(is_number(max_drop) and 0 <= max_drop <= 100, f"{KEY}.max_drop",
            "a number of top-1 points in [0, 100]", max_drop)
    require_choice(metric, f"{KEY}.metric", METRICS)
    require_choice(accuracy, f"{KEY}.accuracy", ACCURACIES)
    require(is_number(penalty) and penalty > 0, f"{KEY}.penalty", "a positive number (per point of excess drop)",
            penalty)


def _number(row: Mapping[str, Any], column: str, stage: str) -> float:
    value = row.get(column)
    try:
        number = float(value)  # metrics.csv read back: text
    except (TypeError, ValueError):
        number = math.nan
    if math.isnan(number) or math.isinf(number):
        raise CompressError(f"metrics.csv: the {stage} row has no {column} (got {value!r})")
    return number


def _last(rows: list[Mapping[str, Any]], stage: str) -> Mapping[str, Any]:
    found = [r for r in rows if r.get("stage") == stage]
    if not found:
        raise CompressError(f"metrics.csv: no {stage} row (the run did not finish)")
    return found[-1]


def evaluate(rows: Iterable[Mapping[str, Any]], *, max_drop: float, metric: str = "macs_reduction_pct",
             accuracy: str = "val_top1", penalty: float = 10.0) -> TrialResult:
    """Score a run from its metrics.csv rows (dicts, as csv.DictReader or the pipeline writes them).

    Admissible (final `accuracy` >= baseline `accuracy` - max_drop): the value is the final row's `metric`.
    Otherwise: min(reduction, 100) - OFFSET - penalty * excess, where excess = drop - max_drop > 0. That is
    below every admissible value, and it grows as the drop shrinks, so a sampler still learns which way the
    admissible region lies."""
    check_settings(max_drop, metric, accuracy, penalty)
    rows = list(rows)
    baseline, final = _last(rows, "baseline"), _last(rows, "final")
    reduction = _number(final, metric, "final")
    before, after = _number(baseline, accuracy, "baseline"), _number(final, accuracy, "final")
    drop = before - after
    excess = drop - float(max_drop)
    # Rounded, as metrics.csv's top-1 columns are: a drop of exactly max_drop is admissible.
    admissible = round(excess, 6) <= 0
    value = reduction if admissible else min(reduction, 100.0) - OFFSET - float(penalty) * excess
    return TrialResult(reduction=reduction, baseline_top1=before, final_top1=after, drop=round(drop, 6),
                       admissible=admissible, value=float(value))


def objective(rows: Iterable[Mapping[str, Any]], *, max_drop: float, metric: str = "macs_reduction_pct",
              accuracy: str = "val_top1", penalty: float = 10.0) -> float:
    """The number the sweeper maximises for one run (`evaluate(...).value`)."""
    return evaluate(rows, max_drop=max_drop, metric=metric, accuracy=accuracy, penalty=penalty).value


def read_rows(metrics_csv: Path) -> list[dict[str, str]]:
    if not metrics_csv.is_file():
        raise CompressError(f"{metrics_csv}: no such file (the trial wrote no metrics)")
    with open(metrics_csv, newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------------------------------
try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover - hydra-core is a dependency; the pure functions above need none of it
    _Callback = object  # type: ignore[assignment,misc]


SEARCH_CSV = "search.csv"
SEARCH_COLUMNS = ["job", "run_dir", "params", "value", "admissible", "reduction", "metric", "baseline_top1",
                  "final_top1", "drop", "max_drop", "accuracy"]


class SearchObjective(_Callback):
    """Hydra callback (hydra.callbacks.search in configs/hparams_search/*.yaml): after each trial, replace the
    job's return value with `objective(...)` of the trial's metrics.csv, for the sweeper; after the sweep,
    write search.csv (one line per trial, best first) into the sweep directory."""

    def __init__(self, max_drop: float = 1.0, metric: str = "macs_reduction_pct", accuracy: str = "val_top1",
                 penalty: float = 10.0) -> None:
        check_settings(max_drop, metric, accuracy, penalty)
        self.max_drop, self.metric, self.accuracy, self.penalty = float(max_drop), metric, accuracy, float(penalty)
        self.trials: list[dict[str, Any]] = []
        self.given: set[str] = set()  # the sweep's own overrides: a trial's others are the searched values

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self.given = set(config.hydra.overrides.task)

    def on_job_end(self, config: Any, job_return: Any, **kwargs: Any) -> None:
        from hydra.core.utils import JobStatus

        if job_return.status != JobStatus.COMPLETED or job_return.hydra_cfg is None:
            return  # the sweeper reports the job's own failure
        hc = job_return.hydra_cfg.hydra
        run_dir = Path(hc.runtime.output_dir)
        try:
            result = evaluate(read_rows(run_dir / "metrics.csv"), max_drop=self.max_drop, metric=self.metric,
                              accuracy=self.accuracy, penalty=self.penalty)
        except CompressError as e:  # a failed trial for the sweeper (hydra.sweeper.max_failure_rate)
            job_return.status, job_return.return_value = JobStatus.FAILED, e
            log.error("trial %s: %s", run_dir, e)
            return
        job_return.return_value = result.value
        log.info("trial %s: %s %.3f, %s %.3f -> %.3f (drop %.3f, max %.3f: %s): objective %.3f", run_dir.name,
                 self.metric, result.reduction, self.accuracy, result.baseline_top1, result.final_top1, result.drop,
                 self.max_drop, "within" if result.admissible else "over", result.value)
        searched = [o for o in (job_return.overrides or []) if o not in self.given]
        self.trials.append({"job": hc.job.num, "run_dir": str(run_dir), "params": ",".join(searched),
                            **asdict(result), "metric": self.metric, "max_drop": self.max_drop,
                            "accuracy": self.accuracy})

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        if not self.trials:
            return
        sweep_dir = Path(self.trials[0]["run_dir"]).parent
        trials = sorted(self.trials, key=lambda t: -t["value"])
        with open(sweep_dir / SEARCH_CSV, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SEARCH_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(trials)
        best = trials[0]
        if best["admissible"]:
            log.info("search: best trial %s: %s %.3f at a drop of %.3f (<= %.3f) -> %s", best["run_dir"],
                     self.metric, best["reduction"], best["drop"], self.max_drop, sweep_dir / SEARCH_CSV)
        else:
            log.warning("search: no trial stayed within a drop of %.3f %s points (smallest drop %.3f): search "
                        "smaller reductions or allow more drop; -> %s", self.max_drop, self.accuracy,
                        min(t["drop"] for t in trials), sweep_dir / SEARCH_CSV)
