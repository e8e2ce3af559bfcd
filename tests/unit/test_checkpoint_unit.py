"""Checkpoint building blocks in one process: manifest safety, verification, storage errors, save/restore."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dtrain.checkpoint.manifest import Manifest, ManifestError, check_relative_path, read_manifest, verify_files
from dtrain.checkpoint.storage import Storage, StorageError, redact
from dtrain.config.compose import redact_override, redacted_yaml
from dtrain.config.validate import load_config


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside", "a/../../b", "a\\b", "C:/x", "", "./x", "a//b"])
def test_manifest_paths_cannot_leave_the_step_folder(path):
    with pytest.raises(ManifestError, match="unsafe path"):
        check_relative_path(path, "s3://b/step_00000001")


def test_manifest_round_trip_and_unreadable_manifest(tmp_path):
    storage = Storage(str(tmp_path))
    manifest = Manifest(step=7, world_size=2, strategy="ddp", config_hash="abc",
                        files=[{"path": "rng/rank_00000.pt", "size": 3, "crc32c": "x"}])
    storage.write_bytes("step_00000007/manifest.json", manifest.to_json())
    assert read_manifest(storage, "step_00000007") == manifest
    storage.write_bytes("step_00000008/manifest.json", manifest.to_json()[:20])  # torn write
    with pytest.raises(ManifestError, match="unreadable"):
        read_manifest(storage, "step_00000008")
    storage.write_bytes("step_00000009/manifest.json", manifest.to_json())  # copied into the wrong folder
    with pytest.raises(ManifestError, match="describes step 7"):
        read_manifest(storage, "step_00000009")
    with pytest.raises(ManifestError, match="never committed"):
        read_manifest(storage, "step_00000010")


def test_verification_finds_truncation_and_flipped_bytes(tmp_path):
    from dtrain.checkpoint.dcp_io import crc32c_hex

    storage = Storage(str(tmp_path))
    data = os.urandom(5000)
    storage.write_bytes("step_00000001/shard", data)
    entry = {"path": "shard", "size": len(data), "crc32c": crc32c_hex(data)}
    assert verify_files(storage, "step_00000001", [entry], checksums=True) == []
    flipped = bytearray(data)
    flipped[1234] ^= 0x01
    storage.write_bytes("step_00000001/shard", bytes(flipped))
    assert verify_files(storage, "step_00000001", [entry], checksums=False) == []  # same size
    assert "CRC32C" in verify_files(storage, "step_00000001", [entry], checksums=True)[0]
    storage.write_bytes("step_00000001/shard", data[:4000])
    assert "truncated" in verify_files(storage, "step_00000001", [entry], checksums=False)[0]
    storage.remove("step_00000001/shard")
    assert "missing" in verify_files(storage, "step_00000001", [entry], checksums=False)[0]


def test_storage_errors_say_what_to_install_or_fix(tmp_path, monkeypatch):
    import sys

    import importlib

    registry = importlib.import_module("fsspec.registry")._registry
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as on a machine without the gcs extra ...
    for scheme in ("gs", "gcs"):  # ... where fsspec has not cached the class from an earlier import
        monkeypatch.delitem(registry, scheme, raising=False)
    with pytest.raises(StorageError, match=r"pip install 'dtrain\[gcs\]'"):
        Storage("gs://bucket/run")
    with pytest.raises(StorageError, match="install the fsspec backend for hdfs://"):
        Storage("hdfs://namenode/run")
    with pytest.raises(StorageError, match="unknown protocol nosuchscheme://"):
        Storage("nosuchscheme://x")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match="not usable"):
        Storage(str(blocker / "sub")).preflight()
    assert Storage(str(tmp_path / "new")).preflight() > 0
    assert not [p for p in (tmp_path / "new").iterdir()]  # the probe cleans up after itself


def test_credentials_are_never_written():
    assert redact({"key": "AKIA", "secret": "s3cr3t", "endpoint_url": "http://x"}) == {
        "key": "***", "secret": "***", "endpoint_url": "http://x"}
    assert redact_override("checkpoint.storage_options.secret=abc") == "checkpoint.storage_options.secret=***"
    assert redact_override("trainer.max_steps=3") == "trainer.max_steps=3"
    cfg = load_config(["run.name=t", "+checkpoint.storage_options.secret=s3cr3t",
                       "+checkpoint.storage_options.endpoint_url=http://127.0.0.1:1"], 1)
    text = redacted_yaml(cfg)
    assert "s3cr3t" not in text and "http://127.0.0.1:1" in text


def _train(tmp_path, steps: int, extra: list[str] = (), **env) -> int:
    from dtrain.cli import run

    return run(["strategy=single", "model.n_layer=1", "model.d_model=32", "data.seq_len=16", "data.max_bytes=200000",
                "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.eval_every=0",
                "trainer.sample_tokens=0", "trainer.log_every=1", "logging.progress=off",
                f"trainer.max_steps={steps}", f"run.dir={tmp_path}", *extra])


def test_save_retention_and_resume_in_one_process(tmp_path):
    assert _train(tmp_path, 9, ["checkpoint.interval_steps=3", "checkpoint.keep_last=2"]) == 0
    storage = Storage(str(tmp_path / "checkpoints"))
    assert [n for n in storage.listdir() if n.startswith("step_")] == ["step_00000006", "step_00000009"]
    manifest = read_manifest(storage, "step_00000009")
    names = {f["path"] for f in manifest.files}
    assert {".metadata", "__0_0.distcp", "trainer_state.json", "config.yaml", "rng/rank_00000.pt"} <= names
    assert verify_files(storage, "step_00000009", manifest.files, checksums=True) == []
    state = json.loads(storage.read_bytes("step_00000009/trainer_state.json"))
    assert state["step"] == 9 and state["loader"]["next_sample"] == 9 * 4
    # more steps on top: resumes at 9, not 0
    assert _train(tmp_path, 12, ["checkpoint.interval_steps=3"]) == 0
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10)) + [10, 11, 12]


def test_memory_storage_uses_the_same_code_path(tmp_path):
    uri = f"memory://dtrain-test-{os.getpid()}"
    assert _train(tmp_path, 4, [f"checkpoint.uri={uri}", "checkpoint.interval_steps=2"]) == 0
    storage = Storage(uri)
    assert verify_files(storage, "step_00000004", read_manifest(storage, "step_00000004").files, True) == []


def test_resume_refuses_another_model_and_never_overwrites(tmp_path, capsys):
    assert _train(tmp_path, 3) == 0
    assert _train(tmp_path, 5, ["model.d_model=64"]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint was written for another model: model.d_model=32 (now 64)" in err
    assert _train(tmp_path, 5, ["checkpoint.resume=never"]) == 2
    assert "already holds committed steps [3]" in capsys.readouterr().err
    assert _train(tmp_path, 5, ["checkpoint.resume=2"]) == 2
    assert "no committed step 2" in capsys.readouterr().err
    storage = Storage(str(tmp_path / "checkpoints"))
    assert [n for n in storage.listdir() if n != "_writers"] == ["step_00000003"]  # untouched
    assert storage.listdir("_writers") == []  # every run released its writer lease


def test_async_thread_save_commits_and_reports_blocked_time(tmp_path):
    assert _train(tmp_path, 6, ["checkpoint.interval_steps=2", "checkpoint.async_mode=thread"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "ckpt_blocked_s" in r] == [2, 4, 6]
    storage = Storage(str(tmp_path / "checkpoints"))
    for name in ("step_00000004", "step_00000006"):
        assert verify_files(storage, name, read_manifest(storage, name).files, True) == []


def test_export_consolidates_weights(tmp_path):
    from safetensors.torch import load_file

    from dtrain.checkpoint.cli import main as ckpt

    assert _train(tmp_path, 2) == 0
    out = tmp_path / "model.safetensors"
    assert ckpt(["export", str(tmp_path / "checkpoints" / "step_00000002"), str(out)]) == 0
    weights = load_file(str(out))
    assert weights["wte.weight"].shape == (256, 32)
    assert ckpt(["export", str(tmp_path / "checkpoints" / "step_00000002"), str(tmp_path / "m.pt")]) == 0
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    assert torch.equal(saved["model"]["wte.weight"], weights["wte.weight"])


def test_warns_when_a_save_cannot_fit_the_grace_period(tmp_path, capsys):
    assert _train(tmp_path, 2, ["checkpoint.grace_period_s=0.0001"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "grace_period_s" in line]
    assert len(warnings) == 1 and "estimated from" in warnings[0]  # at start-up, from the probe's bandwidth


def test_inspect_shows_the_config_diff(tmp_path, capsys):
    from dtrain.checkpoint.cli import main as ckpt

    assert _train(tmp_path, 2) == 0
    step = str(tmp_path / "checkpoints" / "step_00000002")
    assert ckpt(["inspect", step, "strategy=single", "model.n_layer=1", "model.d_model=32", "data.seq_len=16",
                 "data.max_bytes=200000", "trainer.global_batch_size=4", "trainer.micro_batch_size=2",
                 "optim.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "step 2 | world size 1 | strategy single" in out and "global sample 8" in out
    assert "optim.lr: 0.001 (checkpoint) -> 0.01" in out
