"""Which parallel degrees each strategy name may use, resolved against the world size.

Every name is the same mesh with some degrees pinned to 1: ``fsdp`` shards over data-parallel ranks,
``hsdp`` replicates shards, ``tp`` splits layers, ``fsdp_tp`` does both, ``pp`` splits depth,
``pp_fsdp`` and ``3d`` combine them. Asking for a degree a name does not use is an error that names
the strategy that does, rather than a silently ignored setting.
"""

from __future__ import annotations

from omegaconf import DictConfig

from dtrain.distributed.env import DistEnv
from dtrain.distributed.parallel_dims import ParallelDims, resolve_degrees
from dtrain.parallel.activation_checkpoint import AC_MODES
from dtrain.parallel.fsdp import DTYPES

# name -> degrees it may set above 1
USED_DEGREES: dict[str, tuple[str, ...]] = {
    "fsdp": ("dp_shard",),
    "hsdp": ("dp_replicate", "dp_shard"),
    "tp": ("tp",),
    "fsdp_tp": ("dp_replicate", "dp_shard", "tp"),
    "pp": ("pp",),
    "pp_fsdp": ("pp", "dp_replicate", "dp_shard"),
    "3d": ("pp", "dp_replicate", "dp_shard", "tp"),
}
# where to go for a degree a strategy does not use
_FOR_DEGREE = {"tp": "fsdp_tp or 3d", "pp": "pp, pp_fsdp or 3d", "dp_replicate": "hsdp, fsdp_tp, pp_fsdp or 3d",
               "dp_shard": "fsdp, hsdp, fsdp_tp, pp_fsdp or 3d"}


def _degrees(cfg: DictConfig) -> dict[str, int]:
    return {"pp": int(cfg.pp), "dp_replicate": int(cfg.dp_replicate), "dp_shard": int(cfg.dp_shard),
            "cp": 1, "tp": int(cfg.tp)}


def resolve_layout(name: str, cfg: DictConfig, world_size: int) -> tuple[ParallelDims | None, list[str]]:
    """The strategy's degrees for ``world_size``, or the problems (one line each) why there are none."""
    used = USED_DEGREES[name]
    degrees = _degrees(cfg)
    problems = [f"strategy={name} does not use strategy.{dim}={value}; set it to 1 or use strategy="
                f"{_FOR_DEGREE[dim]}" for dim, value in degrees.items() if dim not in used and dim != "cp"
                and value != 1]
    if problems:
        return None, problems
    resolved, problems = resolve_degrees(world_size, degrees)
    if problems:
        return None, [f"strategy={name}: {p}" for p in problems]
    return ParallelDims(**resolved), []


class MeshDataParallel:
    """``data_parallel_size``, ``dp_rank`` and ``dp_size`` of a strategy laid out by ``self.dims``.

    The batch is split over dp_replicate x dp_shard only; TP and PP peers of a rank read its slice.
    """

    dims: ParallelDims
    env: DistEnv

    @staticmethod
    def data_parallel_size(name: str, cfg: DictConfig, world_size: int) -> int | None:
        dims, problems = resolve_layout(name, cfg, world_size)
        return None if problems else dims.dp

    @property
    def dp_rank(self) -> int:
        return self.dims.dp_rank(self.env.rank)

    @property
    def dp_size(self) -> int:
        return self.dims.dp


def common_problems(cfg: DictConfig) -> list[str]:
    """Knob values every mesh strategy understands."""
    problems = []
    for key in ("param_dtype", "reduce_dtype"):
        value = cfg.get(key)
        if value is not None and value not in DTYPES:
            problems.append(f"strategy.{key}={value} is not one of: {', '.join(DTYPES)} (or null for fp32)")
    if cfg.activation_checkpointing not in AC_MODES:
        problems.append(f"strategy.activation_checkpointing={cfg.activation_checkpointing} is not one of: "
                        f"{', '.join(AC_MODES)}")
    return problems


def parallel_dims(name: str, cfg: DictConfig, world_size: int) -> ParallelDims | None:
    """The degrees of any native strategy (``single`` and ``ddp`` included), None if not a mesh strategy
    or the degrees do not fit."""
    if name == "single":
        return ParallelDims()
    if name == "ddp":
        return ParallelDims(dp_replicate=world_size)
    if name not in USED_DEGREES:
        return None
    dims, problems = resolve_layout(name, cfg, world_size)
    return None if problems else dims
