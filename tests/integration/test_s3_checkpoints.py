"""Checkpoints on a real S3 API (moto server on 127.0.0.1) through s3fs: save, commit, resume, inspect, errors."""

from __future__ import annotations

import json


from dtrain.checkpoint.cli import main as ckpt
from dtrain.checkpoint.manifest import read_manifest, verify_files
from dtrain.checkpoint.storage import Storage
from tests.helpers import TINY, dtrain_single, read_metrics, torchrun

CREDS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def s3_overrides(endpoint: str, uri: str) -> list[str]:
    return [f"checkpoint.uri={uri}", f"+checkpoint.storage_options.endpoint_url={endpoint}"]


def test_two_rank_async_saves_commit_on_s3_and_resume(s3_server, s3_bucket, tmp_path, capsys):
    uri = f"s3://{s3_bucket}/runs/a"
    common = [*TINY, *s3_overrides(s3_server, uri), "checkpoint.interval_steps=3", "checkpoint.async_mode=thread",
              "checkpoint.keep_last=2", f"run.dir={tmp_path}"]
    first = torchrun(2, [*common, "trainer.max_steps=6"], **CREDS)
    assert first.returncode == 0, first.stderr[-3000:]
    storage = Storage(uri, {"endpoint_url": s3_server})
    assert [n for n in storage.listdir() if n.startswith("step_")] == ["step_00000003", "step_00000006"]
    manifest = read_manifest(storage, "step_00000006")
    assert manifest.world_size == 2 and {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {
        f["path"] for f in manifest.files}
    assert verify_files(storage, "step_00000006", manifest.files, checksums=True) == []
    # a second launch continues from step 6 on S3
    second = torchrun(2, [*common, "trainer.max_steps=8"], **CREDS)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from s3://" in second.stderr
    assert [r["step"] for r in read_metrics(tmp_path)][-2:] == [7, 8]
    # the CLI reads the same storage
    assert ckpt(["verify", uri, "-o", f"endpoint_url={s3_server}"]) == 0
    assert ckpt(["ls", uri, "-o", f"endpoint_url={s3_server}"]) == 0
    listing = capsys.readouterr().out
    assert "step_00000008" in listing and "committed" in listing


def test_s3_bad_input_is_a_clear_error_before_training(s3_server, s3_bucket, tmp_path):
    base = [*TINY, "strategy=single", "trainer.max_steps=2", f"run.dir={tmp_path}"]
    missing = dtrain_single([*base, *s3_overrides(s3_server, "s3://no-such-bucket-x/run")], timeout=120, **CREDS)
    assert missing.returncode == 2
    assert "bucket does not exist" in missing.stderr and "Traceback" not in missing.stderr
    no_creds = dtrain_single([*base, *s3_overrides(s3_server, f"s3://{s3_bucket}/run")], timeout=120,
                             AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None,
                             AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")
    assert no_creds.returncode == 2 and "no credentials found" in no_creds.stderr
    unreachable = dtrain_single([*base, f"checkpoint.uri=s3://{s3_bucket}/run",
                                 "+checkpoint.storage_options.endpoint_url=http://127.0.0.1:9",
                                 "+checkpoint.storage_options.config_kwargs={connect_timeout: 1, "
                                 "retries: {max_attempts: 1}}"], timeout=180, **CREDS)
    assert unreachable.returncode == 2 and "unreachable" in unreachable.stderr, unreachable.stderr[-2000:]
    assert not (tmp_path / "metrics.jsonl").exists()
    # secrets given in the config are redacted from what dtrain writes
    ok = dtrain_single([*base, *s3_overrides(s3_server, f"s3://{s3_bucket}/run"),
                        "+checkpoint.storage_options.key=testing", "+checkpoint.storage_options.secret=TOPSECRET"],
                       timeout=120, AWS_ACCESS_KEY_ID=None, AWS_SECRET_ACCESS_KEY=None)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "TOPSECRET" not in (tmp_path / "config.yaml").read_text() + ok.stderr + ok.stdout
    storage = Storage(f"s3://{s3_bucket}/run", {"endpoint_url": s3_server})
    assert b"TOPSECRET" not in storage.read_bytes("step_00000002/config.yaml")
    assert json.loads(storage.read_bytes("step_00000002/trainer_state.json"))["step"] == 2
