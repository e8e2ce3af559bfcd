"""Smoke run of benchmarks/overhead.py (both cases): checks that would catch an unfair or broken comparison.

No timing asserts: the numbers of a 2-round run on a shared machine mean nothing. What must hold is that
both arms did the same work, that the reported ratio is what the recorded timings give, and that the
checkpoint case really saved (and dtrain committed) inside the timed window.
"""

from __future__ import annotations

import json
import statistics
import sys

import pytest

from tests.helpers import run_cmd

ROUNDS, STEPS, EVERY, KEEP_LAST = 2, 4, 2, 2
CASES = ("default", "small")


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("overhead") / "overhead.json"
    proc = run_cmd([sys.executable, "benchmarks/overhead.py", "--out", str(out), "--rounds", str(ROUNDS),
                    "--steps", str(STEPS), "--checkpoint-every", str(EVERY)], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_top_level_is_the_default_case(result):
    assert set(result["cases"]) == set(CASES)
    assert result["headline_case"] == "default"
    assert result["ratio"] == result["cases"]["default"]["ratio"]
    assert result["ratio_95ci"] == result["cases"]["default"]["ratio_95ci"]
    for case in CASES:
        assert set(result["summary"][case]) >= {"ratio", "ratio_95ci", "overhead_ms_per_step", "identical_losses"}


@pytest.mark.parametrize("case", CASES)
def test_both_arms_trained_identically(result, case):
    """Same weights, samples, loss arithmetic and optimizer: the global loss of every step is bit-identical."""
    c = result["cases"][case]
    ours, theirs = c["losses"]["dtrain"], c["losses"][c["baseline"]]
    assert len(ours) == len(theirs) == (ROUNDS + 1) * STEPS
    assert ours == theirs
    assert c["identical_losses"] is True and c["max_abs_loss_diff"] == 0.0
    assert ours[-1] < ours[0]  # it trained (a loop that skipped the update would still match itself)


@pytest.mark.parametrize("case", CASES)
def test_ratio_is_what_the_recorded_rounds_give(result, case):
    c = result["cases"][case]
    baseline = c["baseline"]
    rounds = c["rounds"]
    assert len(rounds) == c["rounds_timed"] == ROUNDS
    orders = [r["order"] for r in rounds]
    assert sorted(orders[0]) == sorted(["dtrain", baseline])
    assert all(later == earlier[::-1] for earlier, later in zip(orders, orders[1:]))  # order flips every round
    for r in rounds:
        assert len(r["step_s"]["dtrain"]) == len(r["step_s"][baseline]) == STEPS
    ratios = [sum(r["step_s"]["dtrain"]) / sum(r["step_s"][baseline]) for r in rounds]
    assert c["round_ratios"] == pytest.approx(ratios, rel=1e-12)
    assert c["ratio"] == pytest.approx(statistics.median(ratios), rel=1e-12)
    low, high = c["ratio_95ci"]
    assert min(ratios) <= low <= high <= max(ratios)
    steps = {arm: [s for r in rounds for s in r["step_s"][arm]] for arm in ("dtrain", baseline)}
    assert c["dtrain_step_s"] == pytest.approx(statistics.median(steps["dtrain"]), rel=1e-12)
    assert c["baseline_step_s"] == pytest.approx(statistics.median(steps[baseline]), rel=1e-12)


def test_checkpoint_case_saved_and_committed_inside_the_timed_window(result):
    c = result["cases"]["small"]
    baseline = c["baseline"]
    assert c["checkpoint_every"] == EVERY
    for index, r in enumerate(c["rounds"], start=1):  # round 0 (steps 1..STEPS) is the untimed warm-up
        block = range(index * STEPS + 1, (index + 1) * STEPS + 1)
        due = [step for step in block if step % EVERY == 0]
        assert due and r["saved_steps"] == {"dtrain": due, baseline: due}
    every_due = [step for step in range(1, (ROUNDS + 1) * STEPS + 1) if step % EVERY == 0]
    dtrain = c["checkpoints"]["dtrain"]
    assert dtrain["saved_steps"] == every_due
    assert dtrain["committed_at_end"] == every_due[-KEEP_LAST:]  # committed, and retention ran
    assert dtrain["newest_verified"] is True  # sizes and CRC32C of every file in its manifest
    assert c["checkpoints"][baseline]["kept_at_end"] == every_due[-KEEP_LAST:]
    assert all(c[key][arm] > 0 for key in ("save_step_s", "plain_step_s") for arm in ("dtrain", baseline))
    assert result["cases"]["default"]["checkpoints"] is None


def test_deepspeed_baseline_does_the_same_work(tmp_path):
    """``--baseline deepspeed``: dtrain's zero2 against a hand-written deepspeed.initialize loop, same losses."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "overhead_deepspeed.json"
    proc = run_cmd([sys.executable, "benchmarks/overhead.py", "--baseline", "deepspeed", "--case", "small",
                    "--out", str(out), "--rounds", "1", "--steps", str(STEPS), "--checkpoint-every", str(EVERY)],
                   timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    c = json.loads(out.read_text())["cases"]["small"]
    assert c["baseline"] == "deepspeed" and "strategy=zero2" in c["overrides"]
    ours, theirs = c["losses"]["dtrain"], c["losses"]["deepspeed"]
    assert len(ours) == len(theirs) == 2 * STEPS and ours[-1] < ours[0]
    assert c["max_abs_loss_diff"] < 1e-5, (ours, theirs)
    assert c["checkpoints"]["deepspeed"]["saved_steps"] == c["checkpoints"]["dtrain"]["saved_steps"] == [2, 4, 6, 8]
    assert len(c["round_ratios"]) == 1 and c["ratio"] > 0
