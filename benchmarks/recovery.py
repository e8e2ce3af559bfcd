"""Seconds from a failure to the first productive step after relaunch, broken into its parts.

    python benchmarks/recovery.py --out benchmarks/results/recovery.json          # 8 cases, ~4 min quiet
    python benchmarks/recovery.py --project benchmarks/results/recovery.json \\
        --assumptions scaling_studies/recovery/assumptions.yaml --out scaling_studies/recovery/projection.json

Cases: local disk and S3 (moto's server on 127.0.0.1) x 2 and 4 ranks x two failures:

- ``kill -9``: SIGKILL of the last rank mid-training (a crashed process). ``detection``: the kill ->
  torchrun logging that it stops the surviving workers (its own timestamp); ``teardown``: -> the
  agent's exit. Work since the last commit is lost (``lost_steps``).
- ``SIGTERM``: to the torchrun agent (a spot reclaim, Kubernetes, Slurm). ``detection`` is 0 (the agent
  forwards the signal at once); ``to_boundary``: training goes on to the step boundary where the ranks
  agree (these steps are kept: not downtime, but they must fit in the grace period); ``save``: the
  blocking preemption save and commit; ``teardown``: -> the agent's exit. Nothing is lost.

Then, at once (a scheduler's own delay is not included), the same job is relaunched: ``relaunch``:
the old agent's exit -> the new worker process started (``launch_to_process_s``: torchrun start,
rendezvous) -> restore begins (``process_to_restore_s``: imports, process group, model build, storage
preflight, writer lease); ``restore``: choosing, verifying and loading the step; ``first_step``: how
much longer the first step after restore took than a typical step before the failure (its warm-up;
the step itself is productive). The parts are read from the goodput ledger the job writes and add up
to ``total_s`` = failure -> end of the first resumed step, minus one typical step; ``downtime_s`` is
``total_s`` without ``to_boundary`` (time not training). The baseline in the same run is the cold start
of each case's first launch (launch -> end of the first step, without a checkpoint);
``ratio_vs_cold_start`` is relaunch + restore + first step over it. gpt_tiny (the CPU default),
checkpoints every 10 steps.

``--project`` instead maps a measured file onto 8/128/1024 GPUs with the stated assumptions
(dtrain.scaling.recovery) and compares with the targets of 30/60/120 s.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jobs

MODEL = ["trainer.max_steps=1000000", "trainer.log_every=1", "trainer.eval_every=0", "trainer.sample_tokens=0",
         "logging.progress=lines", "checkpoint.interval_steps=10"]
FAILURES = ("kill -9", "SIGTERM")


def run_case(storage: str, nproc: int, failure: str, folder: Path, endpoint: str | None, warm_steps: int,
             extra: list[str]) -> dict[str, Any]:
    name = f"{storage}-{nproc}-{failure.replace(' ', '').replace('-', '')}"
    run_dir = folder / name
    overrides = [*MODEL, *extra, f"run.dir={run_dir}"]
    if storage == "s3":
        overrides += jobs.s3_overrides(endpoint, name)
    first = jobs.Job(nproc, overrides, folder / f"{name}-1.log")
    jobs.wait_until(lambda: len(jobs.steps_of(jobs.ledger(run_dir), (jobs.attempts(jobs.ledger(run_dir)) or [""])[0]))
                    >= warm_steps, first, 600, f"{warm_steps} steps")
    records = jobs.ledger(run_dir)
    old = jobs.attempts(records)[0]
    cold_start_s = jobs.steps_of(records, old)[0]["t"] - first.launched

    failed = time.time()
    if failure == "kill -9":
        first.kill_worker(nproc - 1)
    else:
        first.sigterm()
    code = first.wait()
    parts: dict[str, float] = {}
    records = jobs.ledger(run_dir)
    if failure == "kill -9":
        noticed = first.teardown_started() or first.exited
        parts["detection_s"] = max(0.0, noticed - failed)
        parts["teardown_s"] = first.exited - noticed
    else:
        saved = [r for r in records if r["event"] == "checkpoint" and r["attempt"] == old and r["kind"] == "preemption"]
        if not saved:
            raise RuntimeError(f"{name}: no preemption checkpoint recorded:\n{first.log()[-3000:]}")
        parts["detection_s"] = 0.0
        parts["to_boundary_s"] = saved[0]["t"] - saved[0]["seconds"] - failed
        parts["save_s"] = saved[0]["seconds"]
        parts["teardown_s"] = first.exited - saved[0]["t"]
    typical_step = statistics.median(r["seconds"] for r in jobs.steps_of(records, old)[1:])

    second = jobs.Job(nproc, overrides, folder / f"{name}-2.log")

    def resumed() -> bool:
        ids = jobs.attempts(jobs.ledger(run_dir))
        return len(ids) >= 2 and bool(jobs.steps_of(jobs.ledger(run_dir), ids[1]))

    jobs.wait_until(resumed, second, 600, "a step after the relaunch")
    second.sigterm()
    second.wait()
    records = jobs.ledger(run_dir)
    new = jobs.attempts(records)[1]
    attempt = next(r for r in records if r["event"] == "attempt" and r["attempt"] == new)
    first_step = jobs.steps_of(records, new)[0]
    restore_begins = attempt["process_start"] + attempt["startup_s"]
    parts["relaunch_s"] = restore_begins - first.exited
    parts["restore_s"] = attempt["restore_s"]
    parts["first_step_s"] = first_step["t"] - attempt["t"] - typical_step
    total = first_step["t"] - typical_step - failed
    from dtrain.metrics.goodput import summarize

    summary = summarize(records)
    result = {"storage": storage, "ranks": nproc, "failure": failure, "agent_exit_code": code, **parts,
              "launch_to_process_s": attempt["process_start"] - second.launched,
              "process_to_restore_s": attempt["startup_s"],
              "total_s": total, "parts_sum_s": sum(parts.values()),
              "downtime_s": total - parts.get("to_boundary_s", 0.0), "typical_step_s": typical_step,
              "restored_step": attempt["restored_step"],
              "lost_steps": summary.attempts[0].lost_steps, "lost_s": summary.attempts[0].lost_s,
              "cold_start_s": cold_start_s,
              "ratio_vs_cold_start": (parts["relaunch_s"] + parts["restore_s"] + parts["first_step_s"]) / cold_start_s}
    return result


def measure(args: argparse.Namespace) -> dict[str, Any]:
    cases = []
    moto = None
    with tempfile.TemporaryDirectory(prefix="dtrain-recovery-") as tmp:
        try:
            endpoint = None
            if "s3" in args.storage:
                moto, endpoint = jobs.start_moto()
            for storage in args.storage:
                for nproc in args.ranks:
                    for failure in FAILURES:
                        for repeat in range(args.repeats):
                            folder = Path(tmp) / f"r{repeat}"
                            folder.mkdir(exist_ok=True)
                            case = run_case(storage, nproc, failure, folder, endpoint, args.warm_steps, args.override)
                            print(json.dumps(case), flush=True)
                            cases.append(case)
        finally:
            if moto is not None:
                moto.kill()
    summary = {}
    for storage in args.storage:
        for nproc in args.ranks:
            for failure in FAILURES:
                rows = [c for c in cases if (c["storage"], c["ranks"], c["failure"]) == (storage, nproc, failure)]
                summary[f"{storage} {nproc} ranks {failure}"] = {
                    key: statistics.median(r[key] for r in rows)
                    for key in ("detection_s", "to_boundary_s", "save_s", "teardown_s", "relaunch_s", "restore_s",
                                "first_step_s", "total_s", "downtime_s", "cold_start_s", "ratio_vs_cold_start")
                    if key in rows[0]}
    return {"benchmark": "recovery", "model": "gpt_tiny (CPU default), checkpoint every 10 steps",
            "torch": _torch_version(), "cpus": _cpus(), "platform": platform.platform(), "repeats": args.repeats,
            "warm_steps": args.warm_steps, "medians": summary, "cases": cases}


def _torch_version() -> str:
    import torch

    return torch.__version__


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--storage", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--warm-steps", type=int, default=14, help="steps before the failure (a commit at 10)")
    parser.add_argument("--override", nargs="*", default=[], help="extra dtrain overrides (e.g. a smaller model)")
    parser.add_argument("--project", metavar="MEASURED.json", help="project this measured file instead of measuring")
    parser.add_argument("--assumptions", default=str(jobs.REPO / "scaling_studies/recovery/assumptions.yaml"))
    args = parser.parse_args()
    if args.project:
        from dtrain.scaling.recovery import project_file

        result = project_file(Path(args.project), Path(args.assumptions))
    else:
        result = measure(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result.get("medians", result.get("table", {})), indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
