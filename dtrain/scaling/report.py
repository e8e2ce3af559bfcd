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
