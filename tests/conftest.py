"""Fixtures for every test: an environment free of launcher variables, restored afterwards."""

from __future__ import annotations

import os

import pytest

from tests.helpers import LAUNCH_VARS


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch):
    """No launcher variables leak in from the outside (a CI job under Slurm, say); all restored after."""
    for key in list(os.environ):
        if key in LAUNCH_VARS or key.startswith("SLURM_") or key.startswith("DTRAIN_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    yield


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's server) on 127.0.0.1, reached through s3fs like any S3 endpoint."""
    import socket
    import subprocess
    import sys
    import time

    from tests.helpers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto S3 server did not start")
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket; credentials only in the environment, as in production."""
    import uuid

    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    name = f"dtrain-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(endpoint_url=s3_server, key="testing", secret="testing").mkdir(name)
    return name
