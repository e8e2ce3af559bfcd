"""End to end on a real Slurm cluster: scripts rendered by `dtrain launch slurm`, submitted with plain sbatch.

Two nodes (n1, n2 on 127.0.0.1), one gloo rank per node. The signal is the one Slurm sends before the
time limit (`--signal=B:USR1@grace` reaches only the batch shell: `scancel --signal=USR1 --batch`).
After `scontrol requeue` Slurm holds a job for a while (BeginTime); the tests release it with
`scontrol update StartTime=now` once the nodes are idle, which a user's job never needs.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrain.launch.cli import render
from tests.helpers import TINY, read_metrics, run_cmd, script_env, torchrun

pytestmark = pytest.mark.usefixtures("slurm_cluster")

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def job_env(**extra: str) -> dict[str, str]:
    """What a user's login shell would hold (dtrain importable, python on PATH); sbatch exports the submitting
    environment to the job (its default, --export=ALL). CI is unset: the job is not the test."""
    return script_env(CI=None, **extra)


class Job:
    def __init__(self, script: Path, cwd: Path, env: dict[str, str]):
        result = subprocess.run(["sbatch", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        self.id = result.stdout.split()[-1]  # "Submitted batch job N"
        self.cwd = cwd

    def info(self) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], capture_output=True, text=True).stdout
        return dict(token.split("=", 1) for token in out.split() if "=" in token)

    @property
    def log(self) -> str:
        path = self.cwd / f"slurm-dtrain-{self.id}.out"
        return path.read_text() if path.exists() else ""

    @property
    def run_dir(self) -> Path:
        return self.cwd / "runs" / f"slurm-{self.id}"

    def wait(self, until, timeout: float, what: str) -> dict[str, str]:
        """Poll until ``until(info)``; release a requeued job held by BeginTime once its last run is gone."""
        deadline = time.monotonic() + timeout
        held_since = None
        while True:
            info = self.info()
            if until(info):
                return info
            if info.get("JobState") in TERMINAL:
                pytest.fail(f"job {self.id} ended ({info.get('JobState')} {info.get('ExitCode')}) before {what}:"
                            f"\n{self.log[-4000:]}")
            if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
                held_since = held_since or time.monotonic()
                if self.previous_run_gone(held_since):
                    subprocess.run(["scontrol", "update", f"JobId={self.id}", "StartTime=now"], check=True)
            else:
                held_since = None
            if time.monotonic() > deadline:
                self.cancel()
                pytest.fail(f"job {self.id}: no {what} within {timeout:.0f} s ({info.get('JobState')}):\n"
                            f"{self.log[-4000:]}")
            time.sleep(0.5)

    def previous_run_gone(self, held_since: float) -> bool:
        """Release a held job only once its last run is cleaned up: slurmd refuses to launch a batch job
        whose previous run it is still killing ("Job N already killed, do not launch batch job") and
        the job then FAILS without running; seen with a release 0.5 s after `scontrol requeue`."""
        steps = subprocess.run(["pgrep", "-f", rf"slurmstepd: \[{self.id}\."], capture_output=True).stdout.strip()
        return not steps and nodes_idle() and time.monotonic() - held_since > 3.0

    def wait_done(self, timeout: float = 240) -> dict[str, str]:
        return self.wait(lambda i: i.get("JobState") in TERMINAL, timeout, "end")

    def cancel(self) -> None:
        subprocess.run(["scancel", self.id], capture_output=True)


def nodes_idle() -> bool:
    states = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.split()
    return bool(states) and set(states) == {"idle"}


def wait_for_idle(timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not nodes_idle():
        assert time.monotonic() < deadline, "Slurm nodes not idle"
        time.sleep(0.3)


def sbatch(tmp_path: Path, overrides: list[str], **env: str) -> Job:
    """Render with `dtrain launch slurm`, write the file, submit it with plain `sbatch FILE`."""
    text, _, _ = render("slurm", ["--nodes", "2", "--nproc-per-node", "1", "launcher.partition=debug",
                                  "launcher.time_limit=00:10:00", *overrides])
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    wait_for_idle()
    return Job(script, tmp_path, job_env(**env))


def losses(run_dir: Path) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir)}


STEPS = 120  # long enough that the signal lands mid-run on a fast machine (24 steps could finish first)
TRAIN = [*TINY, "model.dropout=0.1", "checkpoint.interval_steps=0", f"trainer.max_steps={STEPS}"]


def test_usr1_before_the_time_limit_requeues_and_resumes_exactly(tmp_path):
    reference = torchrun(2, [*TRAIN, f"run.dir={tmp_path / 'reference'}"])
    assert reference.returncode == 0, reference.stderr[-3000:]
    job = sbatch(tmp_path, TRAIN)
    try:
        job.wait(lambda i: (job.run_dir / "metrics.jsonl").exists()
                 and len((job.run_dir / "metrics.jsonl").read_text().splitlines()) >= 4, 180, "4 trained steps")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job.id], check=True)
        info = job.wait_done(240)
    finally:
        job.cancel()
    log = job.log
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-4000:]
    assert info["Restarts"] == "1", log[-4000:]
    assert "received USR1; forwarding it to the training tasks" in log
    assert "training exited 75" in log and "preempted after a committed checkpoint: requeueing" in log
    assert log.count("preempted by SIGUSR1") == 2, log[-4000:]  # both ranks, each on its own node
    resumed = log.split("resumed from", 1)[1].splitlines()[0]
    step = int(resumed.split("step_", 1)[1][:8])
    assert 4 <= step < STEPS
    expected, got = losses(tmp_path / "reference"), losses(job.run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in range(1, STEPS + 1)] == [expected[s] for s in range(1, STEPS + 1)]


def test_unusable_storage_exits_2_and_is_not_requeued(tmp_path):
    job = sbatch(tmp_path, [*TINY, "trainer.max_steps=5", "checkpoint.uri=/proc/dtrain-cannot-write-here"])
    try:
        info = job.wait_done(180)
    finally:
        job.cancel()
    log = job.log
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", log[-4000:]
    assert info["Restarts"] == "0"
    assert "checkpoint.uri=/proc/dtrain-cannot-write-here" in log and "not requeued" in log


@pytest.mark.parametrize("failpoint,retries,attempts,reason", [
    # every attempt commits a new step and then dies: retried exactly max_crash_retries times
    ("mid_retention@0", 1, 2, "no retries left"),
    # every attempt dies before its first commit: the second crash has made no progress (slow: 2 more attempts)
    pytest.param("mid_shard@*#4", 5, 2, "no checkpoint progress since the last crash", marks=pytest.mark.slow),
])
def test_crashes_are_retried_a_bounded_number_of_times(tmp_path, failpoint, retries, attempts, reason):
    job = sbatch(tmp_path, [*TINY, "trainer.max_steps=500", "checkpoint.interval_steps=2", "checkpoint.keep_last=1",
                            f"launcher.max_crash_retries={retries}"], DTRAIN_FAILPOINT=failpoint)
    try:
        info = job.wait_done(120 * attempts)
    finally:
        job.cancel()
    log = job.log
    assert info["JobState"] == "FAILED", log[-4000:]
    assert info["Restarts"] == str(attempts - 1), log[-4000:]
    assert log.count("dtrain failpoint") >= attempts
    assert f"crash {attempts} (exit 1): {reason}" in log, log[-4000:]


def test_a_two_point_submitit_sweep_completes(tmp_path):
    """`hydra/launcher=submitit_slurm` with -m: one Slurm job per point (submitit's array), each a dtrain run."""
    wait_for_idle()
    result = run_cmd([sys.executable, "-m", "dtrain", "launch", "sweep", "-m", "strategy=single", "trainer.max_steps=3",
                      "trainer.seed=1,2", *TINY, "hydra/launcher=submitit_slurm", "hydra.launcher.partition=debug",
                      "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path / 'multirun'}"],
                     timeout=240, cwd=tmp_path, env=job_env())
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.startswith("slurm-") for r in runs)
    first_losses = [read_metrics(r)[0]["loss"] for r in runs]
    assert all(len(read_metrics(r)) == 3 for r in runs) and first_losses[0] != first_losses[1]  # two seeds
