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
import threading
import time
from types import FrameType
from typing import Callable

import torch
import torch.distributed as dist

from dtrain import exit_codes
from dtrain.distributed import collectives

EXIT_PREEMPTED = exit_codes.PREEMPTED
EXIT_NOT_SAVED = exit_codes.CRASH  # the preemption checkpoint could not be made: a crash for the launcher
# One signal often arrives twice: slurmstepd signals every process of a step and torchrun forwards the
# same signal to its workers; a terminal's Ctrl-C reaches the whole foreground group, torchrun included.
# A repeat of the same signal this soon after the first is that one event, not a request to give up.
DUPLICATE_WINDOW_S = 1.0


class Preempted(Exception):
    """Raised by the loop after the preemption checkpoint is committed."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"preempted by {signal_name} at step {step}; checkpoint committed")
        self.step, self.signal_name = step, signal_name


class PreemptionWatcher:
    """Turns preemption signals into an agreed save-and-exit, and makes sure the process ends anyway.

    A step that never reaches its boundary (a hung collective, a step far too big for the machine)
    would otherwise keep a signalled job alive until SIGKILL. So: a second signal (not the same one
    within ``DUPLICATE_WINDOW_S``: one event delivered by two paths) ends the process at once, and so
    does ``grace_s`` elapsing after the first signal before the ranks agreed to save; both
    with a crash code and a line saying that the last committed checkpoint is intact. A save that has
    started is left to finish (or to the scheduler's SIGKILL): exiting mid-save would gain nothing.
    """

    def __init__(self, signal_names: list[str], device: torch.device | str = "cpu", grace_s: float | None = None,
                 newest_committed: Callable[[], int | None] = lambda: None):
        self.received: int | None = None
        self.received_at: float | None = None
        self.device = torch.device(device)
        self.grace_s, self.newest_committed = grace_s, newest_committed
        self._saving = threading.Event()
        self._vote: dist.Work | None = None
        self._ballot = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._previous: dict[int, object] = {}
        for name in signal_names:
            signum = getattr(signal, name)
            self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            if signum == self.received and time.monotonic() - self.received_at < DUPLICATE_WINDOW_S:
                os.write(2, f"dtrain: received {name} again within {DUPLICATE_WINDOW_S:g} s: the same "
                            f"preemption delivered twice (scheduler and launcher); still saving\n".encode())
                return
            self._give_up(f"received {name} again")
        self.received, self.received_at = signum, time.monotonic()
        os.write(2, f"dtrain: received {name}; will checkpoint at the next step boundary and exit (a second "
                    f"signal exits at once without saving)\n".encode())
        if self.grace_s:
            threading.Thread(target=self._deadline, name="dtrain-preemption-deadline", daemon=True).start()

    def _deadline(self) -> None:
        if not self._saving.wait(self.grace_s):
            self._give_up(f"checkpoint.grace_period_s={self.grace_s:g} passed without reaching a step boundary")

    def _give_up(self, why: str) -> None:
        """Exit now (from a signal handler or a thread): no lock, no collective, no buffered output."""
        step = self.newest_committed()
        intact = f"step {step}" if step is not None else "the newest committed step under checkpoint.uri, if any,"
        os.write(2, f"dtrain: {why}: exiting with {EXIT_NOT_SAVED} WITHOUT a preemption checkpoint; {intact} is "
                    f"intact and a restart resumes from it\n".encode())
        os._exit(EXIT_NOT_SAVED)

    def saving(self) -> None:
        """The ranks agreed and the preemption save starts: the deadline no longer applies."""
        self._saving.set()

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
