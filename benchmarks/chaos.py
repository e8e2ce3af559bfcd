"""Chaos soak: N random kill -9 / SIGTERM events on a 2-rank run, each followed by a relaunch.

    python benchmarks/chaos.py --kills 200 --out benchmarks/results/chaos.json   # ~24 min on 2 quiet cores

Runs go from step 0 to ``--max-steps`` (checkpoints every ``--interval``, keep 2, dropout on so any
RNG stream a resume failed to restore would show), alternating local disk and S3 (moto's server on
127.0.0.1); each launch gets at most one event, drawn at random:

- timed: SIGKILL of one random rank, SIGKILL of the whole process tree, or SIGTERM to the torchrun agent,
  after a random number of steps plus a random fraction of a step (so some land inside saves and
  retention); a SIGKILL at a random moment of start-up or restore; SIGTERM followed by a SIGKILL inside
  the preemption save (a grace period too short);
- failpoints (dtrain/checkpoint/failpoints.py, a real SIGKILL at an exact place): half-way through the
  shards of a coming save (one rank or all), after every shard but before the manifest, in the middle
  of retention, and during a restore after verification;
- besides the N kills, now and then a byte of the newest committed shard is flipped between launches
  (bit rot), which the next restore must refuse.

An event that never happened (the run finished first, the failpoint's save never came) is not
counted. When a run reaches its last step, its final weights must equal, bit for bit, those of an
uninterrupted run with the same seed (``final_weights_equal``), and so must the latest logged loss of every
step (``losses_equal``; a kill between a commit and the step's metrics line leaves a step without one),
and every restore the goodput ledger recorded must name a
step and manifest CRC32C that a commit record announced before it (``restores_were_committed``: a
commit record is written just before its manifest, and a restore records the manifest it verified
every file against) and never a step the harness had corrupted (``never_loaded_corrupt``). Reported:
every event (kind, whether it hit, seconds from the failure to the next productive step), steps and
seconds lost (the goodput ledger's classification), and per run the goodput breakdown. Exit code 1 if
any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jobs

MODEL = ["model=gpt_tiny", "model.n_layer=2", "model.d_model=64", "model.dropout=0.1", "data.seq_len=32",
         "data.max_bytes=400000", "trainer.global_batch_size=8", "trainer.micro_batch_size=2", "trainer.eval_every=0",
         "trainer.sample_tokens=0", "trainer.log_every=1", "logging.progress=lines", "checkpoint.keep_last=2",
         "checkpoint.grace_period_s=20", "checkpoint.lease_ttl_s=20"]
TIMED = ("kill -9 one rank", "kill -9 the job", "SIGTERM", "SIGTERM then kill -9 in the save", "kill -9 in start-up")
FAILPOINTS = ("mid_shard one rank", "mid_shard every rank", "after_shards", "mid_retention", "mid_restore")
WEIGHTS = {"kill -9 one rank": 3, "kill -9 the job": 2, "SIGTERM": 2, "SIGTERM then kill -9 in the save": 1,
           "kill -9 in start-up": 1, "mid_shard one rank": 1, "mid_shard every rank": 1, "after_shards": 1,
           "mid_retention": 1, "mid_restore": 1}


def losses(run_dir: Path) -> dict[int, float]:
    """The latest loss of every step (a re-done step overwrites the attempt that was lost)."""
    found = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_bytes().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill
        found[row["step"]] = row["loss"]
    return found


class Run:
    """One run from step 0 to the last step, on one storage, through as many launches as it takes."""

    def __init__(self, index: int, storage: str, folder: Path, endpoint: str | None, max_steps: int, interval: int):
        self.index, self.storage, self.max_steps, self.interval = index, storage, max_steps, interval
        self.dir = folder / f"run{index:03d}-{storage}"
        self.overrides = [*MODEL, f"trainer.max_steps={max_steps}", f"checkpoint.interval_steps={interval}",
                          f"run.dir={self.dir}"]
        self.options: dict[str, Any] = {}
        self.uri = str(self.dir / "checkpoints")
        if storage == "s3":
            extra = jobs.s3_overrides(endpoint, f"run{index:03d}")
            self.overrides += extra
            self.uri, self.options = extra[1].split("=", 1)[1], {"endpoint_url": endpoint}
        self.launches = 0
        self.corrupted: dict[tuple[int, str], float] = {}  # (step, manifest CRC32C) the harness damaged -> when

    def store(self):
        from dtrain.checkpoint.storage import Storage

        return Storage(self.uri, self.options)

    def newest_committed(self) -> int | None:
        from dtrain.checkpoint.manager import step_manifests

        usable = [s for s, m in step_manifests(self.store()).items()
                  if m is not None and (s, _manifest_crc(m)) not in self.corrupted]
        return usable[-1] if usable else None

    def finished(self) -> bool:
        records = jobs.ledger(self.dir)
        ends = [r for r in records if r["event"] == "end"]
        return bool(ends) and ends[-1]["reason"] == "done" and ends[-1]["step"] == self.max_steps

    def corrupt_newest(self) -> dict[str, Any] | None:
        """Flip one byte in the middle of a shard of the newest committed step."""
        from dtrain.checkpoint.manager import step_manifests
        from dtrain.checkpoint.manifest import step_dir

        storage = self.store()
        committed = [(s, m) for s, m in step_manifests(storage).items() if m is not None]
        if not committed:
            return None
        step, manifest = committed[-1]
        shard = next(f["path"] for f in manifest.files if f["path"].endswith(".distcp"))
        path = f"{step_dir(step)}/{shard}"
        data = bytearray(storage.read_bytes(path))
        data[len(data) // 2] ^= 0x40
        storage.write_bytes(path, bytes(data))
        self.corrupted[(step, _manifest_crc(manifest))] = time.time()
        return {"kind": "corrupt a shard", "run": self.index, "step": step, "file": shard}


def _manifest_crc(manifest: Any) -> str:
    from dtrain.checkpoint.dcp_io import crc32c_hex

    return crc32c_hex(manifest.to_json())


def plan_event(rng: random.Random, run: Run) -> tuple[str, dict[str, str], int | None]:
    """(kind, environment for the launch, the step a failpoint targets)."""
    newest = run.newest_committed()
    kinds = [k for k in WEIGHTS if not (k == "mid_restore" and newest is None)]
    kind = rng.choices(kinds, weights=[WEIGHTS[k] for k in kinds])[0]
    if kind not in FAILPOINTS:
        return kind, {}, None
    start = newest or 0
    if kind == "mid_restore":
        return kind, {"DTRAIN_FAILPOINT": f"mid_restore@*#{start}"}, start
    saves = [s for s in range(start + 1, run.max_steps + 1) if s % run.interval == 0 or s == run.max_steps]
    if kind == "mid_retention":
        saves = [s for s in saves if s >= 3 * run.interval]  # keep_last=2: the third commit deletes one
    if not saves:
        return "kill -9 one rank", {}, None
    step = rng.choice(saves[:2])
    spec = {"mid_shard one rank": f"mid_shard@{rng.randint(0, 1)}#{step}",
            "mid_shard every rank": f"mid_shard@*#{step}", "after_shards": f"after_shards@0#{step}",
            "mid_retention": f"mid_retention@0#{step}"}[kind]
    return kind, {"DTRAIN_FAILPOINT": spec}, step


def launch_with_event(rng: random.Random, run: Run, folder: Path) -> dict[str, Any]:
    """One launch with one event; returns what happened."""
    kind, env, target = plan_event(rng, run)
    run.launches += 1
    job = jobs.Job(2, run.overrides, folder / f"{run.dir.name}-{run.launches:03d}.log", **env)
    before = len(jobs.attempts(jobs.ledger(run.dir)))
    event: dict[str, Any] = {"kind": kind, "run": run.index, "storage": run.storage, "launch": run.launches,
                             "failpoint": env.get("DTRAIN_FAILPOINT"), "hit": False}

    def my_steps() -> list[dict[str, Any]]:
        records = jobs.ledger(run.dir)
        ids = jobs.attempts(records)
        return jobs.steps_of(records, ids[-1]) if len(ids) > before else []

    failed_at = None
    if kind == "kill -9 in start-up":
        time.sleep(rng.uniform(0.5, 8.0))
        if job.running() and not my_steps():
            failed_at = time.time()
            job.kill_tree()
    elif kind in TIMED:
        want = rng.randint(1, 2 * run.interval)
        deadline = time.monotonic() + 600
        while job.running() and len(my_steps()) < want and time.monotonic() < deadline:
            time.sleep(0.01)
        steps = my_steps()
        if job.running() and steps:
            time.sleep(rng.uniform(0, 1) * statistics.median(s["seconds"] for s in steps))
        if job.running():
            failed_at = time.time()
            if kind == "kill -9 one rank":
                job.kill_worker(rng.randint(0, 1))
            elif kind == "kill -9 the job":
                job.kill_tree()
            else:
                job.sigterm()
                if kind == "SIGTERM then kill -9 in the save":
                    typical = statistics.median(s["seconds"] for s in steps) if steps else 0.1
                    time.sleep(rng.uniform(0, 1.5) * typical)
                    job.kill_tree()
    code = job.wait(timeout=600)
    if kind in FAILPOINTS:
        if "dtrain failpoint" in job.log():
            event["hit"], failed_at = True, _failpoint_time(job, run)
    elif failed_at is not None:
        event["hit"] = True
    event.update({"exit_code": code, "failed_at": failed_at, "target_step": target,
                  "finished": run.finished(), "log": str(job.log_path)})
    if event["hit"]:
        event["phase"] = phase_of(event, run, job.launched)
    if not event["hit"] and not event["finished"]:
        event["unexpected_exit"] = job.log()[-2000:]
    return event


def _failpoint_time(job: jobs.Job, run: Run) -> float:
    """A failpoint kills without a timestamp: the job's last ledger record is the closest we have."""
    records = [r for r in jobs.ledger(run.dir) if r["t"] >= job.launched]
    return max([r["t"] for r in records], default=job.launched)


