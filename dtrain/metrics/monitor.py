"""The trainer's one contact with everything that watches a run from the side.

The loop tells the monitor where it is (:meth:`RunMonitor.enter`), how much compute a step took
(:meth:`compute_done`) and what the step measured (:meth:`step_done`); the monitor feeds the hang
watchdog, the straggler window and the Prometheus exporter, and applies the test-only faults. Keeping
that behind one object keeps the trainer's own changes to a few lines.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from dtrain.distributed.env import DistEnv
from dtrain.metrics.faults import FaultSwitch
from dtrain.metrics.hang import HangWatchdog
from dtrain.metrics.prometheus import PrometheusExporter, RunState
from dtrain.metrics.straggler import StragglerTracker

log = logging.getLogger(__name__)


class RunMonitor:
    def __init__(self, cfg: DictConfig | None, env: DistEnv, device: torch.device):
        self.cfg, self.env, self.device = cfg, env, device
        self.faults = FaultSwitch(env.rank)
        self.state = RunState()
        self.exporter: PrometheusExporter | None = None
        self.straggler: StragglerTracker | None = None
        self.hang: HangWatchdog | None = None
        self._exporter_failed = False
        self.compute_s = 0.0

    @classmethod
    def off(cls, env: DistEnv, device: torch.device) -> "RunMonitor":
        """Watches nothing (a Trainer built by hand, e.g. in a benchmark's baseline)."""
        return cls(None, env, device)

    @classmethod
    def build(cls, cfg: DictConfig, env: DistEnv, device: torch.device, info: dict[str, str]) -> "RunMonitor":
        """Binds the Prometheus port first (a port in use is a config error before any expensive work)."""
        monitor = cls(cfg, env, device)
        if cfg.logging.prometheus.port and env.local_rank == 0:
            monitor.exporter = PrometheusExporter(cfg, env, monitor.state, info)
        return monitor

    def attach(self, checkpoints: Any, preemption: Any, role: int) -> None:
        """Point the exporter at the run's checkpoint and preemption state; start the straggler window.
        ``role``: ranks of equal role do equal work (the pipeline stage), so only they are compared."""
        self.state.checkpoint_step = lambda: checkpoints.newest_committed
        self.state.checkpoint_unix = lambda: checkpoints.newest_committed_unix
        self.state.save_seconds = lambda: checkpoints.last_save_seconds
        self.state.preempted = lambda: preemption is not None and preemption.received is not None
        if self.cfg is not None and self.cfg.monitor.straggler_window > 0:
            m = self.cfg.monitor
            self.straggler = StragglerTracker(m.straggler_window, m.straggler_threshold, self.device, role)
            self.state.rank_stats = lambda: self.straggler.latest

    def start(self) -> None:
        """The loop begins: from now on a rank without progress for ``monitor.hang_timeout_s`` is a hang."""
        if self.cfg is None:
            return
        m = self.cfg.monitor
        if m.flight_recorder_entries > 0:  # NCCL's recorder dumps here on its own collective timeout
            Path(self.cfg.run.dir, "hang").mkdir(parents=True, exist_ok=True)
        if m.hang_timeout_s > 0 and self.hang is None:
            self.hang = HangWatchdog(self.env.rank, self.env.world_size, self.cfg.run.dir, m.hang_timeout_s,
                                     m.heartbeat_s, nccl=self.device.type == "cuda",
                                     key_prefix=f"restart{self.env.restart_count}")

    def enter(self, phase: str, step: int) -> None:
        if self.hang is not None:
            self.hang.enter(phase, step)
        self.faults.at_phase(phase, step)

    def compute_done(self, cpu_start: float) -> None:
        """The strategy's step is over: its thread CPU seconds since ``cpu_start`` (``time.thread_time()``)
        are the straggler score's clock (see dtrain/metrics/straggler.py for why CPU time)."""
        self.faults.after_compute(time.thread_time() - cpu_start)
        self.compute_s = time.thread_time() - cpu_start

    def step_done(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Every rank, every step (a collective on straggler-window steps). Returns keys for metrics.jsonl."""
        extra: dict[str, Any] = {}
        if self.straggler is not None:
            extra = self.straggler.observe(self.compute_s, metrics.get("data_wait_share", 0.0),
                                           int(metrics.get("peak_mem_gib", 0.0) * 2**30))
        if self.exporter is not None:
            try:
                self.exporter.on_step(step, {**metrics, **extra})
            except Exception as e:  # metrics never stop training
                if not self._exporter_failed:
                    log.warning("Prometheus exporter failed (training continues, metrics may be stale): %s", e)
                self._exporter_failed = True
        return extra

    def close(self) -> None:
        if self.hang is not None:
            self.hang.close()
            self.hang = None
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None
