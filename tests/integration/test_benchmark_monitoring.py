"""Smoke run of benchmarks/monitoring_overhead.py: both parts run and every ratio is recomputable from the
samples in its JSON (the numbers themselves come from a quiet machine, not from a test)."""

from __future__ import annotations

import json
import statistics
import sys

import pytest

from tests.helpers import REPO, run_cmd, subprocess_env


@pytest.mark.slow
def test_monitoring_overhead_benchmark_writes_recomputable_ratios(tmp_path):
    out = tmp_path / "monitoring.json"
    result = run_cmd([sys.executable, str(REPO / "benchmarks" / "monitoring_overhead.py"), "--out", str(out),
                      "--rounds", "2", "--steps", "5", "--pairs", "1"], timeout=600,
                     env=subprocess_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    monitor = data["monitor"]
    ratios = [sum(r["monitor"]) / sum(r["off"]) for r in monitor["rounds"]]
    assert len(ratios) == 2 and all(len(r["monitor"]) == 5 == len(r["off"]) for r in monitor["rounds"])
    assert monitor["ratio"] == pytest.approx(statistics.median(ratios))
    pair = data["flight_recorder"]["pairs"][0]
    assert len(pair["on_step_s"]) == 20 == len(pair["off_step_s"])
    assert pair["ratio"] == pytest.approx(statistics.median(pair["on_step_s"]) / statistics.median(pair["off_step_s"]))
    assert data["combined_ratio"] == pytest.approx(monitor["ratio"] * data["flight_recorder"]["ratio"])
