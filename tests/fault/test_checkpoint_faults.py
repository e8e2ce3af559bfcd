"""Real kills and real signals at the worst moments; resume must always come from a committed step.

Failpoints (dtrain/checkpoint/failpoints.py) SIGKILL a chosen rank at a chosen phase of a chosen
save; signals go to the torchrun agent or straight to a worker, as Kubernetes and Slurm send them.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time

import pytest

from dtrain.checkpoint.cli import main as ckpt
from dtrain.checkpoint.manager import committed_steps
from dtrain.checkpoint.storage import Storage
from tests.helpers import (TINY, dtrain_single, finish, read_metrics, start, torchrun, torchrun_args,
                           wait_for_rows, worker_pids)

STEPS = 12
CKPT = ["checkpoint.interval_steps=4", "checkpoint.keep_last=3"]
# Exact-resume checks train with dropout and data-loader worker processes: an RNG stream (or a
# DataLoader seed) that a resume does not restore changes the masks, and with them every later loss.
EXACT = ["model.dropout=0.1", "trainer.data_workers=1"]


def losses(run_dir) -> dict[int, float]:
    """Loss per step; a resumed run appends, and the latest attempt of a step wins."""
    return {row["step"]: row["loss"] for row in read_metrics(run_dir)}


def steps_on_disk(run_dir) -> list[str]:
    return [n for n in Storage(str(run_dir / "checkpoints")).listdir() if n.startswith("step_")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-rank run with checkpoints at 4, 8 and 12."""
    run_dir = tmp_path_factory.mktemp("reference")
    result = torchrun(2, [*TINY, *CKPT, f"trainer.max_steps={STEPS}", f"run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def exact_reference(tmp_path_factory):
    """The same uninterrupted run with dropout and data workers."""
    run_dir = tmp_path_factory.mktemp("exact-reference")
    result = torchrun(2, [*TINY, *EXACT, *CKPT, f"trainer.max_steps={STEPS}", f"run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("failpoint,who", [("mid_shard@*#8", "all ranks, half-way through their shards"),
                                           ("after_shards@0#8", "rank 0, after every shard, before the manifest")])
def test_kill_during_save_then_resume_from_the_last_commit(exact_reference, tmp_path, failpoint, who):
    reference = exact_reference
    overrides = [*TINY, *EXACT, *CKPT, f"trainer.max_steps={STEPS}", f"run.dir={tmp_path}"]
    crashed = torchrun(2, overrides, DTRAIN_FAILPOINT=failpoint)
    assert crashed.returncode != 0 and "dtrain failpoint" in crashed.stderr, who
    # a rank that outlives its killed peer fails its collective and exits by itself: torchrun did not
    # have to SIGKILL it after its 30 s grace (its data workers once held it at interpreter exit)
    assert "Unable to shutdown process" not in crashed.stderr, crashed.stderr[-3000:]
    assert committed_steps(Storage(str(tmp_path / "checkpoints"))) == [4]
    assert "step_00000008" in steps_on_disk(tmp_path)  # debris of the killed save
    assert ckpt(["verify", str(tmp_path / "checkpoints" / "step_00000008")]) == 1
    resumed = torchrun(2, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000004" in resumed.stderr
    assert "before saving step 8: debris of an interrupted save" in resumed.stderr
    assert committed_steps(Storage(str(tmp_path / "checkpoints"))) == [4, 8, 12]
    expected, got = losses(reference), losses(tmp_path)
    assert [got[s] for s in range(5, STEPS + 1)] == [expected[s] for s in range(5, STEPS + 1)]


def test_kill_during_retention_never_loses_the_newest_commit(tmp_path):
    overrides = [*TINY, "checkpoint.interval_steps=4", "checkpoint.keep_last=1", f"run.dir={tmp_path}"]
    crashed = torchrun(2, [*overrides, "trainer.max_steps=16"], DTRAIN_FAILPOINT="mid_retention@0#12")
    assert crashed.returncode != 0
    storage = Storage(str(tmp_path / "checkpoints"))
    assert committed_steps(storage) == [12]  # step 8 lost its manifest first: debris, not a broken commit
    assert "step_00000008" in steps_on_disk(tmp_path)
    resumed = torchrun(2, [*overrides, "trainer.max_steps=16"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000012" in resumed.stderr.split("resumed from", 1)[1].splitlines()[0]
    assert steps_on_disk(tmp_path) == ["step_00000016"]


def test_corrupted_or_truncated_shards_are_refused(reference, tmp_path, capsys):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    shard = tmp_path / "checkpoints" / "step_00000012" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    assert ckpt(["verify", str(tmp_path / "checkpoints")]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "step_00000012" in out and "CRC32C" in out and out.count("OK ") == 2
    overrides = [*TINY, *CKPT, f"run.dir={tmp_path}"]
    explicit = torchrun(2, [*overrides, "trainer.max_steps=14", "checkpoint.resume=12"], timeout=120)
    assert explicit.returncode != 0 and "fails its CRC32C check" in explicit.stderr
    fallback = torchrun(2, [*overrides, "trainer.max_steps=10"])
    assert fallback.returncode == 0, fallback.stderr[-3000:]
    assert "skipping" in fallback.stderr and "step_00000008" in fallback.stderr.split("resumed from", 1)[1]
    # a truncated file is caught by the size check alone, even with checksums switched off
    shard8 = tmp_path / "checkpoints" / "step_00000008" / "__0_0.distcp"
    shard8.write_bytes(shard8.read_bytes()[:-100])
    assert ckpt(["verify", str(tmp_path / "checkpoints" / "step_00000008"), "--sizes-only"]) == 1
    assert "truncated" in capsys.readouterr().out


def test_sigterm_to_torchrun_commits_and_resumes_exactly(tmp_path, tmp_path_factory):
    """Kubernetes/spot: SIGTERM reaches the torchrun agent, which forwards it to the workers."""
    steps = 30
    reference_dir = tmp_path_factory.mktemp("reference30")
    ref = torchrun(2, [*TINY, *EXACT, "checkpoint.interval_steps=0", f"trainer.max_steps={steps}",
                       f"run.dir={reference_dir}"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    overrides = [*TINY, *EXACT, "checkpoint.interval_steps=0", f"trainer.max_steps={steps}", f"run.dir={tmp_path}"]
    proc = start(torchrun_args(2, overrides))
    wait_for_rows(tmp_path, 5, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    result = finish(proc)
    elapsed = time.monotonic() - sent
    print(f"torchrun exit code {result.returncode} {elapsed:.1f} s after SIGTERM")
    assert result.returncode != 0  # torchrun reports its own termination, whatever the workers did
    assert result.stderr.count("preempted by SIGTERM") == 2  # both workers saved and exited cleanly
    committed = committed_steps(Storage(str(tmp_path / "checkpoints")))
    assert len(committed) == 1 and 5 <= committed[0] < steps
    assert elapsed < 30  # inside torchrun's shutdown window
    resumed = torchrun(2, overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = losses(reference_dir), losses(tmp_path)
    assert sorted(got) == list(range(1, steps + 1))
    assert [got[s] for s in range(1, steps + 1)] == [expected[s] for s in range(1, steps + 1)]  # bit-identical


def test_signal_to_one_worker_is_agreed_by_all(tmp_path):
    """Slurm without torchrun forwarding, or a node-local agent: only one rank hears the signal."""
    overrides = [*TINY, "checkpoint.interval_steps=0", "trainer.max_steps=500", f"run.dir={tmp_path}"]
    proc = start(torchrun_args(2, overrides))
    wait_for_rows(tmp_path, 3, proc)
    rank1 = worker_pids(proc.pid)[1]
    import os

    os.kill(rank1, signal.SIGUSR1)
    result = finish(proc)
    assert "received SIGUSR1" in result.stderr
    assert result.stderr.count("checkpoint committed") == 2
    assert "exitcode  : 75" in result.stderr  # the workers' documented preemption code
    assert len(committed_steps(Storage(str(tmp_path / "checkpoints")))) == 1


@pytest.mark.parametrize("world", [1, 4])
def test_resume_on_a_different_world_size(reference, tmp_path, world):
    """Saved by 2 ranks at step 8; resumed by 1 or 4: DCP reshards, the data continues at sample 64."""
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000012")
    overrides = [*TINY, *CKPT, f"trainer.max_steps={STEPS}", f"run.dir={tmp_path}"]
    result = torchrun(world, overrides, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world size changed 2 -> %d" % world in result.stderr and "global sample 64" in result.stderr
    expected, got = losses(reference), losses(tmp_path)
    assert sorted(got) == list(range(9, STEPS + 1))
    for step in range(9, STEPS + 1):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_workers_of_a_killed_launcher_checkpoint_and_exit(tmp_path):
    """SIGKILL to the torchrun agent (OOM killer, node agent): workers must not train on as orphans."""
    import os

    overrides = [*TINY, "checkpoint.interval_steps=0", "trainer.max_steps=100000", f"run.dir={tmp_path}"]
    proc = start(torchrun_args(2, overrides))
    wait_for_rows(tmp_path, 3, proc)
    workers = worker_pids(proc.pid)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while any(os.path.exists(f"/proc/{pid}") and "zombie" not in open(f"/proc/{pid}/status").read().lower()
              for pid in workers):
        assert time.monotonic() < deadline, "orphaned workers still running 60 s after their launcher died"
        time.sleep(0.2)
    assert len(committed_steps(Storage(str(tmp_path / "checkpoints")))) == 1


def test_a_second_job_on_the_same_uri_is_refused_and_the_first_is_unharmed(tmp_path):
    """Two real processes, one checkpoint URI: the second is refused (exit 2, naming the first writer's
    process), writes nothing; the first saves on and commits on SIGTERM; a later run takes over."""
    uri = str(tmp_path / "shared-ckpt")
    common = [*TINY, "strategy=single", "checkpoint.interval_steps=5", f"checkpoint.uri={uri}",
              "checkpoint.grace_period_s=2"]
    first = start([sys.executable, "-m", "dtrain", *common, "trainer.max_steps=100000", f"run.dir={tmp_path / 'a'}"])
    wait_for_rows(tmp_path / "a", 6, first)  # past its first save
    started = time.monotonic()
    second = dtrain_single([*common, "trainer.max_steps=20", f"run.dir={tmp_path / 'b'}"], timeout=60)
    assert second.returncode == 2, second.stderr[-2000:]
    assert time.monotonic() - started < 30
    refusal = [line for line in second.stderr.splitlines() if "being written by another run" in line]
    assert len(refusal) == 1 and f"pid {first.pid}" in refusal[0], second.stderr[-2000:]
    assert not (tmp_path / "b" / "metrics.jsonl").exists()
    first.send_signal(signal.SIGTERM)
    result = finish(first)
    assert result.returncode == 75, result.stderr[-2000:]
    committed = committed_steps(Storage(uri))
    assert committed and committed[-1] >= 6
    third = dtrain_single([*common, f"trainer.max_steps={committed[-1] + 2}", f"run.dir={tmp_path / 'c'}"])
    assert third.returncode == 0, third.stderr[-2000:]
    assert f"step_{committed[-1]:08d}" in third.stderr.split("resumed from", 1)[1].splitlines()[0]
