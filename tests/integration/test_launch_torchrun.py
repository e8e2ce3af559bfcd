"""`dtrain launch torchrun` scripts run for real: the wrapper's exit codes, host waits and in-place restarts."""

from __future__ import annotations

import time

import pytest

from dtrain.checkpoint.manager import committed_steps
from dtrain.checkpoint.storage import Storage
from dtrain.launch.cli import render
from tests.helpers import TINY, free_port, read_metrics, run_cmd, script_env


def run_script(tmp_path, argv: list[str], timeout: float = 240, **env: str):
    text, _, _ = render("torchrun", ["--nproc-per-node", "2", *TINY, *argv])
    script = tmp_path / "launch.sh"
    script.write_text(text)
    return run_cmd(["bash", str(script)], timeout=timeout, cwd=tmp_path,
                   env=script_env(MASTER_PORT=str(free_port()), **env))


def test_unusable_storage_exits_2_without_torchrun_restarts(tmp_path):
    """A worker's config verdict is final: the wrapper stops torchrun before --max-restarts retries it."""
    started = time.monotonic()
    result = run_script(tmp_path, ["launcher.max_restarts=3", "checkpoint.uri=/proc/dtrain-not-writable",
                                   "trainer.max_steps=5"])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "training exited 2 (bad config or unusable storage)" in result.stderr
    assert result.stderr.count("checkpoint.uri=/proc/dtrain-not-writable") == 1  # one report, no restart
    print(f"exit 2 after {time.monotonic() - started:.1f} s")


def test_a_rendezvous_host_that_never_resolves_is_a_clear_timeout(tmp_path):
    started = time.monotonic()
    result = run_script(tmp_path, ["launcher.rdzv_timeout_s=3", "trainer.max_steps=5"], timeout=120,
                        MASTER_ADDR="no-such-node.invalid")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "rendezvous host 'no-such-node.invalid' did not resolve within 3 s" in result.stderr
    assert time.monotonic() - started < 60


@pytest.mark.slow  # ~45 s on 2 shared cores; the wrapper's other paths run in the default suite
def test_a_crashed_worker_group_restarts_in_place_and_resumes(tmp_path):
    """--max-restarts with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: rank 0 is killed after committing step 8;
    torchrun restarts both workers, they resume from step 8 and finish; the wrapper exits 0."""
    result = run_script(tmp_path, ["launcher.max_restarts=1", "trainer.max_steps=12", "checkpoint.interval_steps=4",
                                   "checkpoint.keep_last=1", f"run.dir={tmp_path / 'run'}"],
                        DTRAIN_FAILPOINT="mid_retention@0#8")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "dtrain failpoint mid_retention" in result.stderr
    assert "step_00000008" in result.stderr.split("resumed from", 1)[1].splitlines()[0]
    assert committed_steps(Storage(str(tmp_path / "run" / "checkpoints"))) == [12]
    assert max(row["step"] for row in read_metrics(tmp_path / "run")) == 12
