"""Straggler score: each rank's compute time per step relative to the best rank doing the same work.

One slow rank drags every step of a synchronous job, yet its own step time looks like everyone else's
(the fast ranks wait for it inside the collectives). So the score is built from *compute* time, not
step time: ``score_r = min_peer(compute) / compute_r``, 1.0 for the best rank, 0.77 for a rank 30%
slower. Peers are the ranks with the same role (the same pipeline stage; every rank for data/tensor
parallelism), since different stages do different work.

A rank's compute is the median of its per-step compute over the last ``SPAN`` windows (each window's
median is gathered at its end; the score is refreshed every window, and ranks are named once SPAN
windows are in). Measured here with 4 ranks on 2
busy cores (load 15-28 from other jobs), one 10-step window's median of an *unslowed* rank strayed
down to 0.73 of the best while a 30%-slowed rank reached 0.81: a single window cannot tell them apart.
Over three windows the unslowed ranks stayed >= 0.84 and the slowed ones <= 0.78, hence the default
threshold of 0.8. A persistent straggler shows in every window; interference does not.

Compute time is the training thread's CPU time (``time.thread_time``) across the strategy's step. Why
not wall time: time blocked in a collective (waiting for the straggler) or for data, and time the OS
gives the CPU to another process, are not CPU time of this thread, so the clock counts the work this
rank did and nothing its peers or its neighbours on an oversubscribed host did to it (4 ranks on 2
cores here). Caveat: on a GPU the host thread mostly launches kernels and waits for them, so this
clock then sees host-side slowness only; a slower GPU needs a kernel-time clock (CUDA events or CUPTI,
as NVIDIA's resiliency extension does), which is not implemented (no GPU to validate it on).

Cost: a window's medians are all-gathered once per ``window`` steps (a few floats per rank); nothing
else crosses ranks. benchmarks/monitoring_overhead.py measures the whole monitor against none.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from dataclasses import dataclass

import torch

from dtrain.distributed import collectives

log = logging.getLogger(__name__)

SPAN = 3  # windows per score


@dataclass(frozen=True)
class RankStats:
    """One rank's numbers over the last window, as every rank sees them after the gather."""

    rank: int
    compute_s: float  # median compute (thread CPU) seconds per step over the last SPAN windows
    score: float  # best peer's compute / this rank's, in (0, 1]
    peak_memory_bytes: int
    data_wait_share: float  # median share of the step spent waiting for data


def scores(compute_s: list[float], roles: list[int]) -> list[float]:
    """``min(compute of ranks with the same role) / own compute`` per rank; 1.0 where nothing was measured."""
    best: dict[int, float] = {}
    for value, role in zip(compute_s, roles):
        if value > 0:
            best[role] = min(best.get(role, value), value)
    return [best[role] / value if value > 0 else 1.0 for value, role in zip(compute_s, roles)]


class StragglerTracker:
    """Collects this rank's per-step compute time; every ``window`` steps all ranks gather and score.

    ``observe`` is called on every rank at every step boundary (it is a collective on window steps).
    """

    def __init__(self, window: int, threshold: float, device: torch.device, role: int = 0):
        self.window, self.threshold, self.device, self.role = window, threshold, device, role
        self._compute: list[float] = []
        self._data_share: list[float] = []
        self.latest: list[RankStats] | None = None
        self._windows: deque[list[float]] = deque(maxlen=SPAN)  # every rank's median of each recent window
        self._named: list[int] = []

    def observe(self, compute_s: float, data_wait_share: float, peak_memory_bytes: int) -> dict[str, object]:
        """Record one step; on the window's last step return the metrics-dict keys of the new scores."""
        if self.window <= 0:
            return {}
        self._compute.append(compute_s)
        self._data_share.append(data_wait_share)
        if len(self._compute) < self.window:
            return {}
        row = torch.tensor([statistics.median(self._compute), float(self.role), float(peak_memory_bytes),
                            statistics.median(self._data_share)], dtype=torch.float64, device=self.device)
        self._compute.clear()
        self._data_share.clear()
        table = collectives.all_gather_tensor(row).cpu().tolist()
        self._windows.append([r[0] for r in table])
        compute = [statistics.median(window[rank] for window in self._windows) for rank in range(len(table))]
        rank_scores = scores(compute, [int(r[1]) for r in table])
        self.latest = [RankStats(rank, compute[rank], rank_scores[rank], int(r[2]), r[3])
                       for rank, r in enumerate(table)]
        # scores are reported from the first window; a rank is named only on the full span of evidence
        named = [s.rank for s in self.latest if s.score < self.threshold] if len(self._windows) == SPAN else []
        if named != self._named and collectives.rank() == 0:  # every rank knows; rank 0 speaks
            if named:
                best = min(compute)
                log.warning("straggler%s: %s (monitor.straggler_threshold=%g; best rank computes %.1f ms/step)",
                            "s" if len(named) > 1 else "", ", ".join(
                                f"rank {s.rank} score {s.score:.2f} ({s.compute_s * 1e3:.1f} ms/step)"
                                for s in self.latest if s.rank in named), self.threshold, best * 1e3)
            else:
                log.info("no straggler any more (every score >= %g)", self.threshold)
        self._named = named
        return {"straggler_scores": [round(s.score, 4) for s in self.latest], "stragglers": named,
                "straggler_min_score": min(rank_scores)}
