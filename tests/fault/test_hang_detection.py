"""A rank that stops making progress ends the whole job within the hang timeout, named, with every rank's
trace in <run.dir>/hang/ (real torchrun, gloo; the stall is the test-only fault of dtrain/metrics/faults.py)."""

from __future__ import annotations

import time

import pytest

from tests.helpers import TINY, read_metrics, torchrun

HANG = ["monitor.hang_timeout_s=8", "monitor.heartbeat_s=1", "checkpoint.interval_steps=0",
        "checkpoint.save_final=false", "trainer.max_steps=100000"]


def _check_dumps(run_dir, world: int) -> None:
    for rank in range(world):
        trace = (run_dir / "hang" / f"rank_{rank:05d}.txt").read_text()
        assert f"rank {rank}: no progress for" in trace and "most recent call first" in trace, trace[:500]
        assert "in run_step" in trace  # the training thread's stack, not just the watchdog's
        assert (run_dir / "hang" / f"flight_recorder_rank_{rank:05d}.json").stat().st_size > 0
    assert "hang detected" in (run_dir / "hang" / "verdict.txt").read_text()


def test_a_data_stall_on_one_of_two_ranks_ends_the_job_naming_it(tmp_path):
    start = time.monotonic()
    result = torchrun(2, [*TINY, *HANG, f"run.dir={tmp_path}"], timeout=240, DTRAIN_FAULT="stall_data@1#6:600")
    assert result.returncode != 0
    verdict = [line for line in result.stderr.splitlines() if line.startswith("dtrain: hang detected")]
    assert len(verdict) == 1, result.stderr[-3000:]
    assert "stuck: rank 1 (step 6, phase 'data'" in verdict[0] and "rank 0 waits in" in verdict[0], verdict[0]
    assert "rank 0 (" not in verdict[0]
    _check_dumps(tmp_path, 2)
    assert time.monotonic() - start < 200  # the stall lasts 600 s: the detector ended it, not the sleep's end


@pytest.mark.slow
def test_a_rank_sleeping_inside_its_step_at_four_ranks_is_named_and_an_even_run_names_no_straggler(tmp_path):
    result = torchrun(4, [*TINY, *HANG, "trainer.log_every=10", "monitor.straggler_window=10", f"run.dir={tmp_path}"],
                      timeout=400, DTRAIN_FAULT="stall_step@3#50:600")
    assert result.returncode != 0
    verdict = [line for line in result.stderr.splitlines() if line.startswith("dtrain: hang detected")]
    assert len(verdict) == 1, result.stderr[-3000:]
    assert "stuck: rank 3 (step 50, phase 'step'" in verdict[0] and "has not entered collective" in verdict[0]
    assert "ranks 0, 1, 2 wait in" in verdict[0], verdict[0]
    _check_dumps(tmp_path, 4)
    windows = [row for row in read_metrics(tmp_path) if "stragglers" in row]
    assert len(windows) == 4 and all(row["stragglers"] == [] for row in windows), windows  # steps 10..40
