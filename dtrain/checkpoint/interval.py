"""When to save: every N steps, or ``checkpoint.interval_steps=auto``: the interval that loses least time.

Saving often costs the blocking save time C at every save; saving rarely costs, at each interruption,
the work done since the last commit (half an interval on average). For interruptions with mean time
between them M (``checkpoint.mtbi_s``), the interval of work that minimizes the sum is Young's
sqrt(2 C M) (Daly's higher-order terms matter only when C approaches M). ``auto`` measures C (the
time the loop was blocked by a save: the staging copy for async saves, the whole save otherwise) and
the step time, converts the interval to steps and re-evaluates it after every save. Before the first
save of an attempt C is unknown, so the first save happens after ``WARMUP_STEPS`` to measure it.

Ranks must agree on every save (it is a collective), but their clocks differ: rank 0 decides and
broadcasts, only at moments every rank reaches in lockstep (a fixed step, and the end of each save).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque

from dtrain.distributed import collectives

log = logging.getLogger(__name__)

WARMUP_STEPS = 5  # an attempt's first steps (allocator, caches, compilation) say little about the rest
STEP_WINDOW = 50  # recent step times whose median is the step time
SAVE_WINDOW = 5  # recent blocking save times whose median is the save cost


def young_daly_interval_s(save_cost_s: float, mtbi_s: float) -> float:
    """Seconds of work between checkpoints that minimize expected lost time: sqrt(2 C M)."""
    return math.sqrt(2.0 * save_cost_s * mtbi_s)


def expected_waste(interval_s: float, save_cost_s: float, mtbi_s: float) -> tuple[float, float]:
    """(share of time spent saving, share re-done after interruptions), first order: C/tau and tau/(2M)."""
    return save_cost_s / (interval_s + save_cost_s), (interval_s + save_cost_s) / (2.0 * mtbi_s)


class FixedInterval:
    """``checkpoint.interval_steps=N``: at every multiple of N (0: never)."""

    def __init__(self, every: int):
        self.every = every

    def due(self, step: int, step_time_s: float | None = None) -> bool:
        return self.every > 0 and step % self.every == 0

    def restart_at(self, step: int) -> None:
        pass

    def saved(self, step: int, blocked_s: float) -> None:
        pass


class AutoInterval:
    """``checkpoint.interval_steps=auto``: Young/Daly from measured step and save times (see module doc)."""

    def __init__(self, mtbi_s: float, start_step: int = 0):
        self.mtbi_s = mtbi_s
        self.every: int | None = None  # steps between saves; None until decided
        self.last_saved = start_step
        self._warmup_until = start_step + WARMUP_STEPS
        self._step_times: deque[float] = deque(maxlen=STEP_WINDOW)
        self._save_costs: deque[float] = deque(maxlen=SAVE_WINDOW)
        self.reason = "not decided yet"

    def restart_at(self, step: int) -> None:
        """The run resumed at ``step``: count the interval and the warm-up from there."""
        self.last_saved, self._warmup_until = step, step + WARMUP_STEPS

    def due(self, step: int, step_time_s: float | None = None) -> bool:
        if step_time_s is not None:
            self._step_times.append(step_time_s)
        if self.every is None:
            if step < self._warmup_until:
                return False
            self._decide()
            if self.every is None:  # no save measured yet: save now to measure one
                return True
        return step - self.last_saved >= self.every

    def saved(self, step: int, blocked_s: float) -> None:
        """Every rank, after every save: re-evaluate with the new measurement."""
        self.last_saved = step
        self._save_costs.append(blocked_s)
        self._decide()

    def _decide(self) -> None:
        self.every, self.reason = collectives.on_rank_zero(self._choose)
        log.info("checkpoint interval auto: %s", self.reason)

    def _choose(self) -> tuple[int | None, str]:
        """Rank 0: (steps between saves or None to save now, why), from its own measurements."""
        if not self._step_times:
            return None, "no step measured yet"
        step_s = statistics.median(self._step_times)
        if not self._save_costs:
            return None, (f"no save measured yet in this attempt; saving now to measure one (step {step_s:.3g} s, "
                          f"MTBI {self.mtbi_s:g} s)")
        cost = statistics.median(self._save_costs)
        interval_s = young_daly_interval_s(cost, self.mtbi_s)
        every = max(1, round(interval_s / step_s)) if step_s > 0 else 1
        saving, rework = expected_waste(every * step_s, cost, self.mtbi_s)
        reason = (f"every {every} steps ({every * step_s:.4g} s of training at {step_s:.3g} s/step, median of "
                  f"{len(self._step_times)}) = Young/Daly sqrt(2 x {cost:.3g} s blocking save (median of "
                  f"{len(self._save_costs)} measured) x MTBI {self.mtbi_s:g} s) = {interval_s:.4g} s; expected "
                  f"share of time saving {saving:.1%}, re-done after interruptions {rework:.1%}")
        if every == 1 and interval_s < step_s:
            reason += " (the optimum is shorter than one step: saving every step, and saves dominate; faster " \
                      "storage or async_mode=thread would help)"
        return every, reason
