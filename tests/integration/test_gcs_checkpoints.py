"""Checkpoints on a GCS API (fake-gcs-server on 127.0.0.1) through gcsfs: the same code path as S3 and disk."""

from __future__ import annotations

import uuid

from dtrain.checkpoint.cli import main as ckpt
from dtrain.checkpoint.manager import committed_steps
from dtrain.checkpoint.storage import Storage
from tests.helpers import TINY, dtrain_single, read_metrics

ENV = {"GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}  # else every gcsfs call waits 60 s for a probe


def test_save_commit_resume_on_gcs(gcs_server, tmp_path, capsys):
    import gcsfs

    bucket = f"dtrain-{uuid.uuid4().hex[:8]}"
    gcsfs.GCSFileSystem(endpoint_url=gcs_server, token="anon").mkdir(bucket)
    uri = f"gs://{bucket}/run"
    options = [f"+checkpoint.storage_options.endpoint_url={gcs_server}", "+checkpoint.storage_options.token=anon"]
    common = [*TINY, "strategy=single", f"checkpoint.uri={uri}", *options, "checkpoint.interval_steps=2",
              f"run.dir={tmp_path}"]
    first = dtrain_single([*common, "trainer.max_steps=4"], **ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Traceback" not in first.stderr
    storage = Storage(uri, {"endpoint_url": gcs_server, "token": "anon"})
    assert committed_steps(storage) == [2, 4]
    second = dtrain_single([*common, "trainer.max_steps=6"], **ENV)
    assert second.returncode == 0 and "resumed from gs://" in second.stderr
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert ckpt(["verify", uri, "-o", f"endpoint_url={gcs_server}", "-o", "token=anon"]) == 0
    assert capsys.readouterr().out.count("OK ") == 2
    missing = dtrain_single([*TINY, "strategy=single", "checkpoint.uri=gs://no-such-bucket-y/run", *options,
                             "trainer.max_steps=1", f"run.dir={tmp_path / 'other'}"], timeout=120, **ENV)
    assert missing.returncode == 2 and "not usable" in missing.stderr and "Traceback" not in missing.stderr
