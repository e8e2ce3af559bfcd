"""The run monitor's parts in one process: the Prometheus exporter over real HTTP, threshold validation,
straggler scores, the hang verdict, and the test-only fault switch."""

from __future__ import annotations

import math
import socket
import urllib.request

import pytest

from dtrain.config.errors import ConfigError
from dtrain.config.validate import load_config
from dtrain.distributed.env import DistEnv
from dtrain.metrics.faults import FaultSwitch, parse
from dtrain.metrics.hang import Report, find_culprits, last_collectives
from dtrain.metrics.prometheus import PrometheusExporter, RunState, metric_name
from dtrain.metrics.straggler import RankStats, scores
from tests.helpers import free_port

ENV = DistEnv(0, 2, 0, 2, "127.0.0.1", 29500, "torchrun", restart_count=3)


def _scrape(port: int) -> dict[str, list]:
    from prometheus_client.parser import text_string_to_metric_families

    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(body)}


def _exporter(port: int, state: RunState | None = None, *overrides: str) -> PrometheusExporter:
    cfg = load_config([f"logging.prometheus.port={port}", "run.name=unit", *overrides], 2)
    return PrometheusExporter(cfg, ENV, state or RunState(), {"strategy": "ddp"})


def test_exporter_serves_every_key_under_prometheus_names_with_job_labels(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    port = free_port()
    stats = [RankStats(0, 0.010, 1.0, 2**20, 0.01), RankStats(1, 0.013, 0.77, 2**21, 0.02)]
    exporter = _exporter(port, RunState(checkpoint_step=lambda: 40, checkpoint_unix=lambda: 1.0,
                                        save_seconds=lambda: 2.5, rank_stats=lambda: stats))
    try:
        exporter.on_step(41, {"loss": 2.5, "lr": 1e-3, "step_time_s": 0.2, "tokens_per_s": 1e4, "mfu": 0.4,
                              "data_wait_share": 0.1, "grad_norm": 1.5, "peak_mem_gib": 1.0, "ckpt_blocked_s": 0.3,
                              # keys other work adds (exposed communication, goodput) and one nobody planned
                              "exposed_comm_s": 0.05, "exposed_comm_fraction": 0.25, "goodput_ratio": 0.9,
                              "widgets_per_s": 3.0, "straggler_scores": [1.0, 0.77], "stragglers": [1]})
        exporter.on_step(42, {"loss": float("nan"), "grad_norm": float("inf")})
        families = _scrape(port)
    finally:
        exporter.close()
    value = {name: samples[0].value for name, samples in families.items()}
    assert value["dtrain_step"] == 42 and math.isnan(value["dtrain_loss"])
    assert value["dtrain_exposed_comm_seconds"] == 0.05 and value["dtrain_exposed_comm_ratio"] == 0.25
    assert value["dtrain_goodput_ratio"] == 0.9 and value["dtrain_widgets_per_second"] == 3.0
    assert value["dtrain_data_wait_ratio"] == 0.1 and value["dtrain_step_time_seconds"] == 0.2
    assert value["dtrain_checkpoint_step"] == 40 and value["dtrain_checkpoint_save_duration_seconds"] == 2.5
    assert value["dtrain_checkpoint_age_seconds"] > 1e9  # committed at unix time 1
    assert value["dtrain_restarts"] == 3  # the parser drops a counter's _total
    assert value["dtrain_alert_straggler_score"] == 0.8
    nonfinite = {s.labels["what"]: s.value for s in families["dtrain_nonfinite_events"]}
    assert nonfinite == {"loss": 1, "grad_norm": 1}
    per_rank = {s.labels["rank"]: s.value for s in families["dtrain_straggler_score"]}
    assert per_rank == {"0": 1.0, "1": 0.77}
    assert {s.labels["rank"]: s.value for s in families["dtrain_peak_memory_bytes"]} == {"0": 2**20, "1": 2**21}
    for name, samples in families.items():
        assert name.startswith("dtrain_") and "gib" not in name, name
        for sample in samples:
            assert {"run": "unit", "job_id": "slurm-812", "node": socket.gethostname()}.items() <= \
                sample.labels.items(), sample


def test_suffix_rules_name_new_keys_in_base_units():
    assert metric_name("exposed_comm_s")[0] == "dtrain_exposed_comm_seconds"
    assert metric_name("exposed_comm_fraction")[0] == "dtrain_exposed_comm_ratio"
    assert metric_name("foo_bar_per_s")[0] == "dtrain_foo_bar_per_second"
    assert metric_name("ckpt_blocked_s")[0] == "dtrain_checkpoint_blocked_seconds"


def test_a_port_in_use_is_a_one_line_error_naming_it():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError) as error:
            _exporter(port)
    text = error.value.render()
    assert len(text.splitlines()) == 1 and f"logging.prometheus.port={port}" in text and "in use" in text, text


def test_a_failing_metric_source_never_reaches_training():
    port = free_port()

    def broken() -> int:
        raise RuntimeError("checkpoint state unreadable")

    exporter = _exporter(port, RunState(checkpoint_step=broken))
    try:
        exporter.on_step(1, {"loss": "not a number", "weird": None, "grad_norm": object()})  # must not raise
        families = _scrape(port)
    finally:
        exporter.close()
    assert families["dtrain_exporter_errors"][0].value == 1
    assert "dtrain_alert_no_progress_seconds" in families  # the rest of the scrape still answered