def final_weights(run: Run) -> dict[str, Any]:
    from dtrain.checkpoint.cli import load_model_weights
    from dtrain.checkpoint.manifest import step_dir

    return load_model_weights(run.store(), step_dir(run.max_steps))


def final_weights_equal(run: Run, reference_run: Run) -> bool:
    import torch

    mine, theirs = final_weights(run), final_weights(reference_run)
    return mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def check_run(run: Run, reference_run: Run, reference: dict[int, float]) -> dict[str, Any]:
    from dtrain.metrics.goodput import read_ledger, summarize

    records = read_ledger(run.dir)
    summary = summarize(records)
    restarts = sum(a.startup_s + a.restore_s for a in summary.attempts[1:])
    commits_seen: set[tuple[int, str]] = set()
    restores_ok, never_corrupt = True, True
    for record in records:
        if record["event"] == "commit":
            commits_seen.add((record["step"], record["manifest_crc32c"]))
        elif record["event"] == "attempt" and record.get("restored_step") is not None:
            key = (record["restored_step"], record["manifest_crc32c"])
            restores_ok &= key in commits_seen
            never_corrupt &= not (key in run.corrupted and record["process_start"] > run.corrupted[key])
    got = losses(run.dir)
    # a kill after a commit but before the step's metrics line leaves that step without a logged loss: every
    # loss that was logged must match, and the final weights must, bit for bit
    logged = sorted(s for s in got if s <= run.max_steps)
    return {"run": run.index, "storage": run.storage, "launches": run.launches,
            "losses_equal": bool(logged) and [got[s] for s in logged] == [reference[s] for s in logged],
            "losses_compared": len(logged), "final_weights_equal": final_weights_equal(run, reference_run),
            "restores_were_committed": restores_ok, "never_loaded_corrupt": never_corrupt,
            "restores": len(summary.restores), "refused_corrupt_steps": _refusals(run),
            "lost_steps": summary.lost_steps, "goodput": summary.goodput, "seconds": summary.seconds,
            # re-done work, time between attempts, and the start-up and restore of every relaunch
            "time_lost_s": summary.seconds["lost"] + summary.seconds["between_attempts"] + restarts,
            "final_loss": got.get(run.max_steps), "reference_final_loss": reference[run.max_steps]}


