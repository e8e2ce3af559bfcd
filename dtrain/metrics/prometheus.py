"""Prometheus ``/metrics`` for one node: served by local rank 0, rendered at scrape time.

One endpoint per node, not per rank: a fixed port works in a Kubernetes pod spec and in a Slurm scrape
config alike, and a 1024-GPU job is 128 targets instead of 1024. Job-wide values (loss, tokens/s,
checkpoint state, thresholds) come from global rank 0's endpoint only, so nothing is duplicated; every
node exports its own progress (step, last-step time) and the per-rank series (``rank`` label) of the
ranks it hosts, which every rank knows from the straggler window's all-gather.

The training loop only hands over its metrics dict (a dict update per step); the HTTP thread turns the
newest values into metric families when Prometheus scrapes. Names follow Prometheus conventions (base
units, ``_seconds``, ``_bytes``, ``_ratio`` for 0..1, ``_total`` for counters). Keys of the metrics
dict that this module does not know are exported too, named by the same rules (``x_s`` ->
``dtrain_x_seconds``, ``x_fraction``/``x_share`` -> ``dtrain_x_ratio``, ``x_per_s`` ->
``dtrain_x_per_second``), so a new measurement appears without touching this file. A failure while
rendering is counted in ``dtrain_exporter_errors_total`` and never reaches the training loop.
"""

from __future__ import annotations

import logging
import math
import re
import socket
import threading
import time
from typing import Any, Callable, Iterator

from omegaconf import DictConfig

from dtrain.config.errors import ConfigError
from dtrain.distributed.env import DistEnv, run_id
from dtrain.metrics.straggler import RankStats

log = logging.getLogger(__name__)

JOB_LABELS = ("run", "job_id", "node")

# metrics-dict key -> (metric name, help); keys not listed get a name from the suffix rules
NAMED: dict[str, tuple[str, str]] = {
    "loss": ("dtrain_loss", "training loss of the last step (mean over every target token of the global batch)"),
    "val_loss": ("dtrain_val_loss", "validation loss of the last evaluation"),
    "lr": ("dtrain_learning_rate", "learning rate of the last step"),
    "grad_norm": ("dtrain_grad_norm", "global gradient norm of the last step, before clipping"),
    "mfu": ("dtrain_mfu_ratio", "model FLOPs utilization of the last step (0..1)"),
    "tokens_per_s": ("dtrain_tokens_per_second", "global training throughput of the last step"),
    "step_time_s": ("dtrain_step_time_seconds", "wall time of the last step, data wait included"),
    "data_wait_share": ("dtrain_data_wait_ratio", "share of the last step rank 0 waited for data (0..1)"),
    "model_flops_per_s_per_device": ("dtrain_model_flops_per_second_per_device", "model FLOP/s per device"),
    "ckpt_blocked_s": ("dtrain_checkpoint_blocked_seconds", "how long the last checkpoint save blocked the loop"),
    "exposed_comm_s": ("dtrain_exposed_comm_seconds", "communication time of the last step not hidden by compute"),
    "exposed_comm_fraction": ("dtrain_exposed_comm_ratio", "share of the last step spent in exposed communication"),
    **{f"exposed_comm_{dim}_s": (f"dtrain_exposed_comm_{dim}_seconds",
                                 f"exposed communication of the last step in {dim} collectives "
                                 f"({'all ranks' if dim == 'other' else f'the {dim} mesh dimension'})")
       for dim in ("dp", "tp", "pp", "cp", "other")},
    "bubble_s": ("dtrain_bubble_seconds", "pipeline bubble of the last step: waits for a neighbouring stage"),
    "bubble_fraction": ("dtrain_bubble_ratio", "share of the last step spent in the pipeline bubble (0..1)"),
    "comm_calls": ("dtrain_comm_calls", "collectives rank 0 issued in the last step"),
    "comm_bytes": ("dtrain_comm_bytes", "payload bytes of rank 0's collectives in the last step"),
    "goodput": ("dtrain_goodput_ratio", "productive training time / wall time of the run so far (0..1)"),
    "goodput_ratio": ("dtrain_goodput_ratio", "productive training time / wall time of the run so far (0..1)"),
    "straggler_min_score": ("dtrain_straggler_min_score", "lowest straggler score of the last window"),
}
# exported in other forms (per rank, counters) or not numbers
NOT_GAUGES = {"peak_mem_gib", "preemptions", "straggler_scores", "stragglers"}
_SUFFIXES = ((r"_per_s$", "_per_second"), (r"_s$", "_seconds"), (r"_(fraction|share)$", "_ratio"),
             (r"_gib$", "_gibibytes"))


