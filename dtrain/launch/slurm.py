"""``dtrain launch slurm``: an sbatch script (templates/slurm.sbatch.j2) that requeues what the contract says.

The requeue decision is the batch shell's, never a rank's (Lightning requeues from a signal handler
inside rank 0, which breaks on array jobs, time limits and containers without ``scontrol``): the
shell sees every node's exit through srun (srun exits with the highest code of its tasks) and knows
whether Slurm itself is ending the job (SIGTERM).
"""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined

from dtrain import exit_codes
from dtrain.config.errors import ConfigError
from dtrain.launch.spec import Launch
from dtrain.launch.torchrun import node_command, shell_lines

TEMPLATES = Path(__file__).parent / "templates"


def _template_env() -> Environment:
    return Environment(loader=FileSystemLoader(TEMPLATES), undefined=StrictUndefined, trim_blocks=True,
                       lstrip_blocks=True, keep_trailing_newline=True)


def render(launch: Launch) -> str:
    lc = launch.launcher
    command = node_command(launch, endpoint="$master:$port", rdzv_id="slurm-$SLURM_JOB_ID")
    latest = [lc.python, "-m", "dtrain", "ckpt", "latest", "--config", "--", *launch.overrides]
    return _template_env().get_template("slurm.sbatch.j2").render(
        command=launch.command, lc=lc, grace_s=launch.grace_s, grace_how=launch.grace.explanation,
        contract=exit_codes.CONTRACT, ok=exit_codes.OK, config_error=exit_codes.CONFIG_ERROR,
        preempted=exit_codes.PREEMPTED, env=[(k, shlex.quote(str(v))) for k, v in lc.env.items()],
        node_command=shell_lines(command, indent="    "), latest_command=shlex.join(latest))


def submit(script: str, path: Path | None) -> int:
    """``sbatch FILE`` (or the script on stdin); prints sbatch's answer; returns its exit status."""
    try:
        if path is not None:
            result = subprocess.run(["sbatch", str(path)], capture_output=True, text=True)
        else:
            result = subprocess.run(["sbatch"], input=script, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError("sbatch is not on PATH; run on a Slurm login node, or write the script with --out") from None
    print((result.stdout + result.stderr).strip())
    return result.returncode
