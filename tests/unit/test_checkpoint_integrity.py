"""Checkpoint integrity in one process: what a save may skip or replace, what retention may count,
what is fsynced before a commit, and the one-writer lease."""

from __future__ import annotations

import json
import os
import time

import pytest

from dtrain.checkpoint.lease import LEASES, WriterInfo, WriterLease
from dtrain.checkpoint.manager import step_manifests
from dtrain.checkpoint.manifest import read_manifest, verify_files
from dtrain.checkpoint.storage import Storage
from dtrain.config.errors import ConfigError

SMALL = ["strategy=single", "model.n_layer=1", "model.d_model=32", "data.seq_len=16", "data.max_bytes=200000",
         "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.eval_every=0",
         "trainer.sample_tokens=0", "trainer.log_every=1", "logging.progress=off"]


def train(run_dir, steps: int, *extra: str) -> int:
    from dtrain.cli import run

    return run([*SMALL, f"trainer.max_steps={steps}", f"run.dir={run_dir}", *extra])


def corrupt(run_dir, step: int) -> None:
    shard = run_dir / "checkpoints" / f"step_{step:08d}" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


def valid(storage: Storage, step: int) -> bool:
    name = f"step_{step:08d}"
    return verify_files(storage, name, read_manifest(storage, name).files, checksums=True) == []


def test_a_corrupt_step_skipped_at_resume_is_saved_afresh_when_reached_again(tmp_path, capsys):
    assert train(tmp_path, 6, "checkpoint.interval_steps=2", "checkpoint.keep_last=2") == 0
    corrupt(tmp_path, 6)
    storage = Storage(str(tmp_path / "checkpoints"))
    assert not valid(storage, 6)
    assert train(tmp_path, 8, "checkpoint.interval_steps=2", "checkpoint.keep_last=2") == 0
    err = capsys.readouterr().err
    assert "skipping" in err and "fails its CRC32C check" in err
    assert "before saving step 6: it failed verification when this run resumed" in err
    assert valid(storage, 6) and valid(storage, 8)  # a fresh, valid step 6 replaced the corrupt one
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8]  # resumed from 4


def test_retention_never_counts_a_corrupt_step(tmp_path):
    assert train(tmp_path, 6, "checkpoint.interval_steps=2", "checkpoint.keep_last=2") == 0
    corrupt(tmp_path, 6)
    # resumes from 4; saves 8 and 9 only, so the corrupt 6 is never replaced
    assert train(tmp_path, 9, "checkpoint.interval_steps=4", "checkpoint.keep_last=2") == 0
    storage = Storage(str(tmp_path / "checkpoints"))
    found = step_manifests(storage)
    assert sorted(found) == [6, 8, 9]  # 4 went only once two valid newer steps existed
    assert valid(storage, 8) and valid(storage, 9) and not valid(storage, 6)


def test_retention_leaves_steps_of_another_lineage_alone(tmp_path):
    import shutil

    assert train(tmp_path / "a", 2, "checkpoint.interval_steps=1", "checkpoint.keep_last=1") == 0
    assert train(tmp_path / "b", 4, "checkpoint.interval_steps=1", "checkpoint.keep_last=1") == 0
    # someone copies run a's step 2 into run b's folder: another run's checkpoint, not b's to delete
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_00000002", tmp_path / "b" / "checkpoints" / "step_00000002")
    assert train(tmp_path / "b", 6, "checkpoint.interval_steps=1", "checkpoint.keep_last=1") == 0
    found = step_manifests(Storage(str(tmp_path / "b" / "checkpoints")))
    assert sorted(found) == [2, 6]  # b resumed from its own 4, then kept only its newest; a's step stayed
    assert found[2].lineage != found[6].lineage


