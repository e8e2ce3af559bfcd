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
