"""The chaos soak, short: real kill -9 and SIGTERM events at random moments of a 2-rank run on local disk
and S3 (moto), each followed by a relaunch; the runs end with the uninterrupted run's losses, and no
restore ever loaded a step that was not committed or that the soak had corrupted."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import run_cmd

KILLS = 10


@pytest.mark.timeout(1500)  # ~2.5 min on 2 quiet cores: about 14 launches of a 2-rank job
def test_short_chaos_soak_recovers_exactly(tmp_path):
    out = tmp_path / "chaos.json"
    proc = run_cmd([sys.executable, "benchmarks/chaos.py", "--kills", str(KILLS), "--max-steps", "16",
                    "--seed", "3", "--corrupt-rate", "0.2", "--out", str(out), "--keep", str(tmp_path / "runs")],
                   timeout=1500)
    result = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert result["ok"] and all(result["checks"].values()), result["checks"]
    assert result["kills"] == KILLS and result["unexpected_exits"] == 0
    assert result["recoveries"] == KILLS  # every failure was followed by a productive step
    assert {r["storage"] for r in result["per_run"]} == {"local", "s3"}
    assert result["corruptions"] >= 1 and result["corrupt_steps_refused"] >= 1
    assert len(result["events_by_phase"]) >= 3  # not all in one place: steps, saves, start-up or restore
    assert result["steps_lost"] == sum(r["lost_steps"] for r in result["per_run"])
