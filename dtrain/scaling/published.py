"""Published runs the projection is checked against, and the check itself (``dtrain scale validate``).

``scaling_studies/published/published-cases.yaml`` holds two tables with the inputs and results their
papers state (sources in the file): Megatron-LM 2021 Table 1 (TFLOP/s per GPU counting the recomputed
forward, 32 to 3072 A100s) and Korthikanti et al. 2022 Table 5 (iteration time, full recomputation vs
sequence parallelism + selective recomputation). Each row becomes an ordinary CASE (the same format
users write), is projected on the file's hardware block, and compared with what the paper measured.
Nothing here is fitted per row: one set of hardware constants serves every row of both tables.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dtrain.scaling.case import Case, parse
from dtrain.scaling.projection import Projection, project

GOAL_MEAN, GOAL_MAX = 0.05, 0.10  # |relative error|, per table


def default_path() -> Path:
    from dtrain.config.compose import config_dir

    return config_dir().parent / "scaling_studies" / "published" / "published-cases.yaml"


@dataclass
class Row:
    table: str
    label: str
    case: dict[str, Any]  # the CASE document (what `dtrain scale project` would read)
    metric: str  # hardware_tflops_per_gpu | step_time_s
    measured: float


def _case(hardware: dict, defaults: dict, row: dict, recompute: str, sequence_parallel: bool,
          dp_overlap: bool) -> dict[str, Any]:
    h = row["hidden"]
    return {"model": {"layers": row["layers"], "hidden": h, "heads": row["heads"], "kv_heads": row["heads"],
                      "ffn_hidden": defaults.get("ffn_mult", 4) * h, "gated_mlp": defaults.get("gated_mlp", False),
                      "vocab": defaults["vocab"], "seq_len": defaults["seq_len"]},
            "parallel": {"gpus": row["gpus"], "tp": row["tp"], "pp": row["pp"], "vpp": row["vpp"], "cp": 1,
                         "micro_batch": row["micro_batch"], "global_batch": row["global_batch"], "zero": 0,
                         "sequence_parallel": sequence_parallel, "recompute": recompute, "dp_overlap": dp_overlap},
            "precision": defaults.get("precision", "fp16"), "hardware": dict(hardware)}


def load_rows(path: Path | None = None) -> list[Row]:
    data = yaml.safe_load(Path(path or default_path()).read_text())
    hardware = data["hardware"]["a100_80gb"]
    defaults = data["model_defaults"]
    rows: list[Row] = []
    t1 = data["megatron2021_t1"]
    for values in t1["rows"]:
        r = dict(zip(t1["columns"], values))
        case = _case(hardware, defaults, r, t1["recompute"], t1["sequence_parallel"], r["ddp"] == "torch")
        rows.append(Row("megatron2021_t1", f"{r['params_b']}B on {r['gpus']} GPUs (tp {r['tp']}, pp {r['pp']}, "
                                           f"ddp {r['ddp']})", case, "hardware_tflops_per_gpu", r["tflops_per_gpu"]))
    t5 = data["korthikanti2022_t5"]
    for values in t5["rows"]:
        r = dict(zip(t5["columns"], values))
        for recompute, sp, key in (("full", False, "seconds_full_recompute"),
                                   ("selective", True, "seconds_sp_selective")):
            case = _case(hardware, defaults, r, recompute, sp, True)
            rows.append(Row("korthikanti2022_t5", f"{r['params_b']}B on {r['gpus']} GPUs, {recompute} recompute"
                                                  f"{' + SP' if sp else ''}", case, "step_time_s", r[key]))
    return rows


def check(rows: list[Row]) -> dict[str, Any]:
    """Project every row; error per row, mean and max |error| per table, and whether the goals hold."""
    tables: dict[str, dict[str, Any]] = {}
    for row in rows:
        case: Case = parse(row.case)
        result: Projection = project(case)
        predicted = getattr(result, row.metric)
        error = (predicted - row.measured) / row.measured
        table = tables.setdefault(row.table, {"metric": row.metric, "rows": []})
        table["rows"].append({"label": row.label, "measured": row.measured, "predicted": round(predicted, 4),
                              "error": round(error, 4), "mfu": round(result.mfu, 4),
                              "exposed_comm_fraction": round(result.exposed_comm_fraction, 4),
                              "bubble_fraction": round(result.bubble_fraction, 4),
                              "memory_gib_per_gpu": round(result.memory_gib_per_gpu, 2),
                              "fits_in_memory": result.fits_in_memory})
    for table in tables.values():
        errors = [abs(r["error"]) for r in table["rows"]]
        table["mean_abs_error"] = round(statistics.fmean(errors), 4)
        table["max_abs_error"] = round(max(errors), 4)
        table["meets_goal"] = table["mean_abs_error"] <= GOAL_MEAN and table["max_abs_error"] <= GOAL_MAX
    return {"goal": {"mean_abs_error": GOAL_MEAN, "max_abs_error": GOAL_MAX}, "tables": tables,
            "meets_goal": all(t["meets_goal"] for t in tables.values())}
