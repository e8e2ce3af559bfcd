"""The one command every launcher runs on each node: ``dtrain launch run`` with torchrun's options.

Rendezvous is c10d (the store lives in node 0's torchrun agent), so nodes may start in any order and
``--max-restarts`` can restart a crashed worker group in place. ``--shutdown-timeout`` is the grace
period: torchrun must not SIGKILL workers that are still writing their preemption checkpoint.
"""

from __future__ import annotations

import shlex

from dtrain.launch.spec import Launch

SIGNALS = "SIGTERM,SIGINT,SIGUSR1"


def node_command(launch: Launch, endpoint: str, rdzv_id: str) -> list[str]:
    """argv of one node's ``dtrain launch run``; ``endpoint``/``rdzv_id`` may be shell expressions
    (see :func:`shell_lines`)."""
    lc = launch.launcher
    return [lc.python, "-m", "dtrain", "launch", "run",
            f"--nnodes={lc.nodes}", f"--nproc-per-node={lc.nproc_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={rdzv_id}",
            f"--rdzv-conf=join_timeout={int(lc.rdzv_timeout_s)}",
            f"--max-restarts={lc.max_restarts}", f"--signals-to-handle={SIGNALS}",
            f"--shutdown-timeout={launch.grace_s}", f"--host-timeout-s={int(lc.rdzv_timeout_s)}",
            "--", *launch.overrides]


def shell_word(arg: str) -> str:
    """Quote for bash, except ``$VAR``/``${VAR...}``/``$(...)`` expansions in launcher-made arguments,
    which are double-quoted so the shell expands them on the node."""
    if arg.startswith("--rdzv-") and "$" in arg:
        return f'"{arg}"'
    return shlex.quote(arg)


def shell_lines(argv: list[str], indent: str = "  ") -> str:
    """One argument group per line, continued with backslashes: the program, each option, each override."""
    program_end = argv.index("run") + 1 if "run" in argv else 1
    lines = [" ".join(shell_word(a) for a in argv[:program_end])]
    lines += [indent + shell_word(a) for a in argv[program_end:]]
    return " \\\n".join(lines)


def render(launch: Launch) -> str:
    """A bash script to run on every node (the same file everywhere)."""
    from dtrain import exit_codes

    lc = launch.launcher
    default_master = ":-127.0.0.1" if lc.nodes == 1 else ":?set MASTER_ADDR to the host name of node 0"
    command = node_command(launch, endpoint=f"${{MASTER_ADDR{default_master}}}:${{MASTER_PORT:-{lc.rdzv_port}}}",
                           rdzv_id=f"${{DTRAIN_RUN_ID:-{lc.job_name}}}")
    lines = [
        "#!/usr/bin/env bash",
        f"# Rendered by: {launch.command}",
        "# Regenerate it with that command instead of editing.",
        "#",
        f"# Run this file on each of the {lc.nodes} node(s), with the same variables everywhere:",
        "#   MASTER_ADDR  node 0's host name (it hosts the rendezvous; the others wait until it answers)",
        f"#   MASTER_PORT  rendezvous port (default {lc.rdzv_port})",
        f"#   DTRAIN_RUN_ID  one id per run (default {lc.job_name}); the run directory is runs/torchrun-<id>, so",
        "#                reuse the id to resume a stopped run from its newest committed checkpoint",
        "# e.g. MASTER_ADDR=node0 DTRAIN_RUN_ID=exp1 bash THIS_FILE",
        "#",
        "# Exit code (dtrain/exit_codes.py), the workers' own, not torchrun's:",
        *(f"#   {code:<5} {what}: {action}" for code, what, action in exit_codes.CONTRACT),
        f"# SIGTERM/SIGUSR1 -> checkpoint -> exit {exit_codes.PREEMPTED}; the grace period is {launch.grace_s} s "
        f"({launch.grace.explanation}).",
        "set -euo pipefail",
        *lc.setup,
        *(f"export {key}={shlex.quote(str(value))}" for key, value in lc.env.items()),
        "exec " + shell_lines(command),
        "",
    ]
    return "\n".join(lines)
