"""Test-only faults for the hang and straggler detectors, like dtrain/checkpoint/failpoints.py.

``DTRAIN_FAULT=<kind>@<rank>[#<step>][:<value>]``; unset (always, outside tests) a fault costs one
comparison per phase. Kinds:

- ``stall_step@1#5:600``: rank 1 sleeps 600 s inside step 5, after its batch and before the strategy's
  step, so its peers block in the step's first collective (a rank stuck in compute or a collective).
- ``stall_data@1#5:600``: rank 1 sleeps 600 s while fetching the batch of step 5 (a data stall).
- ``slow@2:0.3``: rank 2 burns 30% more CPU than its step's own compute, every step (a slower chip:
  more work for the same step, which is what the straggler score measures, not an idle wait).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

KINDS = ("stall_step", "stall_data", "slow")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int | None
    value: float


def parse(spec: str) -> Fault | None:
    """The fault armed by ``spec`` (``DTRAIN_FAULT``), or None; a malformed spec is a loud error in a test."""
    if not spec:
        return None
    head, _, value = spec.partition(":")
    head, _, step = head.partition("#")
    kind, _, rank = head.partition("@")
    if kind not in KINDS or not rank.isdigit() or (step and not step.isdigit()):
        raise ValueError(f"DTRAIN_FAULT={spec!r}: expected <kind>@<rank>[#<step>][:<value>], kind one of {KINDS}")
    return Fault(kind, int(rank), int(step) if step else None, float(value) if value else 0.0)


class FaultSwitch:
    """The faults armed for this rank. Called by the run monitor at phase changes and after compute."""

    def __init__(self, rank: int, spec: str | None = None):
        fault = parse(os.environ.get("DTRAIN_FAULT", "") if spec is None else spec)
        self.fault = fault if fault is not None and fault.rank == rank else None

    def at_phase(self, phase: str, step: int) -> None:
        f = self.fault
        if f is not None and f.kind == f"stall_{phase}" and f.step in (None, step):
            os.write(2, f"dtrain fault {f.kind}: rank {f.rank} sleeps {f.value:g} s in step {step}\n".encode())
            time.sleep(f.value)

    def after_compute(self, compute_cpu_s: float) -> None:
        """``slow``: spin the CPU for ``value`` x this step's compute (thread CPU time, like the score)."""
        f = self.fault
        if f is None or f.kind != "slow" or compute_cpu_s <= 0:
            return
        end = time.thread_time() + f.value * compute_cpu_s
        while time.thread_time() < end:
            pass