def test_an_exporter_that_raises_does_not_stop_the_step():
    from dtrain.metrics.monitor import RunMonitor

    class Broken:
        def on_step(self, step, metrics):
            raise OSError("disk full")

        def close(self):
            pass

    monitor = RunMonitor(load_config(["monitor.straggler_window=0"], 1), DistEnv(0, 1, 0, 1, "", 0, "single"),
                         __import__("torch").device("cpu"))
    monitor.exporter = Broken()
    assert monitor.step_done(1, {"loss": 1.0}) == {}
    assert monitor.step_done(2, {"loss": 1.0}) == {}  # and again, warned once


@pytest.mark.parametrize("override,key", [
    ("logging.prometheus.port=70000", "logging.prometheus.port=70000"),
    ("logging.prometheus.alerts.mfu_floor=1.5", "logging.prometheus.alerts.mfu_floor=1.5"),
    ("logging.prometheus.alerts.throughput_drop_ratio=0", "logging.prometheus.alerts.throughput_drop_ratio=0"),
    ("logging.prometheus.alerts.no_progress_s=-5", "logging.prometheus.alerts.no_progress_s=-5"),
    ("logging.prometheus.alerts.checkpoint_intervals=nan", "logging.prometheus.alerts.checkpoint_intervals=nan"),
    ("logging.prometheus.alerts.restart_storm_restarts=0", "logging.prometheus.alerts.restart_storm_restarts=0"),
    ("monitor.straggler_threshold=1.2", "monitor.straggler_threshold=1.2"),
    ("monitor.heartbeat_s=200", "monitor.heartbeat_s=200.0 must be positive and at most half"),
    ("monitor.straggler_window=1", "monitor.straggler_window=1"),
])
def test_invalid_thresholds_are_one_line_config_errors(override, key):
    with pytest.raises(ConfigError) as error:
        load_config([override], 1)
    lines = error.value.render().splitlines()
    assert len(lines) == 1 and key in lines[0], lines


def test_straggler_score_is_the_best_peers_compute_over_own():
    assert scores([0.010, 0.013, 0.010, 0.011], [0, 0, 0, 0]) == pytest.approx([1.0, 1 / 1.3, 1.0, 10 / 11])
    # pipeline stages do different work: each is compared with its own stage only
    assert scores([0.010, 0.020, 0.011, 0.020], [0, 1, 0, 1]) == pytest.approx([1.0, 1.0, 10 / 11, 1.0])
    assert scores([0.0, 0.01], [0, 0]) == [1.0, 1.0]


def _report(rank, step, phase, seq=None, done=True, reported=True):
    collectives = {"default_pg": {"seq": seq, "op": "gloo:all_reduce", "done": done}} if seq is not None else {}
    return Report(rank, step, phase, 30.0, collectives, reported)


def test_the_rank_behind_in_the_collective_sequence_is_named():
    reports = {0: _report(0, 5, "step", 42, done=False), 1: _report(1, 5, "step", 41),
               2: _report(2, 5, "step", 42, done=False)}
    culprits, why = find_culprits(reports, 3)
    assert culprits == [1], why
    assert "rank 1 (step 5, phase 'step'" in why and "#41" in why and "ranks 0, 2 wait in" in why


def test_without_the_recorder_the_rank_in_an_earlier_phase_is_named():
    reports = {0: _report(0, 5, "step"), 1: _report(1, 5, "data")}
    assert find_culprits(reports, 2)[0] == [1]


def test_a_rank_that_never_reports_is_named_as_unresponsive():
    reports = {0: _report(0, 5, "step", 42, done=False), 1: _report(1, 5, "step", reported=False)}
    culprits, why = find_culprits(reports, 3)
    assert culprits == [1, 2] and "rank 2 sent no report (no heartbeat at all)" in why, why


def test_a_single_process_names_itself():
    assert find_culprits({0: _report(0, 3, "data")}, 1) == ([0], "rank 0 (step 3, phase 'data' for 30 s)")


def test_ranks_stuck_at_the_same_point_are_all_named():
    reports = {r: _report(r, 5, "step", 42, done=False) for r in range(2)}
    culprits, why = find_culprits(reports, 2)
    assert culprits == [0, 1] and "every rank is stuck at the same point" in why


def test_last_collectives_reads_a_flight_recorder_dump():
    dump = ('{"entries": [{"collective_seq_id": 3, "profiling_name": "gloo:broadcast", "retired": true, '
            '"process_group": ["0", "default_pg"], "is_p2p": false}, {"collective_seq_id": 4, '
            '"profiling_name": "gloo:all_reduce", "retired": false, "state": "scheduled", '
            '"process_group": ["0", "default_pg"], "is_p2p": false}]}')
    assert last_collectives(dump) == {"default_pg": {"seq": 4, "op": "gloo:all_reduce", "done": False}}
    assert last_collectives(None) == {}


def test_fault_specs():
    assert parse("stall_step@1#5:600").step == 5 and parse("slow@2:0.3").value == 0.3
    assert FaultSwitch(0, "slow@2:0.3").fault is None and FaultSwitch(2, "slow@2:0.3").fault is not None
    for bad in ("sleep@1", "stall_step@x", "slow@1#y"):
        with pytest.raises(ValueError):
            parse(bad)