def test_every_small_file_and_directory_entry_is_fsynced_before_the_commit(tmp_path, monkeypatch):
    synced: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    assert train(tmp_path, 1, "checkpoint.interval_steps=1") == 0
    root = str(tmp_path / "checkpoints")
    step = f"{root}/step_00000001"
    manifest = synced.index(f"{step}/manifest.json")
    before = set(synced[:manifest])
    for path in (f"{step}/trainer_state.json", f"{step}/config.yaml", f"{step}/rng/rank_00000.pt",
                 f"{step}/__0_0.distcp", f"{step}/rng", step, root):
        assert path in before, f"{path} was not fsynced before the manifest: {synced}"
    assert step in synced[manifest + 1:]  # the manifest's own directory entry, after it


def lease(storage: Storage, job: str | None, writer: str, pid: int = 1, host: str = "elsewhere",
          renewed: float | None = None, attempt: int = 0, wait_s: float = 0.3) -> WriterLease:
    now = time.time()
    me = WriterInfo(writer=writer, job=job, attempt=attempt, host=host, pid=pid, started_unix=now,
                    renewed_unix=renewed if renewed is not None else now)
    return WriterLease(storage, me, ttl_s=60, wait_s=wait_s)


def test_a_second_live_writer_is_refused_naming_the_first(tmp_path):
    storage = Storage(str(tmp_path))
    first = lease(storage, "slurm-1", "aaaa", pid=4242, host="node-1")
    first.acquire()
    try:
        with pytest.raises(ConfigError) as refused:
            lease(storage, "slurm-2", "bbbb").acquire()
        message = str(refused.value)
        assert "being written by another run" in message and "aaaa" in message and "slurm-1" in message
        assert "node-1 pid 4242" in message
        assert storage.listdir(LEASES) == ["aaaa.json"]  # the refused writer left nothing behind
    finally:
        first.release()
    second = lease(storage, "slurm-2", "bbbb")
    second.acquire()  # once the first released it
    second.release()


@pytest.mark.parametrize("why,previous", [
    ("an earlier attempt of the same job", dict(job="slurm-7", attempt=0)),
    ("a lease not renewed for longer than the ttl", dict(job="slurm-1", renewed=time.time() - 600)),
    ("a process on this host that is gone", dict(job=None, host=os.uname().nodename, pid=2**22 + 17)),
])
def test_a_dead_predecessors_lease_is_taken_over_at_once(tmp_path, why, previous):
    storage = Storage(str(tmp_path))
    storage.write_bytes(f"{LEASES}/old.json", json.dumps({
        "writer": "old", "job": previous.get("job"), "attempt": previous.get("attempt", 0),
        "host": previous.get("host", "elsewhere"), "pid": previous.get("pid", 1), "started_unix": 0,
        "renewed_unix": previous.get("renewed", time.time())}).encode())
    start = time.monotonic()
    me = lease(storage, "slurm-7", "new", attempt=1, host=os.uname().nodename, pid=os.getpid(), wait_s=30)
    me.acquire()
    try:
        assert time.monotonic() - start < 5, why
        assert storage.listdir(LEASES) == ["new.json"], why
    finally:
        me.release()


def test_a_writer_that_appears_during_the_run_stops_the_next_save(tmp_path, capsys):
    """A lease planted mid-run (another job that started anyway): the save refuses, nothing is deleted."""
    from dtrain.checkpoint import lease as lease_module

    storage = Storage(str(tmp_path / "checkpoints"))
    real_check = lease_module.WriterLease.check

    def plant_then_check(self):
        if not storage.exists(f"{LEASES}/intruder.json"):
            intruder = lease(storage, "k8s-other", "intruder").me
            storage.write_bytes(f"{LEASES}/intruder.json", json.dumps(intruder.__dict__).encode())
        real_check(self)

    import unittest.mock

    with unittest.mock.patch.object(lease_module.WriterLease, "check", plant_then_check):
        assert train(tmp_path, 3, "checkpoint.interval_steps=1") == 2
    assert "another run started writing checkpoint.uri" in capsys.readouterr().err
    assert not [n for n in storage.listdir() if n.startswith("step_")]
