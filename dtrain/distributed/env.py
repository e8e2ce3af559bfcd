"""Who am I in the job? Rank, world size, local rank and rendezvous address, from the launcher's variables.

Discovery is a pure function of the environment so it can be tested without launching anything.
Order of precedence: torchrun (it also runs inside Slurm allocations, so it wins), then Slurm's own
per-task variables (``srun python -m dtrain``), then a single process.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" | "slurm" | "single"
    restart_count: int = 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_rank_zero(self) -> bool:
        return self.rank == 0


def _int(environ: Mapping[str, str], key: str) -> int:
    try:
        return int(environ[key])
    except ValueError as e:
        raise ValueError(f"environment variable {key}={environ[key]!r} is not an integer") from e


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list such as ``gpu[003-005,010],cpu1`` -> ``gpu003``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty Slurm node list")
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot parse Slurm node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_master_port(job_id: str) -> int:
    """A port derived from the job id, so every task of one job agrees without talking (Lightning's rule)."""
    return 10000 + int(job_id[-4:]) % 20000 if job_id.isdigit() else DEFAULT_MASTER_PORT


def discover_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the launcher's variables; raise ValueError naming the variable when they are inconsistent."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and key not in env]
        if missing:
            raise ValueError(f"RANK and WORLD_SIZE are set ({world} ranks) but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not; start the job with torchrun, or set "
                             "RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT together")
        local_rank = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        restarts = _int(env, "TORCHELASTIC_RESTART_COUNT") if "TORCHELASTIC_RESTART_COUNT" in env else 0
        result = DistEnv(rank, world, local_rank, local_world, env.get("MASTER_ADDR", "127.0.0.1"),
                         int(env.get("MASTER_PORT", DEFAULT_MASTER_PORT)), "torchrun", restarts)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", "")
        master = env.get("MASTER_ADDR") or (first_host(nodelist) if nodelist else "127.0.0.1")
        port = int(env["MASTER_PORT"]) if "MASTER_PORT" in env else slurm_master_port(env.get("SLURM_JOB_ID", ""))
        local_world = _int(env, "SLURM_NTASKS_PER_NODE") if env.get("SLURM_NTASKS_PER_NODE", "").isdigit() else world
        restarts = _int(env, "SLURM_RESTART_COUNT") if "SLURM_RESTART_COUNT" in env else 0
        result = DistEnv(rank, world, _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
                         local_world, master, port, "slurm", restarts)
    else:
        return DistEnv(0, 1, 0, 1, "127.0.0.1", DEFAULT_MASTER_PORT, "single")
    if not 0 <= result.rank < result.world_size:
        raise ValueError(f"rank {result.rank} is outside world size {result.world_size} ({result.source} variables)")
    return result


def run_id(environ: Mapping[str, str] | None = None) -> str | None:
    """An id that every rank of one job computes identically and that survives a requeue.

    Slurm keeps the job id across ``scontrol requeue``; a Kubernetes Job keeps its name; torchrun
    shares its rendezvous id between the workers of one launch. None when nothing is shared.
    """
    env = os.environ if environ is None else environ
    if env.get("DTRAIN_RUN_NAME"):
        return env["DTRAIN_RUN_NAME"]
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    if env.get("SLURM_JOB_ID"):
        return f"slurm-{env['SLURM_JOB_ID']}"
    if env.get("DTRAIN_K8S_JOB_NAME"):
        return f"k8s-{env['DTRAIN_K8S_JOB_NAME']}"
    elastic = env.get("TORCHELASTIC_RUN_ID", "")
    if elastic and elastic != "none":
        return f"torchrun-{elastic[:12]}"
    return None