def _refusals(run: Run) -> int:
    """Restores that skipped a committed step because a file failed its checksum (rank 0 logs each once)."""
    return sum(1 for path in run.dir.parent.glob(f"{run.dir.name}-*.log")
               for line in path.read_text(errors="replace").splitlines()
               if "[rank0] WARNING" in line and "skipping" in line and "CRC32C" in line)


def recovery_times(events: list[dict[str, Any]], runs: dict[int, Run]) -> None:
    """For every event that hit: seconds from the failure to the first step of a later attempt (a process
    started after the failure; the steps a SIGTERMed job still runs before its save do not count)."""
    for event in events:
        if not event["hit"] or event["failed_at"] is None:
            continue
        run = runs[event["run"]]
        records = jobs.ledger(run.dir)
        later = [r for r in records if r["event"] == "attempt" and r["process_start"] > event["failed_at"]]
        ids = {r["attempt"] for r in later}
        # an attempt that restored the last step has nothing left to do: it recovered when its loop began
        done = [r["t"] for r in later if r["step"] == run.max_steps]
        steps = [r["t"] for r in records if r["event"] == "step" and r["attempt"] in ids] + done
        event["recovery_s"] = min(steps) - event["failed_at"] if steps else None


PHASES = {"mid_shard one rank": "save", "mid_shard every rank": "save", "after_shards": "save (before the manifest)",
          "mid_retention": "retention", "mid_restore": "restore"}


