"""The overhead benchmark runs end to end and writes the JSON its contract names (a smoke run, not a timing check)."""

import json
import sys

from tests.helpers import run_cmd


def test_overhead_benchmark_writes_paired_ratio(tmp_path):
    out = tmp_path / "overhead.json"
    proc = run_cmd([sys.executable, "benchmarks/overhead.py", "--out", str(out), "--rounds", "2", "--steps", "1"],
                   timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["round_ratios"]) == 2
    assert result["baseline_step_s"] > 0 and result["dtrain_step_s"] > 0
    assert result["ratio"] > 0
    low, high = result["ratio_95ci"]
    assert low <= result["ratio"] <= high


def test_deepspeed_baseline_writes_the_contract_ratio(tmp_path):
    """``--baseline deepspeed``: dtrain's zero2 against a hand-written deepspeed.initialize loop."""
    out = tmp_path / "overhead-ds.json"
    proc = run_cmd([sys.executable, "benchmarks/overhead.py", "--baseline", "deepspeed", "--out", str(out),
                    "--rounds", "2", "--steps", "1"], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["baseline"] == "deepspeed" and "strategy=zero2" in result["overrides"]
    assert result["ratio"] > 0 and len(result["round_ratios"]) == 2
