"""Seconds from a preemption signal to the first completed step of the requeued job.

    python benchmarks/preempt_resume.py --out preempt.json

A 2-rank torchrun job on the CPU default (gpt_tiny, built-in corpus) trains; SIGTERM goes to the
torchrun agent (as Kubernetes or a spot reclaim sends it); the workers agree, save, commit and exit;
the job is relaunched at once with the same run directory and resumes. Reported: signal -> exit,
exit -> first resumed step, and the total (goal <= 15 s). The baseline in the same run is a cold
start of the same job without a checkpoint (launch -> first step), i.e. what the restart costs anyway.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OVERRIDES = ["trainer.max_steps=100000", "trainer.log_every=1", "trainer.eval_every=0", "trainer.sample_tokens=0",
             "logging.progress=lines", "checkpoint.interval_steps=0"]


def launch(run_dir: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=bench", "-m", "dtrain", *OVERRIDES,
               f"run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise RuntimeError(f"job exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            raise TimeoutError("benchmark step timed out")
        time.sleep(0.02)
    return time.monotonic()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--warm-steps", type=int, default=10, help="steps before the signal")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtrain-preempt-") as tmp:
        run_dir = Path(tmp) / "run"
        started = time.monotonic()
        job = launch(run_dir, free_port())
        first_step = wait_for(lambda: len(rows(run_dir)) >= 1, job)
        wait_for(lambda: len(rows(run_dir)) >= args.warm_steps, job)
        cold_start_s = first_step - started

        signalled = time.monotonic()
        os.kill(job.pid, signal.SIGTERM)
        job.wait(timeout=120)
        exited = time.monotonic()
        stderr = job.stderr.read()
        saved_step = max(r["step"] for r in rows(run_dir))

        relaunched = time.monotonic()
        job = launch(run_dir, free_port())
        resumed = wait_for(lambda: any(r["step"] > saved_step for r in rows(run_dir)), job)
        job.send_signal(signal.SIGTERM)  # the workers checkpoint and exit; nothing is left running
        job.wait(timeout=120)

    result = {"benchmark": "preempt_resume", "world_size": 2, "model": "gpt_tiny (CPU default)",
              "signal": "SIGTERM to the torchrun agent", "saved_step": saved_step,
              "worker_exit_lines": [line for line in stderr.splitlines() if "preempted by" in line],
              "signal_to_exit_s": exited - signalled, "exit_to_first_resumed_step_s": resumed - relaunched,
              "signal_to_resumed_training_s": resumed - signalled, "goal": "signal_to_resumed_training_s <= 15",
              "baseline_cold_start_to_first_step_s": cold_start_s,
              "ratio_vs_cold_start": (resumed - relaunched) / cold_start_s}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
