"""The recovery-time projection: measured parts carried over, the size-dependent ones from assumptions."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dtrain.scaling.recovery import project, project_case

ASSUMPTIONS = yaml.safe_load((Path(__file__).resolve().parents[2] / "scaling_studies/recovery/assumptions.yaml")
                             .read_text())
MEASURED = {"detection_s": 0.5, "teardown_s": 2.0, "launch_to_process_s": 3.0, "process_to_restore_s": 6.0}
STORE = {"name": "s", "read_gbps_per_node": 2.0, "write_gbps_per_node": 1.0, "aggregate_gbps": 1000.0}
CASE = {"gpus": 128, "label": "m", "params": 10e9, "step_s": 5.0, "target_s": 60}


def test_parts_add_up_and_follow_the_stated_model():
    row = project_case(MEASURED, CASE, STORE, {**ASSUMPTIONS, "verify_checksums": True}, "SIGTERM")
    nodes, state = 16, 10e9 * ASSUMPTIONS["bytes_per_param"]
    assert row["nodes"] == nodes
    assert row["restore_s"] == pytest.approx(2 * state / nodes / 2e9)  # checksums: every byte read twice
    assert row["save_s"] == pytest.approx(state / nodes / 1e9)
    assert row["relaunch_s"] == pytest.approx(3.0 + 6.0 + ASSUMPTIONS["rendezvous_s"]
                                              + ASSUMPTIONS["rendezvous_s_per_node"] * nodes)
    parts = ("detection_s", "save_s", "teardown_s", "relaunch_s", "restore_s", "first_step_s")
    assert row["total_s"] == pytest.approx(sum(row[p] for p in parts))
    assert row["meets_target"] == (row["total_s"] < 60)
    unverified = project_case(MEASURED, CASE, STORE, {**ASSUMPTIONS, "verify_checksums": False}, "kill -9")
    assert unverified["restore_s"] == pytest.approx(row["restore_s"] / 2) and "save_s" not in unverified


def test_the_store_caps_what_all_nodes_read_together():
    slow_store = {**STORE, "aggregate_gbps": 10.0}
    row = project_case(MEASURED, {**CASE, "gpus": 1024}, slow_store, ASSUMPTIONS, "kill -9")
    assert row["restore_s"] == pytest.approx(2 * 10e9 * ASSUMPTIONS["bytes_per_param"] / 10e9)


def test_projection_covers_every_case_store_and_failure():
    measured = {"cases": [{"failure": f, **MEASURED} for f in ("kill -9", "SIGTERM")]}
    result = project(measured, ASSUMPTIONS)
    assert len(result["rows"]) == 2 * len(ASSUMPTIONS["storage"]) * len(ASSUMPTIONS["cases"])
    assert {r["gpus"] for r in result["rows"]} == {8, 128, 1024}
    assert len(result["table"]) == len(result["rows"]) + 1
