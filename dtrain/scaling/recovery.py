"""Recovery time at 8/128/1024 GPUs: the measured breakdown of benchmarks/recovery.py, projected.

What does not grow with the job is carried over as measured on 2-4 ranks (failure detection by the
local torchrun agent, teardown, starting the launcher and Python, imports, building the model on the
meta device). What grows is modelled from stated assumptions, all in one YAML file:

- state: ``bytes_per_param`` x the model's parameters (fp32 weights and two AdamW moments: what dtrain
  checkpoints), spread over the nodes (fully sharded; DCP de-duplicates replicas on save);
- save (SIGTERM): each node writes its share at ``write_gbps_per_node``, capped by the store's
  ``aggregate_gbps``; before it, training runs on to the next step boundary (``to_boundary_s``: one
  step on average; those steps are kept, so they are no downtime, but they must fit in the grace period);
- restore: each node reads its share at ``read_gbps_per_node`` (same cap), twice when checksums are
  verified (dtrain reads every file once to check its CRC32C, then DCP reads it to load);
- rendezvous and process-group creation: ``rendezvous_s + rendezvous_s_per_node x nodes`` (one TCP
  store serves every rank);
- first step: ``first_step_warmup_s`` beyond a normal step (communicator set-up, allocator, kernel
  caches); the step itself is productive.

``total_s`` is the downtime: failure -> training as productive as before, against the targets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

MEASURED_KEYS = ("detection_s", "teardown_s", "launch_to_process_s", "process_to_restore_s")


def _transfer_s(total_bytes: float, nodes: int, per_node_gbps: float, aggregate_gbps: float) -> float:
    per_node = total_bytes / nodes / (per_node_gbps * 1e9)
    overall = total_bytes / (aggregate_gbps * 1e9)
    return max(per_node, overall)


def project_case(measured: dict[str, float], case: dict[str, Any], storage: dict[str, Any],
                 assumptions: dict[str, Any], failure: str) -> dict[str, Any]:
    """The breakdown for one job size, one store and one failure kind."""
    nodes = max(1, -(-case["gpus"] // assumptions["gpus_per_node"]))
    state = case["params"] * assumptions["bytes_per_param"]
    reads = 2 if assumptions.get("verify_checksums", True) else 1
    parts = {"detection_s": measured["detection_s"] if failure == "kill -9" else 0.0}
    if failure == "SIGTERM":
        parts["save_s"] = _transfer_s(state, nodes, storage["write_gbps_per_node"], storage["aggregate_gbps"])
    parts["teardown_s"] = measured["teardown_s"]
    parts["relaunch_s"] = (measured["launch_to_process_s"] + measured["process_to_restore_s"]
                           + assumptions["rendezvous_s"] + assumptions["rendezvous_s_per_node"] * nodes)
    parts["restore_s"] = reads * _transfer_s(state, nodes, storage["read_gbps_per_node"], storage["aggregate_gbps"])
    parts["first_step_s"] = assumptions["first_step_warmup_s"]
    total = sum(parts.values())
    target = case["target_s"]
    return {"gpus": case["gpus"], "nodes": nodes, "model": case["label"], "state_gb": state / 1e9,
            "storage": storage["name"], "failure": failure, **parts, "total_s": total, "target_s": target,
            "meets_target": total < target, "to_boundary_s": case["step_s"] if failure == "SIGTERM" else 0.0}


def measured_parts(measured: dict[str, Any], failure: str) -> dict[str, float]:
    """Median of the size-independent parts over every measured case of this failure kind."""
    import statistics

    rows = [c for c in measured["cases"] if c["failure"] == failure]
    if not rows:
        raise ValueError(f"the measured file has no {failure!r} case")
    return {key: statistics.median(r[key] for r in rows) for key in MEASURED_KEYS}


def project(measured: dict[str, Any], assumptions: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for failure in ("kill -9", "SIGTERM"):
        parts = measured_parts(measured, failure)
        for storage in assumptions["storage"]:
            for case in assumptions["cases"]:
                rows.append(project_case(parts, case, storage, assumptions, failure))
    return {"study": "recovery time projected to 8/128/1024 GPUs", "assumptions": assumptions,
            "measured_parts": {f: measured_parts(measured, f) for f in ("kill -9", "SIGTERM")},
            "measured_on": {k: measured.get(k) for k in ("model", "torch", "cpus", "repeats")}, "rows": rows,
            "table": table(rows)}


def table(rows: list[dict[str, Any]]) -> list[str]:
    head = (f"{'failure':<8} {'storage':<22} {'gpus':>5} {'detect':>6} {'save':>6} {'teardown':>8} {'relaunch':>8} "
            f"{'restore':>7} {'1st step':>8} {'total':>6} {'target':>6}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['failure']:<8} {r['storage']:<22} {r['gpus']:>5} {r['detection_s']:>6.1f} "
                     f"{r.get('save_s', 0.0):>6.1f} {r['teardown_s']:>8.1f} {r['relaunch_s']:>8.1f} "
                     f"{r['restore_s']:>7.1f} {r['first_step_s']:>8.1f} {r['total_s']:>6.1f} "
                     f"{'<' if r['meets_target'] else '>='}{r['target_s']:>5.0f}")
    return lines


def project_file(measured_path: Path, assumptions_path: Path) -> dict[str, Any]:
    measured = json.loads(measured_path.read_text())
    assumptions = yaml.safe_load(assumptions_path.read_text())
    result = project(measured, assumptions)
    result["measured_file"] = str(measured_path)
    result["assumptions_file"] = str(assumptions_path)
    return result
