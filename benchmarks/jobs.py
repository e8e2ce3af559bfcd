"""Launch, watch, fail and relaunch real 2-4 rank torchrun jobs: the harness of recovery.py and chaos.py.

Every job runs in a session of its own with its stderr in a file (a long job would fill a pipe); a
failure is real: SIGKILL of one worker, of the whole process tree, or SIGTERM to the torchrun agent.
Times are wall-clock (``time.time``) so they line up with the goodput ledger the job writes.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import free_port, kill_tree  # noqa: E402  (one process-tree killer for tests and benchmarks)

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "DTRAIN_FAILPOINT")
# torchrun's own log line when it noticed a failed worker and starts stopping the others
_TEARDOWN = re.compile(r"^[IWE](\d\d)(\d\d) (\d\d:\d\d:\d\d\.\d+) .*Sending process \d+ closing signal")


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto's S3 server on a free loopback port; returns (process, endpoint URL)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(600):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def s3_overrides(endpoint: str, prefix: str) -> list[str]:
    """A fresh bucket on the moto endpoint and the overrides that put checkpoints there."""
    import s3fs

    bucket = f"dtrain-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing").mkdir(bucket)
    return ["checkpoint=s3", f"checkpoint.uri=s3://{bucket}/{prefix}",
            f"+checkpoint.storage_options.endpoint_url={endpoint}"]


def job_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", "")})
    env.update(extra)
    return env


class Job:
    """One torchrun launch of ``python -m dtrain``."""

    def __init__(self, nproc: int, overrides: list[str], log_path: Path, **env: str):
        self.log_path = log_path
        self._log = log_path.open("w")
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
                   f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={uuid.uuid4().hex[:8]}", "-m", "dtrain",
                   *overrides]
        self.launched = time.time()
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._log, env=job_env(**env),
                                     cwd=REPO, start_new_session=True)
        self.exited: float | None = None

    def running(self) -> bool:
        return self.proc.poll() is None

    def workers(self) -> list[int]:
        """The agent's worker processes, in start order (rank order)."""
        try:
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        except OSError:
            return []
        return sorted(int(pid) for pid in children)

    def sigterm(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def kill_worker(self, index: int) -> None:
        workers = self.workers()
        os.kill(workers[index % len(workers)], signal.SIGKILL)

    def kill_tree(self) -> None:
        """SIGKILL the agent and every descendant (workers live in sessions of their own)."""
        kill_tree(self.proc.pid)

    def wait(self, timeout: float = 180) -> int:
        """The agent's exit code; the whole tree is killed if it does not exit in time."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill_tree()
                self.proc.wait()
                break
            time.sleep(0.01)
        self.exited = time.time()
        self._log.close()
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def teardown_started(self) -> float | None:
        """When torchrun logged that it stops the surviving workers (its own timestamp), if it did."""
        for line in self.log().splitlines():
            match = _TEARDOWN.match(line)
            if match:
                month, day, clock = match.groups()
                year = datetime.datetime.fromtimestamp(self.launched).year
                moment = datetime.datetime.strptime(f"{year}-{month}-{day} {clock}", "%Y-%m-%d %H:%M:%S.%f")
                return moment.timestamp()
        return None


def ledger(run_dir: Path) -> list[dict[str, Any]]:
    """The run's goodput records so far (a line being written is skipped)."""
    path = run_dir / "goodput.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def attempts(records: list[dict[str, Any]]) -> list[str]:
    return [r["attempt"] for r in records if r["event"] == "attempt"]


def steps_of(records: list[dict[str, Any]], attempt: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == "step" and r["attempt"] == attempt]


def wait_until(predicate: Callable[[], bool], job: Job | None, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if job is not None and not job.running():
            raise RuntimeError(f"job exited ({job.proc.returncode}) before {what}:\n{job.log()[-3000:]}")
        if time.monotonic() > deadline:
            if job is not None:
                job.kill_tree()
            raise TimeoutError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.02)
