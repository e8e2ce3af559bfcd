"""From a user's command line to one validated launch: the composed config, the job's overrides, the grace.

Everything a renderer needs is decided here, once, before anything is written or submitted, so that
every problem (config, strategy degrees vs nodes x processes, launcher options) is one ConfigError.
"""

from __future__ import annotations

import math
import re
import shlex
from dataclasses import dataclass, field

from omegaconf import DictConfig

from dtrain.config.compose import compose_config
from dtrain.config.errors import ConfigError
from dtrain.config.secrets import redact_override
from dtrain.config.validate import find_problems
from dtrain.launch.grace import GraceEstimate, estimate_grace

KINDS = ("torchrun", "slurm", "k8s")
_TIME_LIMIT = re.compile(r"^(?:(\d+)-)?(\d{1,2}):(\d{2}):(\d{2})$")
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class Launch:
    """One validated launch. ``overrides`` is what every training process of the job receives."""

    kind: str
    cfg: DictConfig
    overrides: list[str]
    grace_s: int
    grace: GraceEstimate
    command: str  # the `dtrain launch ...` line that renders this (written into the file's header)
    warnings: list[str] = field(default_factory=list)

    @property
    def launcher(self) -> DictConfig:
        return self.cfg.launcher

    @property
    def world_size(self) -> int:
        return self.launcher.nodes * self.launcher.nproc_per_node


def time_limit_seconds(text: str) -> int | None:
    """``1-02:03:04`` / ``02:03:04`` -> seconds; None when it is not one of Slurm's forms dtrain accepts."""
    match = _TIME_LIMIT.match(text.strip())
    if match is None:
        return None
    days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def is_local_uri(uri: str) -> bool:
    """A path on this machine's disk (plain path or file://), as opposed to an object store."""
    return "://" not in uri or uri.startswith("file://")


def check_launcher(cfg: DictConfig, kind: str) -> list[str]:
    """Problems of the ``launcher`` node for this kind, one line each."""
    lc, problems = cfg.launcher, []
    if lc.kind != kind:
        problems.append(f"launcher={lc.kind} does not match `dtrain launch {kind}`; drop the launcher= override")
    for key, minimum in (("nodes", 1), ("nproc_per_node", 1), ("gpus_per_node", 0), ("max_restarts", 0),
                         ("max_crash_retries", 0)):
        if lc[key] < minimum:
            problems.append(f"launcher.{key}={lc[key]} must be >= {minimum}")
    if not 1 <= lc.rdzv_port <= 65535:
        problems.append(f"launcher.rdzv_port={lc.rdzv_port} is not a TCP port")
    for key in ("write_mb_s", "grace_margin", "rdzv_timeout_s"):
        if lc[key] <= 0:
            problems.append(f"launcher.{key}={lc[key]} must be positive")
    for key in ("grace_period_s", "save_time_s", "cpus_per_node"):
        if lc[key] is not None and lc[key] <= 0:
            problems.append(f"launcher.{key}={lc[key]} must be positive (or null)")
    if lc.time_limit is not None and time_limit_seconds(str(lc.time_limit)) is None:
        problems.append(f"launcher.time_limit={lc.time_limit} is not HH:MM:SS or D-HH:MM:SS (e.g. 04:00:00)")
    if kind == "slurm" and not lc.partition:
        problems.append("launcher.partition is required for Slurm (e.g. launcher.partition=gpu; `sinfo -s` lists them)")
    if kind == "k8s":
        if not lc.image:
            problems.append("launcher.image is required for Kubernetes: an image with dtrain installed "
                            "(e.g. launcher.image=ghcr.io/you/dtrain:1.0)")
        # pods are named <job>-<index> and reached as <job>-<index>.<job>: one DNS label each
        if not _DNS_LABEL.match(lc.job_name) or len(lc.job_name) > 50:
            problems.append(f"launcher.job_name={lc.job_name} must be a DNS label for Kubernetes: lower-case letters, "
                            "digits and '-', starting with a letter, at most 50 characters")
        if lc.nodes > 1 and is_local_uri(str(cfg.checkpoint.uri)):
            problems.append(f"checkpoint.uri={cfg.checkpoint.uri} is a local path, but the {lc.nodes} pods of a "
                            "Kubernetes job share no disk; use an object store (checkpoint=s3 checkpoint.uri=s3://"
                            "BUCKET/PATH, or gs://...)")
    return problems


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def build_launch(kind: str, user_overrides: list[str], nodes: int | None, nproc: int | None) -> Launch:
    """Compose and check everything; raise one ConfigError listing every problem (nothing is written)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown launcher '{kind}'; choose one of: {', '.join(KINDS)}")
    problems = []
    overrides = [o for o in user_overrides if _key(o) != "launcher"]
    given_launcher = [o.split("=", 1)[1] for o in user_overrides if _key(o) == "launcher"]
    if any(value != kind for value in given_launcher):
        problems.append(f"launcher={given_launcher[0]} does not match `dtrain launch {kind}`; drop the override")
    for flag, key, value in (("--nodes", "launcher.nodes", nodes), ("--nproc-per-node", "launcher.nproc_per_node",
                                                                    nproc)):
        if value is not None:
            if any(_key(o) == key for o in overrides):
                problems.append(f"both {flag} and {key}= were given; keep one")
            overrides.append(f"{key}={value}")
    for override in user_overrides:
        if redact_override(override) != override:
            # the rendered file (and the job's command line, visible to every user of the cluster) would hold it
            problems.append(f"{redact_override(override)} carries a credential; launchers never write credentials "
                            "into files: use the environment (Slurm: export it before sbatch; Kubernetes: a Secret "
                            "named by launcher.env_from)")
    overrides = [f"launcher={kind}", *overrides]
    cfg, compose_problems = compose_config(overrides)
    problems += compose_problems
    if cfg is None:
        raise ConfigError(problems)
    launcher_problems = check_launcher(cfg, kind)
    world = max(cfg.launcher.nodes, 1) * max(cfg.launcher.nproc_per_node, 1)
    problems += [p if "world" not in p else f"{p} (launcher: {cfg.launcher.nodes} nodes x "
                 f"{cfg.launcher.nproc_per_node} processes)" for p in find_problems(cfg, world)]
    problems += launcher_problems
    if problems:
        raise ConfigError(problems)

    requested = cfg.launcher.grace_period_s
    if requested is None and any(_key(o) == "checkpoint.grace_period_s" for o in overrides):
        requested = cfg.checkpoint.grace_period_s  # the user said how long the platform gives
    grace = estimate_grace(cfg, requested)
    grace_s = int(math.ceil(grace.grace_s))
    warnings = list(grace.warnings)
    lc = cfg.launcher
    if lc.gpus_per_node and lc.gpus_per_node != lc.nproc_per_node:
        warnings.append(f"launcher.gpus_per_node={lc.gpus_per_node} but launcher.nproc_per_node="
                        f"{lc.nproc_per_node}: dtrain runs one process per GPU")
    # the trainer's own grace check (and the writer lease's wait) must use what the scheduler gives
    overrides = [o for o in overrides if _key(o) != "checkpoint.grace_period_s"]
    overrides.append(f"checkpoint.grace_period_s={grace_s}")
    command = shlex.join(["dtrain", "launch", kind, *(["--nodes", str(nodes)] if nodes is not None else []),
                          *(["--nproc-per-node", str(nproc)] if nproc is not None else []), *user_overrides])
    return Launch(kind, cfg, overrides, grace_s, grace, command, warnings)
