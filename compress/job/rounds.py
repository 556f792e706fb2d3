"""The iterative schedule's decisions: the accuracy threshold a round must keep, and what a rollback does.

A round is: the method's step, a short fine-tune, a validation. Below the threshold the round is rolled
back to the exact model accepted last; then `on_rollback` says whether the schedule stops or retries with
a smaller step (`step_scale * shrink_factor`), at most `max_rollbacks` times. The pipeline runs the rounds;
this object only decides, from plain numbers, so the policy is testable on its own.
"""
from __future__ import annotations

from dataclasses import dataclass

from compress.config import ScheduleConfig


@dataclass(frozen=True)
class RollbackOutcome:
    rollbacks: int        # retries so far (rollbacks that shrink the step), this one included
    step_scale: float     # the step scale of the next round
    over: bool            # the schedule ends here


@dataclass(frozen=True)
class IterativeSchedule:
    rounds: int
    threshold: float | None   # validation top-1 a round must reach (None: every round is accepted)
    on_rollback: str
    shrink_factor: float
    max_rollbacks: int

    @classmethod
    def from_config(cls, schedule: ScheduleConfig, baseline_val_top1: float | None) -> "IterativeSchedule":
        """The threshold is the stricter of `min_top1` and `baseline val top-1 - max_drop`."""
        bounds = []
        if schedule.min_top1 is not None:
            bounds.append(float(schedule.min_top1))
        if schedule.max_drop is not None and baseline_val_top1 is not None:
            bounds.append(baseline_val_top1 - float(schedule.max_drop))
        return cls(schedule.rounds, max(bounds) if bounds else None, schedule.on_rollback, schedule.shrink_factor,
                   schedule.max_rollbacks)

    def accepts(self, val_top1: float) -> bool:
        return self.threshold is None or val_top1 >= self.threshold

    def after_rollback(self, rollbacks_before: int, step_scale: float, shrink: bool = True) -> RollbackOutcome:
        """`shrink=False`: the method says a smaller step means nothing for what was rolled back (the scale
        stays) and that its next step is a different one (FGFP: a rolled-back conversion leaves that layer
        ordinary and the next round converts the next layer). Such a rollback is not a retry, so it does not
        count towards `max_rollbacks`: counting it ended FGFP's schedule after three failed conversions,
        before a single pruning round (measured on ResNet-20 with 2-epoch rounds)."""
        rollbacks = rollbacks_before + (1 if shrink else 0)
        over = self.on_rollback == "stop" or rollbacks > self.max_rollbacks
        return RollbackOutcome(rollbacks, step_scale * (1.0 if over or not shrink else self.shrink_factor), over)
