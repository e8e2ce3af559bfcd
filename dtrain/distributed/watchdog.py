"""Workers must not outlive their launcher.

torchrun starts every worker in a session of its own, so when the agent is killed outright (SIGKILL,
OOM killer, a node agent gone) nothing reaches the workers: with gloo they train on, orphaned, holding
CPUs/GPUs and never checkpointing again. A daemon thread notices the parent change and sends this
process SIGTERM, which the preemption handler turns into an agreed, committed checkpoint and an exit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)


def watch_parent(interval_s: float = 1.0, signum: int = signal.SIGTERM) -> threading.Thread:
    parent = os.getppid()

    def poll() -> None:
        stop = threading.Event()
        while not stop.wait(interval_s):
            if os.getppid() != parent:
                log.warning("rank %s: launcher process %d is gone; checkpointing and exiting",
                            os.environ.get("RANK", "?"), parent)
                os.kill(os.getpid(), signum)
                return

    thread = threading.Thread(target=poll, name="dtrain-parent-watchdog", daemon=True)
    thread.start()
    return thread
