"""``dtrain scale <command>``: project, validate, measure, calibrate, projections, plot, spot.

Each command is one entry in :data:`COMMANDS` (name -> (one-line help, handler)); a new one is one more
entry. Handlers take the remaining arguments and return an exit code: 0 done, 1 a check failed (goals
not met), 2 bad input (one ``dtrain:`` line per problem, nothing run).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from dtrain.config.errors import ConfigError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``dtrain:`` line (exit 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message}")


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _gpu_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--gpus={text} must be a comma-separated list of GPU counts, e.g. 8,128,1024") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--gpus={text} must list positive GPU counts, e.g. 8,128,1024")
    return values


def cmd_project(argv: Sequence[str]) -> int:
    from dtrain.scaling.case import load, problems_of
    from dtrain.scaling.projection import project
    from dtrain.scaling.report import projection_table

    parser = _Parser(prog="dtrain scale project", description="Project a training step of a CASE onto GPUs.")
    parser.add_argument("case", help="CASE file (YAML or JSON): model, parallel, precision, hardware")
    parser.add_argument("--gpus", help="comma-separated GPU counts to project (efficiency relative to the first)")
    parser.add_argument("--strong", action="store_true",
                        help="with --gpus: keep the global batch (strong scaling); default keeps the batch per "
                             "data-parallel replica (weak scaling)")
    parser.add_argument("--out", required=True, help="OUT.json to write")
    args = parser.parse_args(list(argv))
    case = load(args.case)
    if not args.gpus:
        result = project(case)
        _warn_memory([result])
        write_json(args.out, result.to_json())
        print(projection_table([result]))
        return 0
    cases = [case.with_gpus(g, keep_global_batch=args.strong) for g in _gpu_list(args.gpus)]
    problems = [f"at {c.parallel.gpus} GPUs: {p}" for c in cases for p in problems_of(c)]
    if problems:
        raise ConfigError(problems)
    results = [project(c) for c in cases]
    out = []
    for r in results:
        entry = r.to_json()
        entry["efficiency"] = round(r.tokens_per_s_per_gpu / results[0].tokens_per_s_per_gpu, 6)
        out.append(entry)
    _warn_memory(results)
    write_json(args.out, out)
    print(projection_table(results))
    return 0


def _warn_memory(results) -> None:
    for r in results:
        if not r.fits_in_memory:
            print(f"dtrain: warning: at {r.gpus} GPUs the case needs {r.memory_gib_per_gpu:.1f} GiB per GPU, "
                  f"{r.memory_excess_gib:.1f} GiB more than the GPU has (fits_in_memory=false in the output)",
                  file=sys.stderr)


def cmd_validate(argv: Sequence[str]) -> int:
    from dtrain.scaling.published import check, default_path, load_rows
    from dtrain.scaling.report import validation_table

    parser = _Parser(prog="dtrain scale validate",
                     description="Project every published run and compare with what its paper measured.")
    parser.add_argument("--cases", default=None, help=f"published cases file (default: {default_path()})")
    parser.add_argument("--out", required=True, help="V.json to write")
    args = parser.parse_args(list(argv))
    path = Path(args.cases) if args.cases else default_path()
    if not path.is_file():
        raise ConfigError(f"published cases file {path} does not exist")
    report = check(load_rows(path))
    write_json(args.out, report)
    print(validation_table(report))
    return 0 if report["meets_goal"] else 1


def cmd_measure(argv: Sequence[str]) -> int:
    from dtrain.scaling.study import main as measure_main

    return measure_main(argv)


def cmd_calibrate(argv: Sequence[str]) -> int:
    from dtrain.scaling.calibrate import main as calibrate_main

    return calibrate_main(argv)


def cmd_projections(argv: Sequence[str]) -> int:
    from dtrain.scaling.targets import main as projections_main

    return projections_main(argv)


def cmd_plot(argv: Sequence[str]) -> int:
    from dtrain.scaling.plots import measured_plots

    parser = _Parser(prog="dtrain scale plot", description="Plots of a measured study's results.json.")
    parser.add_argument("results", help="results.json written by `dtrain scale measure`")
    parser.add_argument("--out", help="folder for the PNG files (default: next to results.json)")
    args = parser.parse_args(list(argv))
    path = Path(args.results)
    if not path.is_file():
        raise ConfigError(f"results file {path} does not exist")
    for plot in measured_plots(json.loads(path.read_text()), Path(args.out) if args.out else path.parent):
        print(f"wrote {plot}")
    return 0


def _spot(argv: Sequence[str]) -> int:
    from dtrain.scaling.spot import main as spot_main

    return spot_main(argv)


COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "project": ("project CASE [--gpus 8,128,1024] [--strong] --out OUT.json   step time, MFU, comm and bubble "
                "fractions on GPUs", cmd_project),
    "validate": ("validate [--cases FILE] --out V.json   the projection against published runs", cmd_validate),
    "measure": ("measure STUDY.yaml --out DIR   run a scaling sweep and write DIR/results.json", cmd_measure),
    "calibrate": ("calibrate [--results DIR/results.json] [--out PRESET.yaml]   measure this machine's compute, "
                  "memory and gloo links (cpu_local preset)", cmd_calibrate),
    "projections": ("projections FILE --out DIR   project several CASEs on several presets and check the "
                    "quoted scaling targets", cmd_projections),
    "plot": ("plot RESULTS.json [--out DIR]   plots of a measured study", cmd_plot),
    "spot": ("spot [--from RUN_DIR] ... --out OUT.json   spot vs on-demand goodput and cost per useful token "
             "(dtrain scale spot --help)", _spot),
}


def usage() -> str:
    lines = [f"  dtrain scale {help_}" for help_, _ in COMMANDS.values()]
    return "usage: dtrain scale <command> ...\n" + "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] not in COMMANDS:
        print(f"dtrain: unknown scale command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        return COMMANDS[argv[0]][1](argv[1:])
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_BAD_INPUT
