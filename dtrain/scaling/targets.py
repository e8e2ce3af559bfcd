"""``dtrain scale projections FILE --out DIR``: project a set of CASEs on several presets and GPU counts,
and check the often-quoted scaling targets against each.

The file names the cases (CASE files, relative to it), the presets, the GPU counts and the targets::

    gpus: [8, 128, 1024]
    hardware: [h100_sxm, h200_sxm]
    cases: {gpt2_124m_ddp: cases/gpt2_124m_ddp.yaml, ...}
    targets: {efficiency: {8: 0.99, 128: 0.97, 1024: 0.95}, comm_fraction: 0.10}

Every case is weak-scaled (the batch per data-parallel replica stays) to each GPU count its layout
allows (a multiple of tp x pp x cp). Two efficiencies per point: ``efficiency``, tokens/s per GPU
against the smallest GPU count the layout runs on (1 GPU where it can: the usual meaning of "95% at
1024"; the first node for tensor-parallel layouts), on which the efficiency targets are judged; and
``compute_share``, 1 - exposed communication - pipeline bubble, what is left of the step for compute
at any scale (tensor parallelism's cost is there from the first node on). The communication target is
exposed communication under ``comm_fraction`` of the step. A missed target names the largest loss at
that point. Writes ``projections.json``, ``targets.md`` and plots.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from dtrain.config.errors import ConfigError

DIMS = ("dp", "tp", "pp", "cp")


def load_spec(path: Path) -> dict[str, Any]:
    from dtrain.scaling.case import read_document

    spec = read_document(path, "projections file") or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"projections file {path} must be a mapping with gpus, hardware, cases and targets")
    problems = []
    for key in ("gpus", "hardware", "cases", "targets"):
        if key not in spec:
            problems.append(f"{path}: '{key}' is required (see `dtrain scale projections --help`)")
    if problems:
        raise ConfigError(problems)
    return spec


def compute_share(point: dict[str, Any]) -> float:
    return 1.0 - point["exposed_comm_fraction"] - point["bubble_fraction"]


def _reason(point: dict[str, Any]) -> str:
    losses = {f"{dim} communication": point["comm_fraction_by_dim"][dim] for dim in DIMS}
    losses["pipeline bubble"] = point["bubble_fraction"]
    name, value = max(losses.items(), key=lambda kv: kv[1])
    return f"{name} {value:.1%}"


def run(spec: dict[str, Any], base: Path) -> dict[str, Any]:
    from dtrain.scaling.case import load, problems_of
    from dtrain.scaling.hardware import resolve
    from dtrain.scaling.projection import project

    targets = {int(k): float(v) for k, v in spec["targets"]["efficiency"].items()}
    comm_goal = float(spec["targets"]["comm_fraction"])
    projections, rows = [], []
    for name, relative in spec["cases"].items():
        case = load(base / relative)
        for hardware in spec["hardware"]:
            on = replace(case, hardware=resolve(hardware))
            points = []
            for gpus in spec["gpus"]:
                scaled = on.with_gpus(gpus)
                problems = problems_of(scaled)
                if problems:
                    points.append({"gpus": gpus, "error": problems[0]})
                    continue
                result = project(scaled).to_json()
                result["compute_share"] = round(compute_share(result), 4)
                points.append(result)
            valid = [p for p in points if "error" not in p]
            for p in valid:
                p["efficiency"] = round(p["tokens_per_s_per_gpu"] / valid[0]["tokens_per_s_per_gpu"], 4)
            projections.append({"case": name, "hardware": hardware, "points": valid,
                                "skipped": [p for p in points if "error" in p]})
            for p in points:
                row = {"case": name, "hardware": hardware, "gpus": p["gpus"]}
                if "error" in p:
                    row.update(error=p["error"])
                else:
                    goal = targets.get(p["gpus"]) if p["gpus"] != valid[0]["gpus"] else None
                    row.update(efficiency=p["efficiency"], baseline_gpus=valid[0]["gpus"],
                               compute_share=p["compute_share"], comm=p["exposed_comm_fraction"],
                               bubble=p["bubble_fraction"], mfu=p["mfu"], fits=p["fits_in_memory"],
                               efficiency_target=goal,
                               efficiency_holds=None if goal is None else p["efficiency"] >= goal,
                               comm_holds=p["exposed_comm_fraction"] < comm_goal, largest_loss=_reason(p))
                rows.append(row)
    return {"gpus": spec["gpus"], "hardware": spec["hardware"], "targets": {"efficiency": targets,
            "comm_fraction": comm_goal}, "projections": projections, "table": rows}


def markdown(report: dict[str, Any]) -> str:
    goals = report["targets"]
    lines = ["| case | hardware | GPUs | efficiency vs baseline (target) | compute share | exposed comm (< "
             f"{goals['comm_fraction']:.0%}) | bubble | MFU | fits | largest loss |",
             "|---|---|---:|---|---:|---|---:|---:|---|---|"]
    for r in report["table"]:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['hardware']} | {r['gpus']} | n/a: {r['error']} | | | | | | |")
            continue
        target = f" (baseline: {r['baseline_gpus']} GPU{'s' if r['baseline_gpus'] > 1 else ''})" \
            if r["efficiency_target"] is None else \
            f" ({'holds' if r['efficiency_holds'] else 'misses'} {r['efficiency_target']:.0%})"
        lines.append(f"| {r['case']} | {r['hardware']} | {r['gpus']} | {r['efficiency']:.1%}{target} | "
                     f"{r['compute_share']:.1%} | "
                     f"{r['comm']:.1%} ({'holds' if r['comm_holds'] else 'misses'}) | {r['bubble']:.1%} | "
                     f"{r['mfu']:.1%} | {'yes' if r['fits'] else 'no'} | {r['largest_loss']} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> int:
    from dtrain.scaling.cli import _Parser, write_json
    from dtrain.scaling.plots import projection_plots

    parser = _Parser(prog="dtrain scale projections", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="projections file (YAML)")
    parser.add_argument("--out", required=True, help="folder for projections.json, targets.md and plots")
    args = parser.parse_args(list(argv))
    path = Path(args.spec)
    report = run(load_spec(path), path.parent)
    out = Path(args.out)
    write_json(out / "projections.json", report)
    (out / "targets.md").write_text(markdown(report))
    for plot in projection_plots(report, out):
        print(f"wrote {plot}")
    print(markdown(report))
    return 0
