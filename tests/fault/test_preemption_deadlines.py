"""A preemption that cannot reach a step boundary still ends the process, promptly and honestly; a
single Ctrl-C stops a foreground run cleanly. Real signals to a real dtrain process."""

from __future__ import annotations

import signal
import sys
import time

from dtrain.checkpoint.manager import committed_steps
from dtrain.checkpoint.storage import Storage
from tests.helpers import TINY, TINY_TRAIN, finish, start, wait_for_rows



def run(tmp_path, *extra: str, data: tuple[str, ...] = tuple(TINY[len(TINY_TRAIN):]), grace_s: float = 3):
    return start([sys.executable, "-m", "dtrain", *TINY_TRAIN, *data, "strategy=single", "checkpoint.interval_steps=2",
                  f"checkpoint.grace_period_s={grace_s:g}", f"run.dir={tmp_path}", "trainer.max_steps=100000", *extra])


def test_a_single_ctrl_c_saves_and_stops_cleanly(tmp_path):
    proc = run(tmp_path)
    wait_for_rows(tmp_path, 3, proc)
    proc.send_signal(signal.SIGINT)
    result = finish(proc, timeout=60)
    assert result.returncode == 75, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    assert "preempted by SIGINT" in result.stderr
    assert committed_steps(Storage(str(tmp_path / "checkpoints")))[-1] >= 3


def test_one_signal_delivered_twice_is_one_preemption(tmp_path):
    """slurmstepd signals every process of a step and torchrun forwards the same signal: back to back,
    that is one preemption, which saves and exits 75 (it used to exit 1 without saving)."""
    proc = run(tmp_path)
    wait_for_rows(tmp_path, 3, proc)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    result = finish(proc, timeout=60)
    assert result.returncode == 75, result.stderr[-2000:]
    assert "received SIGUSR1 again within 1 s: the same preemption delivered twice" in result.stderr
    assert "preempted by SIGUSR1" in result.stderr
    assert committed_steps(Storage(str(tmp_path / "checkpoints")))[-1] >= 3


def _stalled_run(tmp_path, grace_s: float = 3):
    """A run that commits steps 2 and 4, then stalls inside step 5 waiting for data that never comes."""
    conf = tmp_path / "conf" / "data"
    conf.mkdir(parents=True)
    (conf / "stalling.yaml").write_text("_target_: tests.unit.user_plugins.StallingData\nseq_len: 32\n"
                                        "vocab_size: 256\nstall_after: 32\nstall_s: 600\n")
    proc = run(tmp_path, "trainer.max_steps=6", data=(f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
                                                       "data=stalling"), grace_s=grace_s)
    wait_for_rows(tmp_path, 4, proc)
    time.sleep(0.5)
    return proc


def test_a_second_signal_exits_at_once_without_saving(tmp_path):
    proc = _stalled_run(tmp_path, grace_s=20)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # later than DUPLICATE_WINDOW_S: a second request, not the first one delivered twice
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=30)
    assert time.monotonic() - sent < 5
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if "WITHOUT a preemption checkpoint" in line]
    assert len(lines) == 1 and "received SIGTERM again" in lines[0] and "step 4 is intact" in lines[0], lines
    assert committed_steps(Storage(str(tmp_path / "checkpoints"))) == [2, 4]


def test_a_step_that_never_ends_is_given_up_after_the_grace_period(tmp_path):
    proc = _stalled_run(tmp_path)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=60)
    elapsed = time.monotonic() - sent
    assert 3 <= elapsed < 10, elapsed  # checkpoint.grace_period_s=3
    assert result.returncode == 1, result.stderr[-2000:]
    assert "grace_period_s=3 passed without reaching a step boundary" in result.stderr
    assert "step 4 is intact" in result.stderr
    assert committed_steps(Storage(str(tmp_path / "checkpoints"))) == [2, 4]
