"""Preemption: a signal only sets a flag; ranks agree at the next step boundary, save, commit, exit.

Doing the save inside the handler would run DCP collectives from a signal context on one rank while
the others are mid-step; agreeing first (one small non-blocking all-reduce per step, overlapped with the
step) keeps every rank in lockstep. The ballot lives on the training device: NCCL has no backend for
CPU tensors, and on a GPU the vote is then one more tiny collective on the stream that is running anyway.
Exit code ``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again") tells Slurm / Kubernetes to requeue
(the whole contract: ``dtrain/exit_codes.py``).
"""

from __future__ import annotations

import os
import signal
import time
from types import FrameType

import torch
import torch.distributed as dist

from dtrain import exit_codes
from dtrain.distributed import collectives

EXIT_PREEMPTED = exit_codes.PREEMPTED


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint is committed."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"preempted by {signal_name} at step {step}; checkpoint committed")
        self.step, self.signal_name = step, signal_name


class PreemptionWatcher:
    def __init__(self, signal_names: list[str], device: torch.device | str = "cpu"):
        self.received: int | None = None
        self.received_at: float | None = None
        self.device = torch.device(device)
        self._vote: dist.Work | None = None
        self._ballot = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._previous: dict[int, object] = {}
        for name in signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received, self.received_at = signum, time.monotonic()
            os.write(2, f"dtrain: received {signal.Signals(signum).name}; will checkpoint at the next step "
                        "boundary and exit\n".encode())

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a peer rank's signal"

    def agreed(self) -> bool:
        """True on every rank once any rank has received a preemption signal (a collective call).

        The vote is a non-blocking all-reduce started at one step boundary and read at the next, so it
        overlaps a whole training step instead of stalling every step; a signal costs one step of latency.
        """
        flag = self.received is not None
        if not collectives.world_size() > 1:
            return flag
        decided = False
        if self._vote is not None:
            self._vote.wait()
            decided = bool(self._ballot.item())
        self._ballot = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        self._vote = dist.all_reduce(self._ballot, op=dist.ReduceOp.MAX, async_op=True)
        return decided

    def close(self) -> None:
        """Finish the vote in flight (no collective may be left pending at teardown), restore handlers."""
        if self._vote is not None:
            self._vote.wait()
            self._vote = None
        self.restore()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
