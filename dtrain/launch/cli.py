"""``dtrain launch torchrun|slurm|k8s [--nodes N] [--nproc-per-node P] [--out PATH] [--submit] [overrides]``
and ``dtrain launch run ...`` (the torchrun wrapper every launcher runs on each node).

Rendering prints the launcher's file, writes it (``--out``) or submits it (``--submit``). Every check
runs before anything is written or submitted; a problem is a one-line ``dtrain:`` error and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from dtrain import exit_codes
from dtrain.config.errors import ArgumentParser, ConfigError

USAGE = """usage: dtrain launch torchrun|slurm|k8s [--nodes N] [--nproc-per-node P] [--out PATH] [--submit] [overrides]
       dtrain launch run [torchrun options] [--host-timeout-s S] -- [overrides...]   (what launchers run per node)
       dtrain launch sweep [overrides with a,b,c sweeps...] hydra/launcher=submitit_slurm   (Hydra multirun)

  torchrun  a bash script for every node (MASTER_ADDR=<node 0> bash FILE); --submit runs it here
  slurm     an sbatch script: one srun task per node, USR1 before the time limit -> checkpoint -> requeue
  k8s       an Indexed Job + headless Service (Kubernetes >= 1.31); --submit runs kubectl apply

launcher options are overrides of the `launcher` group (configs/launcher/, dtrain/config/schema.py), e.g.
launcher.partition=gpu launcher.time_limit=04:00:00 launcher.image=REPO/dtrain:TAG launcher.gpus_per_node=8"""


def _parser(kind: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=f"dtrain launch {kind}", add_help=False)
    parser.add_argument("--nodes", type=int)
    parser.add_argument("--nproc-per-node", type=int)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--submit", action="store_true")
    return parser


def render(kind: str, argv: Sequence[str]) -> tuple[str, argparse.Namespace, list[str]]:
    """The launcher file for ``dtrain launch KIND ARGV`` (without writing anything), the parsed options and
    the warnings; raises ConfigError."""
    from dtrain.launch import k8s, slurm, torchrun
    from dtrain.launch.spec import build_launch

    args, overrides = _parser(kind).parse_known_args(list(argv))
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        raise ConfigError(f"unknown option {unknown[0]} for dtrain launch {kind}; see dtrain launch --help")
    launch = build_launch(kind, overrides, args.nodes, args.nproc_per_node)
    renderer = {"torchrun": torchrun.render, "slurm": slurm.render, "k8s": k8s.render}[kind]
    return renderer(launch), args, launch.warnings


def cmd_render(kind: str, argv: Sequence[str]) -> int:
    from dtrain.launch import k8s, slurm

    try:
        text, args, warnings = render(kind, argv)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    for warning in warnings:
        print(f"dtrain: warning: {warning}", file=sys.stderr)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        if kind == "torchrun":
            args.out.chmod(0o755)
        print(f"dtrain: wrote {args.out}", file=sys.stderr)
    elif not args.submit:
        sys.stdout.write(text)
    if not args.submit:
        return exit_codes.OK
    try:
        if kind == "slurm":
            return slurm.submit(text, args.out)
        if kind == "k8s":
            return k8s.submit(text)
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    import subprocess

    return subprocess.run(["bash", "-c", text, "dtrain-launch"]).returncode


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return exit_codes.OK if argv else exit_codes.CONFIG_ERROR
    kind, rest = argv[0], argv[1:]
    if kind == "run":
        from dtrain.launch.wrapper import cmd_run

        return cmd_run(rest)
    if kind == "sweep":
        from dtrain.launch.sweep import cmd_sweep

        return cmd_sweep(rest)
    if kind not in ("torchrun", "slurm", "k8s"):
        print(f"dtrain: config error: unknown launcher '{kind}'; choose one of: torchrun, slurm, k8s (dtrain launch "
              "--help shows the options)", file=sys.stderr)
        return exit_codes.CONFIG_ERROR
    return cmd_render(kind, rest)
