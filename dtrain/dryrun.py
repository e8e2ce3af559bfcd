"""``dtrain plan --world-size N [--rank R] [overrides]``: a run of N ranks, planned in one process.

Validates the config for N ranks (the same checks a real launch runs), then shows the mesh, which
ranks hold which pipeline stage and which data-/tensor-parallel shard, and per-rank memory. The
parameter shards are not computed by a formula: the strategy's own plan functions (tensor parallel,
pipeline split, FSDP2) run on a meta-device model inside a fake process group (torch's ``fake``
backend: collectives are no-ops, so rank R of N can be instantiated alone), once per pipeline stage,
and the DTensor shards they produce are counted. Activations come from the estimate in
``dtrain.parallel.memory``. Nothing is allocated and no process is started.
"""

from __future__ import annotations

import sys
from typing import Sequence

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor

from dtrain.config.errors import ArgumentParser, ConfigError
from dtrain.distributed.parallel_dims import MESH_DIMS, ParallelDims
from dtrain.parallel.memory import RankMemory, estimate_rank_memory, gib, local_numel_and_bytes

USAGE = "dtrain plan --world-size N [--rank R] [hydra overrides...]"


def _stage_layout(cfg: DictConfig, dims: ParallelDims) -> tuple[list[int], int, str | None]:
    """Layers per stage, stages per rank, schedule (single-stage layout when there is no pipeline)."""
    from dtrain.models.gpt_plans import stage_layer_counts
    from dtrain.parallel.pipeline import canonical_schedule, stages_per_rank

    if dims.pp == 1:
        return [cfg.model.get("n_layer", 0)], 1, None
    schedule = canonical_schedule(cfg.strategy.pp_schedule)
    per_rank = stages_per_rank(schedule, cfg.strategy.pp_stages_per_rank)
    counts = stage_layer_counts(cfg.model.n_layer, dims.pp * per_rank, cfg.strategy.get("pp_layers_per_stage"))
    return counts, per_rank, schedule


def _rank_modules(cfg: DictConfig, dims: ParallelDims, rank: int) -> list[nn.Module]:
    """The modules ``rank`` would hold, built on the meta device by the strategy's own plans, inside a
    fake process group of the full world size."""
    import torch.distributed as dist

    from dtrain.models import build_model
    from dtrain.models.gpt_plans import share_tied_weight, split_stage
    from dtrain.parallel.pipeline import stage_ids
    from dtrain.strategies.sharded import parallelize

    dist.init_process_group("fake", rank=rank, world_size=dims.world_size)
    try:
        model = build_model(cfg.model, cfg.trainer.seed)
        if cfg.strategy.name in ("single", "ddp"):
            return [model]
        mesh = dims.build_mesh("cpu")
        if dims.pp == 1:
            return [parallelize(model, dims, mesh, cfg.strategy)]
        counts, per_rank, schedule = _stage_layout(cfg, dims)
        mine = stage_ids(dims.coordinates(rank)["pp"], dims.pp, per_rank, schedule)
        parts = [parallelize(split_stage(model, stage, counts), dims, mesh, cfg.strategy) for stage in mine]
        share_tied_weight(parts)  # as the strategy does: one Parameter where a rank holds both ends
        return parts
    finally:
        dist.destroy_process_group()


def _params(modules: list[nn.Module]) -> list[tuple[str, torch.Tensor]]:
    seen: dict[int, tuple[str, torch.Tensor]] = {}
    for module in modules:
        for name, p in module.named_parameters():
            seen.setdefault(id(p), (name, p))
    return list(seen.values())


def rank_memory(cfg: DictConfig, dims: ParallelDims, rank: int) -> RankMemory:
    """The memory estimate of ``rank`` from the shards its plans produce. A second copy of a tied
    embedding on one rank (V schedule under FSDP2) has a parameter and a gradient but no optimizer state."""
    from dtrain.models.gpt_plans import tied_copies

    modules = _rank_modules(cfg, dims, rank)
    _, held = local_numel_and_bytes(p for _, p in _params(modules))
    _, followers = local_numel_and_bytes(tied_copies(modules)[1:])
    return estimate_rank_memory(cfg, dims, rank, held, stepped_bytes=held - followers)


