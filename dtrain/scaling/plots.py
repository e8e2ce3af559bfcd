"""Plots of a study (matplotlib, written as PNG): efficiency against ranks or GPUs, and the step time
broken into compute, exposed communication per dimension and the pipeline bubble."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DIM_COLORS = {"compute": "#4c72b0", "dp": "#dd8452", "tp": "#55a868", "pp": "#c44e52", "cp": "#8172b3",
              "other": "#937860", "bubble": "#8c8c8c"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def measured_plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Per model: efficiency vs ranks (a line per strategy and series) and the step-time breakdown."""
    plt = _pyplot()
    written = []
    points = [p for p in results["points"] if p.get("step_time_s")]
    for model in sorted({p["model"] for p in points}):
        mine = [p for p in points if p["model"] == model]
        fig, ax = plt.subplots(figsize=(6, 4))
        for strategy in sorted({p["strategy"] for p in mine}):
            for series, style in (("strong", "-o"), ("weak", "--s")):
                key = f"{series}_efficiency"
                line = sorted((p["world_size"], p[key]) for p in mine if p["strategy"] == strategy
                              and p.get(key) is not None and (p["series"] == series or p["world_size"] == 1))
                if len(line) > 1:
                    ax.plot(*zip(*line), style, label=f"{strategy} ({series})")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set(xlabel="ranks (gloo, one thread each)", ylabel="scaling efficiency", xscale="log", ylim=(0, 1.3),
               title=f"{model}: measured on {results['machine']['cpus']} CPUs")
        worlds = sorted({p["world_size"] for p in mine})
        ax.set_xticks(worlds, [str(w) for w in worlds])
        ax.legend(fontsize=7, ncol=2)
        written.append(_save(fig, out / f"efficiency_{model}.png"))
        written.append(_breakdown(plt, [(f"{p['strategy']} {p['series'][0]}{p['world_size']}", p["step_time_s"],
                                         _measured_parts(p)) for p in sorted(mine, key=_order)],
                                  f"{model}: where a step goes (measured, rank 0)", "seconds per step",
                                  out / f"breakdown_{model}.png"))
    return written


def _order(p: dict[str, Any]) -> tuple:
    return p["strategy"], p["series"] != "strong", p["world_size"]


def _measured_parts(p: dict[str, Any]) -> dict[str, float]:
    step = p["step_time_s"]
    parts = {dim: step * p["exposed_comm_fraction_by_dim"].get(dim, 0.0) for dim in ("dp", "tp", "pp", "cp", "other")}
    parts["bubble"] = step * (p.get("bubble_fraction") or 0.0)
    parts["compute"] = max(0.0, step - sum(parts.values()))
    return parts


def projection_plots(report: dict[str, Any], out: Path) -> list[Path]:
    """Efficiency vs GPUs (a line per case and hardware) and the breakdown of each projected step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    bars = []
    for entry in report["projections"]:
        points = entry["points"]
        ax.plot([p["gpus"] for p in points], [p["efficiency"] for p in points], "-o",
                label=f"{entry['case']} / {entry['hardware']}")
        for p in points:
            parts = {k: v / p["step_time_s"] for k, v in p["breakdown_s"].items() if k != "optimizer"}
            parts["compute"] += p["breakdown_s"].get("optimizer", 0.0) / p["step_time_s"]
            bars.append((f"{entry['case']} {entry['hardware'].split('_')[0]} {p['gpus']}", 1.0, parts))
    for gpus, target in report["targets"]["efficiency"].items():
        ax.plot([int(gpus)], [target], "k_", markersize=14)
    ax.set(xlabel="GPUs", ylabel="efficiency (tokens/s per GPU vs the first point)", xscale="log",
           title="Projected scaling (weak: batch per replica fixed); ticks: quoted targets")
    ax.legend(fontsize=6)
    written = [_save(fig, out / "efficiency_projected.png")]
    written.append(_breakdown(plt, bars, "Projected step time by part (fraction of the step)", "fraction of step",
                              out / "breakdown_projected.png"))
    return written


def _breakdown(plt, rows: list[tuple[str, float, dict[str, float]]], title: str, ylabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 4.5))
    labels = [r[0] for r in rows]
    bottom = [0.0] * len(rows)
    for part, color in DIM_COLORS.items():
        heights = [r[2].get(part, 0.0) for r in rows]
        if any(heights):
            ax.bar(labels, heights, bottom=bottom, color=color, label=part if part != "compute" else "compute (rest)")
            bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set(title=title, ylabel=ylabel)
    ax.tick_params(axis="x", labelrotation=90, labelsize=7)
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
