"""Real Prometheus tools for the tests: Debian's ``prometheus`` package (server and promtool).

Outside CI a missing tool skips the test with the install command; in CI (``CI`` set) it fails, since
.ci/run installs the package and a skip there would hide a broken install."""

from __future__ import annotations

import os
import shutil

import pytest

MONITORING = __import__("pathlib").Path(__file__).resolve().parent.parent / "deploy" / "monitoring"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        why = f"{name} not installed (apt-get install -y prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{why}: .ci/run must install it")
        pytest.skip(why)
    return path
