"""Spot economics: the goodput model against a simulation, its limits, and ``dtrain scale spot``."""

from __future__ import annotations

import json
import math
import random

import pytest

from dtrain.cli import run
from dtrain.scaling.spot import (Inputs, best_interval, estimate, max_rate_for_savings, measured_from_run,
                                 segment_goodput)
from tests.unit.test_goodput import attempt


def simulated_goodput(tau: float, save: float, restart: float, mtbi: float, segments: int, seed: int = 0) -> float:
    """Run the job for real in simulated time: Poisson interruptions hit work, saves and restarts alike."""
    rng = random.Random(seed)
    clock = 0.0
    next_failure = rng.expovariate(1 / mtbi)
    for _ in range(segments):
        while True:
            if clock + tau + save <= next_failure:  # the segment and its save finish
                clock += tau + save
                break
            clock = next_failure  # interrupted: restart (which may itself be interrupted), then redo the segment
            while True:
                next_failure = clock + rng.expovariate(1 / mtbi)
                if clock + restart <= next_failure:
                    clock += restart
                    break
                clock = next_failure
    return segments * tau / clock


@pytest.mark.parametrize("tau,save,restart,mtbi", [(600, 30, 120, 3600), (60, 5, 300, 900), (3000, 60, 60, 2000)])
def test_model_matches_a_simulation_of_interruptions(tau, save, restart, mtbi):
    simulated = simulated_goodput(tau, save, restart, mtbi, segments=20000)
    assert segment_goodput(tau, save, restart, mtbi) == pytest.approx(simulated, rel=0.03)


def test_best_interval_is_near_young_when_saves_are_cheap_and_never_beaten():
    save, restart, mtbi = 10.0, 60.0, 36000.0
    tau, goodput = best_interval(save, restart, mtbi)
    assert tau == pytest.approx(math.sqrt(2 * save * mtbi), rel=0.05)
    for other in (tau / 2, tau * 0.9, tau * 1.1, tau * 2):
        assert segment_goodput(other, save, restart, mtbi) <= goodput
    assert best_interval(save, restart, math.inf) == (math.inf, 1.0)


def inputs(**overrides) -> Inputs:
    values = dict(save_s=[10.0] * 3, restart_s=[60.0] * 3, tokens_per_s_per_gpu=[1000.0] * 3,
                  spot_preemptions_per_node_hour=0.01, on_demand_failures_per_node_hour=1e-4, on_demand_price=4.0,
                  spot_price=1.2, spot_capacity_wait_s=300.0, gpus=[8, 128, 1024], gpus_per_node=8, provenance={})
    values.update(overrides)
    return Inputs(**values)


def test_any_node_stops_the_job_so_the_rate_scales_with_nodes_and_savings_shrink():
    rows = [estimate(inputs(), i) for i in range(3)]
    assert [r["nodes"] for r in rows] == [1, 16, 128]
    assert rows[0]["spot"]["mtbi_s"] / rows[2]["spot"]["mtbi_s"] == pytest.approx(128)
    savings = [r["savings"] for r in rows]
    assert savings[0] > savings[1] > savings[2]
    # without preemptions both kinds fail alike, and the saving is exactly the price discount
    assert estimate(inputs(), 2, spot_rate=0.0)["savings"] == pytest.approx(1 - 1.2 / 4.0)
    cost = rows[1]["on_demand"]["cost_per_million_tokens"]
    assert cost == pytest.approx(4.0 / 3600 / (1000.0 * rows[1]["on_demand"]["goodput"]) * 1e6)


def test_the_largest_rate_that_keeps_a_saving():
    case = inputs()
    limit = max_rate_for_savings(case, 1, 0.6)
    assert estimate(case, 1, limit)["savings"] == pytest.approx(0.6, abs=1e-3)
    assert estimate(case, 1, limit * 1.05)["savings"] < 0.6
    assert max_rate_for_savings(case, 1, 0.9) is None  # a 70% discount never saves 90%
    assert max_rate_for_savings(case, 2, 0.6) < limit  # a bigger job tolerates fewer preemptions per node


def test_spot_command_from_a_measured_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records: list = []
    end = attempt(records, "a", 100.0, None, range(1, 9), commits=(4, 8))
    attempt(records, "b", end + 6.0, 8, range(9, 13), commits=(12,), end="done")
    (run_dir / "goodput.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    for r in records:
        r.setdefault("world_size", 2)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "tokens_per_s": 2000.0}) + "\n"
                                                   for s in range(1, 13)))
    measured = measured_from_run(run_dir)
    assert measured["save_s"][0] == 0.5
    assert measured["restart_s"][0] == pytest.approx(6.0 + 2.0 + 1.0 + 1.0)  # gap, start-up, restore, first step
    assert measured["tokens_per_s_per_gpu"][0] == 2000.0  # the synthetic ledger names no world size: 1 rank
    out = tmp_path / "study" / "spot.json"
    assert run(["scale", "spot", "--from", str(run_dir), "--spot-preemptions-per-node-hour", "0.02",
                "--on-demand-price", "4", "--spot-price", "1", "--restart-s", "30,60,120", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 10000
    assert [r["restart_s"] for r in result["rows"]] == [30, 60, 120]
    assert result["inputs"]["provenance"]["restart_s"] == "given"
    assert "blocking saves" in result["inputs"]["provenance"]["save_s"]
    assert "60%" in "\n".join(result["where_60_90_percent_holds"])
    assert "saving" in capsys.readouterr().out
