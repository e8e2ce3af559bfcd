"""A real Slurm cluster (scripts/slurm-up.sh: slurmctld + slurmd for nodes n1, n2 on 127.0.0.1)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "Slurm is not installed"
    try:
        result = subprocess.run(["sinfo", "-N", "-h", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s (slurmctld down?)"
    nodes = [line.split() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or len(nodes) < 2:
        return f"no 2-node Slurm cluster (sinfo: {(result.stdout + result.stderr).strip()[:200]!r})"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """Skip when no cluster runs here, except in CI, where a missing cluster is a failure (.ci/run starts it)."""
    problem = _cluster_problem()
    if problem is not None:
        message = f"{problem}; start one with `bash scripts/slurm-up.sh` (root, Debian)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Slurm tests: {message}")
        pytest.skip(message)
