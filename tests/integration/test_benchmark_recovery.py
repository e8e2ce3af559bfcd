"""Smoke run of benchmarks/recovery.py on local disk at 2 ranks: every part is there and they add up to
the total, a kill -9 loses the steps since the last commit and a SIGTERM loses none. No timing asserts."""

from __future__ import annotations

import json
import sys

import pytest

from tests.helpers import run_cmd


@pytest.mark.timeout(900)
def test_recovery_breakdown_adds_up(tmp_path):
    out = tmp_path / "recovery.json"
    proc = run_cmd([sys.executable, "benchmarks/recovery.py", "--out", str(out), "--storage", "local", "--ranks", "2",
                    "--warm-steps", "12", "--override", "model.n_layer=2", "model.d_model=64", "data.seq_len=32",
                    "data.max_bytes=400000", "trainer.global_batch_size=8", "trainer.micro_batch_size=2"],
                   timeout=850)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = {c["failure"]: c for c in json.loads(out.read_text())["cases"]}
    assert set(cases) == {"kill -9", "SIGTERM"}
    for case in cases.values():
        parts = [case[k] for k in ("detection_s", "to_boundary_s", "save_s", "teardown_s", "relaunch_s", "restore_s",
                                   "first_step_s") if k in case]
        assert case["total_s"] == pytest.approx(sum(parts), abs=1e-6)
        assert case["relaunch_s"] > 0 and case["restore_s"] > 0 and case["cold_start_s"] > 0
    assert cases["kill -9"]["restored_step"] == 10 and cases["kill -9"]["lost_steps"] >= 2
    assert cases["SIGTERM"]["lost_steps"] == 0 and cases["SIGTERM"]["restored_step"] >= 12
    assert cases["SIGTERM"]["save_s"] > 0
