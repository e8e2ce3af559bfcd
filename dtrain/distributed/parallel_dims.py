"""The parallel degrees of one run and the one DeviceMesh built from them.

``world = pp x dp_replicate x dp_shard x cp x tp``. Ranks are laid out row-major in that order, so
tensor-parallel peers are neighbouring ranks (the fastest links: one node's NVLink) and pipeline
stages are the outermost split (the slowest links carry only activations). ``-1`` in one degree means
"whatever is left of the world size". Everything here is arithmetic until ``build_mesh`` is called,
so the same object validates a config for 1024 ranks before any process exists.

Context parallelism has its place in the layout (``cp``) but no strategy implements it yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dtrain.config.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# Outermost first. Changing this order changes which ranks talk to which: keep tp innermost.
MESH_DIMS: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
DEGREE_KEYS: dict[str, str] = {dim: f"strategy.{dim}" for dim in MESH_DIMS}


def _product(values: list[int]) -> int:
    return math.prod(values) if values else 1


def resolve_degrees(world_size: int, degrees: dict[str, int]) -> tuple[dict[str, int] | None, list[str]]:
    """Replace one ``-1`` by the rest of the world size and check the product; messages carry the numbers."""
    problems = [f"{DEGREE_KEYS[d]}={v} must be a positive integer or -1 (the rest of the world size)"
                for d, v in degrees.items() if v == 0 or v < -1]
    if problems:
        return None, problems
    open_dims = [d for d, v in degrees.items() if v == -1]
    if len(open_dims) > 1:
        keys = " and ".join(f"{DEGREE_KEYS[d]}=-1" for d in open_dims)
        return None, [f"{keys}: only one degree may be -1 (the rest of the world size {world_size}); "
                      f"give all but one a number"]
    fixed = {d: v for d, v in degrees.items() if v != -1}
    fixed_product = _product(list(fixed.values()))
    factors = [f"{DEGREE_KEYS[d]}={v}" for d, v in fixed.items() if v != 1]
    shown = " x ".join(factors) + (f" = {fixed_product}" if len(factors) > 1 else "")
    if open_dims:
        if world_size % fixed_product:
            return None, [f"world size {world_size} is not divisible by {shown} (the degrees other than "
                          f"{DEGREE_KEYS[open_dims[0]]}=-1); launch a multiple of {fixed_product} ranks or "
                          f"change the degrees"]
        resolved = dict(degrees)
        resolved[open_dims[0]] = world_size // fixed_product
        return resolved, []
    if fixed_product != world_size:
        full = " x ".join(f"{d}={v}" for d, v in degrees.items())
        return None, [f"parallel degrees {full} multiply to {fixed_product}, not the world size {world_size}; "
                      f"set one of them to -1 or launch {fixed_product} ranks"]
    return dict(degrees), []


@dataclass(frozen=True)
class ParallelDims:
    """Validated degrees; build with :meth:`resolve`."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    @classmethod
    def resolve(cls, world_size: int, *, pp: int = 1, dp_replicate: int = 1, dp_shard: int = 1, cp: int = 1,
                tp: int = 1) -> "ParallelDims":
        """Resolve ``-1`` and check the product against ``world_size``; raise ConfigError with the numbers."""
        resolved, problems = resolve_degrees(world_size, {"pp": pp, "dp_replicate": dp_replicate,
                                                          "dp_shard": dp_shard, "cp": cp, "tp": tp})
        if problems:
            raise ConfigError(problems)
        return cls(**resolved)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Ways the global batch is split: replicas x shards (tp, cp and pp peers read the same batch)."""
        return self.dp_replicate * self.dp_shard

    @property
    def degrees(self) -> dict[str, int]:
        return {dim: getattr(self, dim) for dim in MESH_DIMS}

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.degrees.values())

    def coordinates(self, rank: int) -> dict[str, int]:
        """Where ``rank`` sits on every mesh dimension (row-major, as ``init_device_mesh`` lays ranks out)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside world size {self.world_size}")
        coords: dict[str, int] = {}
        for dim in reversed(MESH_DIMS):
            rank, coords[dim] = divmod(rank, getattr(self, dim))
        return {dim: coords[dim] for dim in MESH_DIMS}

    def rank_at(self, **coords: int) -> int:
        """Inverse of :meth:`coordinates`; unnamed dimensions are 0."""
        rank = 0
        for dim in MESH_DIMS:
            rank = rank * getattr(self, dim) + coords.get(dim, 0)
        return rank

    def dp_rank(self, rank: int) -> int:
        """Which slice of the global batch ``rank`` reads: its (replicate, shard) coordinate, flattened."""
        c = self.coordinates(rank)
        return c["dp_replicate"] * self.dp_shard + c["dp_shard"]

    def describe(self) -> str:
        used = [f"{dim}={size}" for dim, size in self.degrees.items() if size > 1]
        return " x ".join(used) if used else "1 rank"

    def build_mesh(self, device_type: str) -> "DeviceMesh":
        """One DeviceMesh over every rank with all five named dimensions. Size-1 dimensions are kept so
        every plan slices the same names (``mesh["dp_replicate", "dp_shard"]`` is HSDP's 2-D mesh even when
        one of them is 1). Nothing needs a flattened data-parallel mesh: losses are reduced over the
        world (tensor and pipeline peers contribute equal or zero shares) and the data-parallel rank is
        :meth:`dp_rank` arithmetic, which equals the mesh coordinates by construction."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(device_type, self.shape, mesh_dim_names=MESH_DIMS)