def metric_name(key: str) -> tuple[str, str]:
    """(Prometheus name, help) of a metrics-dict key."""
    if key in NAMED:
        return NAMED[key]
    name = re.sub(r"[^a-zA-Z0-9_]", "_", key)
    for pattern, replacement in _SUFFIXES:
        name = re.sub(pattern, replacement, name)
    return f"dtrain_{name}", f"metrics.jsonl key {key!r}"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class RunState:
    """What the exporter reads besides the metrics dict; callables so they are read at scrape time."""

    def __init__(self, checkpoint_step: Callable[[], int | None] = lambda: None,
                 checkpoint_unix: Callable[[], float | None] = lambda: None,
                 save_seconds: Callable[[], float | None] = lambda: None,
                 preempted: Callable[[], bool] = lambda: False,
                 rank_stats: Callable[[], list[RankStats] | None] = lambda: None):
        self.checkpoint_step, self.checkpoint_unix, self.save_seconds = checkpoint_step, checkpoint_unix, save_seconds
        self.preempted, self.rank_stats = preempted, rank_stats


class PrometheusExporter:
    """Local rank 0's ``/metrics``. ``on_step`` is the only call on the training thread."""

    def __init__(self, cfg: DictConfig, env: DistEnv, state: RunState, info: dict[str, str]):
        from prometheus_client import CollectorRegistry, start_http_server

        p = cfg.logging.prometheus
        self.env, self.state, self.global_rank0 = env, state, env.is_rank_zero
        self.labels = {"run": str(cfg.run.name), "job_id": run_id() or "", "node": socket.gethostname()}
        self.info = info
        self.thresholds = {
            "dtrain_alert_no_progress_seconds": p.alerts.no_progress_s,
            "dtrain_alert_throughput_drop_ratio": p.alerts.throughput_drop_ratio,
            "dtrain_alert_mfu_floor_ratio": p.alerts.mfu_floor,
            "dtrain_alert_straggler_score": cfg.monitor.straggler_threshold,
            "dtrain_alert_checkpoint_intervals": p.alerts.checkpoint_intervals,
            "dtrain_alert_restart_storm_restarts": p.alerts.restart_storm_restarts,
        }
        self.checkpoint_interval_steps = cfg.checkpoint.interval_steps
        self.restarts = env.restart_count
        self.values: dict[str, Any] = {}
        self.started_unix = time.time()
        self.step: int | None = None
        self.step_unix: float | None = None
        self.nonfinite = {"loss": 0, "grad_norm": 0}
        self.errors = 0
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        try:
            self.server, self.thread = start_http_server(p.port, addr=p.addr, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"logging.prometheus.port={p.port}: cannot serve /metrics on {p.addr}:{p.port} "
                              f"({e.strerror or e}); another process holds it: pick a free port, or 0 to switch "
                              "the exporter off") from None
        log.info("Prometheus metrics on http://%s:%d/metrics", p.addr, p.port)

    # -- training thread -----------------------------------------------------------------------------------
    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        self.step, self.step_unix = step, time.time()
        for key in self.nonfinite:
            value = _number(metrics.get(key))
            if value is not None and not math.isfinite(value):
                self.nonfinite[key] += 1
        self.values.update(metrics)  # one C-level call: the scrape thread never sees half an update

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- scrape thread (prometheus_client's Collector protocol) ---------------------------------------------
    def collect(self) -> Iterator[Any]:
        with self._lock:
            families: list[Any] = []
            for section in (self._progress, self._per_rank, self._job, self._checkpoint):
                try:
                    families += list(section())
                except Exception as e:  # count it, serve the other sections, never raise into the scrape
                    self.errors += 1
                    log.warning("rendering Prometheus metrics (%s) failed; training continues: %s",
                                section.__name__, e)
            yield from families
            yield self._counter("dtrain_exporter_errors", "failures while rendering these metrics", self.errors)

    def _gauge(self, name: str, doc: str, value: float, **extra: str):
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily(name, doc, labels=[*JOB_LABELS, *extra])
        family.add_metric([*self.labels.values(), *extra.values()], value)
        return family

    def _counter(self, name: str, doc: str, value: float):
        from prometheus_client.core import CounterMetricFamily

        family = CounterMetricFamily(name, doc, labels=list(JOB_LABELS))
        family.add_metric(list(self.labels.values()), value)
        return family

    def _progress(self) -> Iterator[Any]:
        if self.step is not None:
            yield self._gauge("dtrain_step", "optimizer steps completed", self.step)
            yield self._gauge("dtrain_last_step_timestamp_seconds", "unix time the last step finished",
                              self.step_unix)

    def _job(self) -> Iterator[Any]:
        """Job-wide values: global rank 0's endpoint only."""
        from prometheus_client.core import CounterMetricFamily

        if not self.global_rank0:
            return
        yield self._gauge("dtrain_run_info", "the run's constant facts (value 1)", 1.0, **self.info)
        values = dict(self.values)
        by_name: dict[str, tuple[str, float]] = {}
        for key, value in values.items():
            number = _number(value)
            if number is not None and key not in NOT_GAUGES:
                name, doc = metric_name(key)
                by_name[name] = (doc, number)
        for name, (doc, number) in sorted(by_name.items()):
            yield self._gauge(name, doc, number)
        nonfinite = CounterMetricFamily("dtrain_nonfinite_events", "steps whose loss or grad norm was NaN or "
                                        "infinite", labels=[*JOB_LABELS, "what"])
        for what, count in self.nonfinite.items():
            nonfinite.add_metric([*self.labels.values(), what], count)
        yield nonfinite
        yield self._counter("dtrain_restarts", "restarts of this job so far (torchrun or Slurm restart count)",
                            self.restarts)
        preemptions = _number(values.get("preemptions"))
        yield self._counter("dtrain_preemptions", "preemptions of this run (from the goodput ledger when present, "
                            "else this process's own signal)", preemptions if preemptions is not None
                            else float(self.state.preempted()))
        for name, value in self.thresholds.items():
            yield self._gauge(name, "alert threshold of this run (logging.prometheus.alerts, "
                              "monitor.straggler_threshold)", float(value))

    def _checkpoint(self) -> Iterator[Any]:
        if not self.global_rank0:
            return
        yield self._gauge("dtrain_checkpoint_interval_steps", "checkpoint.interval_steps (0: final saves only)",
                          self.checkpoint_interval_steps)
        step, unix, seconds = self.state.checkpoint_step(), self.state.checkpoint_unix(), self.state.save_seconds()
        if step is not None:
            yield self._gauge("dtrain_checkpoint_step", "step of the newest committed checkpoint", step)
        if unix is not None:
            yield self._gauge("dtrain_checkpoint_timestamp_seconds", "unix time the newest checkpoint committed",
                              unix)
        # with no checkpoint yet the age counts from the start of training, so a run that never manages
        # its first commit is caught by the same alert
        yield self._gauge("dtrain_checkpoint_age_seconds", "seconds since the newest checkpoint committed (or "
                          "since training started, before the first commit)",
                          max(0.0, time.time() - (unix if unix is not None else self.started_unix)))
        if seconds is not None:
            yield self._gauge("dtrain_checkpoint_save_duration_seconds", "the last save from start to commit "
                              "(background writing included)", seconds)

    def _per_rank(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        stats = self.state.rank_stats()
        first = self.env.rank - self.env.local_rank
        mine = range(first, first + self.env.local_world_size)
        labels = [*JOB_LABELS, "rank"]
        score = GaugeMetricFamily("dtrain_straggler_score", "compute time of the best peer / this rank's, over the "
                                  "last window (1 = fastest)", labels=labels)
        compute = GaugeMetricFamily("dtrain_compute_seconds", "median compute (thread CPU) seconds per step over "
                                    "the last window", labels=labels)
        memory = GaugeMetricFamily("dtrain_peak_memory_bytes", "peak memory of the rank (CUDA allocator peak; on "
                                   "CPU the peak resident set)", labels=labels)
        wait = GaugeMetricFamily("dtrain_rank_data_wait_ratio", "median share of the step the rank waited for "
                                 "data over the last window", labels=labels)
        if stats:
            for s in stats:
                if s.rank in mine:
                    row = [*self.labels.values(), str(s.rank)]
                    score.add_metric(row, s.score)
                    compute.add_metric(row, s.compute_s)
                    memory.add_metric(row, s.peak_memory_bytes)
                    wait.add_metric(row, s.data_wait_share)
        elif "peak_mem_gib" in self.values:  # before the first window: this rank's own
            memory.add_metric([*self.labels.values(), str(self.env.rank)], self.values["peak_mem_gib"] * 2**30)
        for family in (score, compute, memory, wait):
            if family.samples:
                yield family