def phase_of(event: dict[str, Any], run: Run, launched: float) -> str:
    """Where the failure landed: a failpoint knows; a timed kill is placed by the job's ledger."""
    if event["kind"] in PHASES:
        return PHASES[event["kind"]]
    if event["kind"] == "SIGTERM then kill -9 in the save":
        return "preemption save"
    records = [r for r in jobs.ledger(run.dir) if launched <= r["t"] <= event["failed_at"]]
    if not any(r["event"] == "attempt" for r in records):
        return "start-up or restore"
    last = records[-1]
    saved = {r["step"] for r in records if r["event"] == "checkpoint"}
    if last["event"] == "step" and (last["step"] % run.interval == 0 or last["step"] == run.max_steps) \
            and last["step"] not in saved:
        return "save"
    return "step"


def soak(args: argparse.Namespace, folder: Path, endpoint: str | None) -> dict[str, Any]:
    rng = random.Random(args.seed)
    reference_run = Run(0, "local", folder, None, args.max_steps, args.interval)
    job = jobs.Job(2, reference_run.overrides, folder / "reference.log")
    if job.wait(timeout=900) != 0:
        raise RuntimeError(f"the uninterrupted reference run failed:\n{job.log()[-3000:]}")
    reference = losses(reference_run.dir)
    events: list[dict[str, Any]] = []
    runs: dict[int, Run] = {}
    checks: list[dict[str, Any]] = []
    kills, index = 0, 0
    started = time.monotonic()
    while kills < args.kills:
        index += 1
        run = runs[index] = Run(index, args.storage[(index - 1) % len(args.storage)], folder, endpoint,
                                args.max_steps, args.interval)
        while not run.finished():
            if kills < args.kills and run.launches and rng.random() < args.corrupt_rate:
                damage = run.corrupt_newest()
                if damage:
                    events.append({**damage, "hit": True, "failed_at": None, "counted": False})
            if kills >= args.kills:  # the budget is spent: finish this run without events
                job = jobs.Job(2, run.overrides, folder / f"{run.dir.name}-final.log")
                job.wait(timeout=900)
                if not run.finished():
                    raise RuntimeError(f"run {index} did not finish after the last event:\n{job.log()[-3000:]}")
                break
            event = launch_with_event(rng, run, folder)
            event["counted"] = event["hit"]
            kills += event["hit"]
            events.append(event)
            print(json.dumps({k: event[k] for k in ("kind", "run", "storage", "hit", "finished")}), flush=True)
            if run.launches > 4 * args.max_steps:
                raise RuntimeError(f"run {index} makes no progress after {run.launches} launches")
        checks.append(check_run(run, reference_run, reference))
        print(json.dumps({k: checks[-1][k] for k in ("run", "losses_equal", "final_weights_equal",
                                                     "restores_were_committed", "never_loaded_corrupt",
                                                     "lost_steps")}), flush=True)
    recovery_times(events, runs)
    hit = [e for e in events if e.get("counted")]
    unexpected = [e for e in events if "unexpected_exit" in e]
    for event in unexpected:
        print(f"unexpected exit at launch {event['launch']} of run {event['run']} ({event['kind']}):\n"
              f"{event['unexpected_exit']}", file=sys.stderr)
    names = ("losses_equal", "final_weights_equal", "restores_were_committed", "never_loaded_corrupt")
    ok = not unexpected and all(c[name] for c in checks for name in names)
    by_kind = {kind: sum(1 for e in hit if e["kind"] == kind) for kind in WEIGHTS}
    by_phase: dict[str, int] = {}
    for event in hit:
        by_phase[event["phase"]] = by_phase.get(event["phase"], 0) + 1
    recoveries = [e["recovery_s"] for e in hit if e.get("recovery_s") is not None]
    return {"benchmark": "chaos", "kills": len(hit), "events_by_kind": by_kind, "events_by_phase": by_phase,
            "corruptions": sum(1 for e in events if e["kind"] == "corrupt a shard"),
            "corrupt_steps_refused": sum(c["refused_corrupt_steps"] for c in checks),
            "missed_events": sum(1 for e in events if not e["hit"]), "runs": len(checks),
            "recoveries": len(recoveries), "recovery_s_median": statistics.median(recoveries) if recoveries else None,
            "recovery_s_max": max(recoveries, default=None),
            "steps_lost": sum(c["lost_steps"] for c in checks),
            "time_lost_s": sum(c["time_lost_s"] for c in checks),
            "unexpected_exits": sum(1 for e in events if "unexpected_exit" in e),
            "checks": {name: all(c[name] for c in checks) for name in names},
            "ok": ok, "wall_s": time.monotonic() - started, "torch": _torch_version(),
            "cpus": len(os.sched_getaffinity(0)), "seed": args.seed, "max_steps": args.max_steps,
            "interval": args.interval, "storage": args.storage, "per_run": checks,
            "events": [{k: v for k, v in e.items() if k != "unexpected_exit"} for e in events]}


def _torch_version() -> str:
    import torch

    return torch.__version__


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, required=True, help="kill -9 / SIGTERM events that must happen")
    parser.add_argument("--out", required=True)
    parser.add_argument("--storage", nargs="+", default=["local", "s3"], choices=["local", "s3"])
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--corrupt-rate", type=float, default=0.1, help="chance of bit rot before a launch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", metavar="DIR", help="keep run folders and logs here (default: a temporary folder)")
    args = parser.parse_args()
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"})
    moto = None
    with tempfile.TemporaryDirectory(prefix="dtrain-chaos-") as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            endpoint = None
            if "s3" in args.storage:
                moto, endpoint = jobs.start_moto()
            result = soak(args, folder, endpoint)
        finally:
            if moto is not None:
                moto.kill()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("per_run", "events")}, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
