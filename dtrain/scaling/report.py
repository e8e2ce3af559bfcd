"""Plain-text tables for the terminal (the JSON files hold every number)."""

from __future__ import annotations

from typing import Any


def projection_table(results: list) -> str:
    dims = ("dp", "tp", "pp", "cp")
    lines = [f"{'gpus':>6} {'step s':>9} {'tok/s/gpu':>10} {'model TF':>9} {'hw TF':>7} {'MFU':>6} {'eff':>6} "
             f"{'comm':>6} " + " ".join(f"{d:>5}" for d in dims) + f" {'bubble':>6} {'GiB/gpu':>8}"]
    first = results[0].tokens_per_s_per_gpu
    for r in results:
        flag = "" if r.fits_in_memory else f"  does not fit (+{r.memory_excess_gib:.1f} GiB)"
        lines.append(f"{r.gpus:>6} {r.step_time_s:>9.4g} {r.tokens_per_s_per_gpu:>10.4g} "
                     f"{r.model_tflops_per_gpu:>9.4g} "
                     f"{r.hardware_tflops_per_gpu:>7.4g} {r.mfu:>6.1%} {r.tokens_per_s_per_gpu / first:>6.1%} "
                     f"{r.exposed_comm_fraction:>6.1%} "
                     + " ".join(f"{r.comm_fraction_by_dim[d]:>5.1%}" for d in dims)
                     + f" {r.bubble_fraction:>6.1%} {r.memory_gib_per_gpu:>8.1f}{flag}")
    return "\n".join(lines)


def validation_table(report: dict[str, Any]) -> str:
    lines = []
    for name, table in report["tables"].items():
        lines.append(f"{name} ({table['metric']}): mean |error| {table['mean_abs_error']:.1%}, max "
                     f"{table['max_abs_error']:.1%}  (goal <= {report['goal']['mean_abs_error']:.0%} / "
                     f"{report['goal']['max_abs_error']:.0%}: {'met' if table['meets_goal'] else 'NOT met'})")
        for row in table["rows"]:
            lines.append(f"  {row['label']:<52} measured {row['measured']:>8.4g}  projected {row['predicted']:>8.4g}"
                         f"  error {row['error']:+.1%}")
    return "\n".join(lines)


def measured_markdown(results: dict[str, Any]) -> str:
    """results.json as a markdown table (one row per point)."""
    lines = ["| model | strategy | series | ranks | step s (median / best) | tokens/s | efficiency | exposed comm "
             "(dp/tp/pp/other) | bubble | comm MB/step | peak GiB | reference s | projected s (error) |",
             "|---|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for p in results["points"]:
        if p.get("error"):
            lines.append(f"| {p['model']} | {p['strategy']} | {p['series']} | {p['world_size']} | failed: "
                         f"{p['error']} | | | | | | | | |")
            continue
        efficiency = p["strong_efficiency"] if p["series"] == "strong" else p["weak_efficiency"]
        dims = p["exposed_comm_fraction_by_dim"]
        split = "/".join(f"{dims.get(d, 0):.0%}" for d in ("dp", "tp", "pp", "other"))
        projection = p.get("projection") or {}
        projected = (f"{projection['step_time_s']:.3f} ({projection['error_vs_measured']:+.0%})"
                     if projection.get("step_time_s") else projection.get("error", ""))
        best = p.get("step_time_best_s") or p["step_time_s"]
        reference = f"{p['reference_step_time_s']:.3f}" if p.get("reference_step_time_s") else ""
        lines.append(f"| {p['model']} | {p['strategy']} | {p['series']} | {p['world_size']}"
                     f"{' *' if p['oversubscribed'] else ''} | {p['step_time_s']:.3f} / {best:.3f} | "
                     f"{p['tokens_per_s']:.0f} | {efficiency:.0%} | {p['exposed_comm_fraction']:.0%} ({split}) | "
                     f"{p['bubble_fraction'] or 0:.0%} | {(p['comm_bytes_per_step'] or 0) / 1e6:.1f} | "
                     f"{p['peak_memory_gib']:.2f} | {reference} | {projected} |")
    return ("\n".join(lines) + "\n\n\\* more ranks than CPUs: the ranks share cores (see the README).\n"
            "reference: one rank's share of the point's work, alone and without communication (the projection's "
            "anchor; a pipeline's: all its stages on one rank).\n")