def _ranges(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2, 5``."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(f"{start}" if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def _group_example(dims: ParallelDims, dim: str) -> str:
    """The ranks of rank 0's group along ``dim``."""
    ranks = [dims.rank_at(**{dim: i}) for i in range(getattr(dims, dim))]
    shown = ranks if len(ranks) <= 8 else ranks[:4] + ["..."] + ranks[-2:]
    stride = ranks[1] - ranks[0] if len(ranks) > 1 else 0
    return f"{dim} groups of {len(ranks)} (stride {stride}), e.g. ranks {', '.join(map(str, shown))}"


def plan_lines(cfg: DictConfig, dims: ParallelDims, world_size: int, show_rank: int | None) -> list[str]:
    from dtrain.parallel.pipeline import stage_ids

    t, s = cfg.trainer, cfg.strategy
    counts, per_rank, schedule = _stage_layout(cfg, dims)
    from dtrain.models import build_model

    n_params = sum(p.numel() for p in build_model(cfg.model, t.seed).parameters())
    lines = [f"dtrain plan: strategy={s.name} on {world_size} ranks, model {cfg.model._target_.rsplit('.', 1)[-1]} "
             f"with {n_params / 1e6:.2f}M parameters"]
    shape = " x ".join(f"{d}={getattr(dims, d)}" for d in MESH_DIMS)
    lines.append(f"mesh: {shape}  (rank = row-major index over {', '.join(MESH_DIMS)}; tp innermost)")
    accumulation = t.global_batch_size // (t.micro_batch_size * dims.dp)
    lines.append(f"data: {dims.dp} data-parallel replicas read different slices (dp rank = dp_replicate x "
                 f"{dims.dp_shard} + dp_shard); global batch {t.global_batch_size} = micro {t.micro_batch_size} "
                 f"x accumulation {accumulation} x dp {dims.dp}; tp/pp peers read the same slice")
    for dim in ("dp_replicate", "dp_shard", "tp", "pp"):
        if getattr(dims, dim) > 1:
            lines.append("  " + _group_example(dims, dim))
    if dims.pp > 1:
        per_round = accumulation if s.microbatches == -1 else s.microbatches
        lines.append(f"pipeline: {schedule}, {len(counts)} stages ({per_rank} per rank), blocks per stage {counts}, "
                     f"{per_round} micro-batches per round, {accumulation // per_round} round(s) per step")
        if cfg.model.get("tie_embeddings", False):
            lines.append(_tie_line(cfg, dims, per_rank, schedule))
    lines.append("")
    lines.append(f"{'pp rank':>7}  {'ranks':<16}{'stages (blocks)':<26}{'params/rank':>12}{'grads':>12}"
                 f"{'optimizer':>12}{'activations':>13}{'total':>12}")
    totals: list[RankMemory] = []
    stride = world_size // dims.pp
    for pp_rank in range(dims.pp):
        rank = dims.rank_at(pp=pp_rank)  # dp/tp coordinate 0: the largest (first) FSDP chunks
        memory = rank_memory(cfg, dims, rank)
        totals.append(memory)
        stages = stage_ids(pp_rank, dims.pp, per_rank, schedule) if dims.pp > 1 else [0]
        first_block = [sum(counts[:i]) for i in range(len(counts))]
        described = ", ".join(f"{i} ({first_block[i]}-{first_block[i] + counts[i] - 1})" for i in stages)
        lines.append(f"{pp_rank:>7}  {_ranges(list(range(pp_rank * stride, (pp_rank + 1) * stride))):<16}"
                     f"{described:<26}{gib(memory.params):>12}{gib(memory.grads):>12}{gib(memory.optimizer):>12}"
                     f"{gib(memory.activations) if memory.activations is not None else 'n/a':>13}"
                     f"{gib(memory.total):>12}")
    lines.append("(per rank, largest shard of the stage; activations are saved-for-backward estimates at "
                 "the step's peak, transients excluded)")
    if show_rank is not None:
        lines += _rank_detail(cfg, dims, show_rank, counts, per_rank, schedule)
    return lines


def _tie_line(cfg: DictConfig, dims: ParallelDims, per_rank: int, schedule: str) -> str:
    """Where a pipeline keeps the copies of a tied embedding and what keeping them equal costs."""
    from dtrain.parallel.pipeline import stage_owners

    m = cfg.model
    owners = stage_owners(dims.pp, per_rank, schedule)
    if owners[0] == owners[-1]:
        return (f"tied embeddings: pp rank {owners[0]} holds the first and the last stage, so the embedding and "
                "the head share one weight (under FSDP2 two sharded copies, gradients added locally); no "
                "extra communication")
    shard = m.vocab_size * m.d_model * 4 / (dims.dp_shard * dims.tp)
    return (f"tied embeddings: the last stage (pp rank {owners[-1]}) holds a copy of wte.weight ({m.vocab_size} x "
            f"{m.d_model}) as lm_head.weight, counted below; one all-reduce of its gradient per step with pp rank "
            f"{owners[0]} (a group of 2 per data-/tensor-parallel coordinate), {gib(int(shard))} per rank")


def _rank_detail(cfg: DictConfig, dims: ParallelDims, rank: int, counts: list[int], per_rank: int,
                 schedule: str | None) -> list[str]:
    from dtrain.parallel.pipeline import stage_ids

    coords = dims.coordinates(rank)
    lines = ["", f"rank {rank}: " + ", ".join(f"{d}={coords[d]}/{getattr(dims, d)}" for d in MESH_DIMS)
             + f"; reads data slice {dims.dp_rank(rank)} of {dims.dp}"]
    if dims.pp > 1:
        lines.append(f"  pipeline stages {stage_ids(coords['pp'], dims.pp, per_rank, schedule)}")
    tied = cfg.model.get("tie_embeddings", False)
    for name, p in _params(_rank_modules(cfg, dims, rank)):
        if tied and name == "lm_head.weight":
            name += " (tied copy)"
        if isinstance(p, DTensor):
            placements = ", ".join(str(pl) for pl in p.placements)
            lines.append(f"  {name:<40} full {tuple(p.shape)} -> local {tuple(p.to_local().shape)} [{placements}]")
        else:
            lines.append(f"  {name:<40} full {tuple(p.shape)} (whole)")
    return lines


def cmd_plan(argv: Sequence[str]) -> int:
    from dtrain.cli import EXIT_CONFIG_ERROR
    from dtrain.config.validate import load_config
    from dtrain.models import builds_on_meta
    from dtrain.strategies.layout import parallel_dims

    parser = ArgumentParser(prog="dtrain plan", usage=USAGE, add_help=True)
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks to plan for")
    parser.add_argument("--rank", type=int, default=None, help="also list this rank's coordinates and shards")
    try:
        args, overrides = parser.parse_known_args(list(argv))
        if args.world_size < 1:
            raise ConfigError(f"--world-size={args.world_size} must be positive")
        cfg = load_config([*overrides, *(["run.name=plan"] if not any(o.startswith("run.") for o in overrides)
                                        else [])], args.world_size)
        dims = parallel_dims(cfg.strategy.name, cfg.strategy, args.world_size)
        if dims is None:
            raise ConfigError(f"strategy={cfg.strategy.name} has no mesh plan to show")
        if args.rank is not None and not 0 <= args.rank < args.world_size:
            raise ConfigError(f"--rank={args.rank} is outside the world size {args.world_size}")
    except ConfigError as e:
        print(e.render(), file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if not builds_on_meta(cfg.model):
        print(f"dtrain: config error: model._target_={cfg.model._target_} cannot be built on the meta device "
              "(no init_tensor), so its shards cannot be planned", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    print("\n".join(plan_lines(cfg, dims, args.world_size, args.rank)))
    return 0
