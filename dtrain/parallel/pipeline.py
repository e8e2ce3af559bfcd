"""Pipeline schedules: names, which stages a rank holds, the rules on micro-batch counts, construction.

Three families of torch.distributed.pipelining schedules:
  - one stage per rank: ``GPipe`` (all forwards, then all backwards: activations of every
    micro-batch alive at once) and ``1F1B`` (at most ``pp`` micro-batches in flight);
  - several stages per rank in a loop (stage ``s`` on rank ``s % pp``): ``Interleaved1F1B``,
    ``LoopedBFS``, ``InterleavedZeroBubble``; the bubble shrinks with the stages per rank;
  - two stages per rank in a V (rank ``r`` holds stages ``r`` and ``2pp-1-r``): ``ZBVZeroBubble``,
    ``DualPipeV``. The zero-bubble schedules split backward into input and weight gradients.

The rules in :func:`schedule_problems` are the ones torch enforces at construction time (or where
it would fail later), checked here before any process starts.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

SINGLE, LOOP, V = "single", "loop", "v"
SCHEDULE_KINDS: dict[str, str] = {
    "GPipe": SINGLE,
    "1F1B": SINGLE,
    "Interleaved1F1B": LOOP,
    "LoopedBFS": LOOP,
    "InterleavedZeroBubble": LOOP,
    "ZBVZeroBubble": V,
    "DualPipeV": V,
}
# schedules that split backward into input and weight parts: torch refuses compiled stages for them
SPLIT_BACKWARD = ("InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")


def canonical_schedule(name: str) -> str | None:
    """The schedule's canonical spelling (matching is case-insensitive, like torch's), or None."""
    return {k.lower(): k for k in SCHEDULE_KINDS}.get(str(name).lower())


def stages_per_rank(schedule: str, requested: int) -> int:
    """``-1``: 1 for single-stage schedules, 2 for the others."""
    if requested != -1:
        return requested
    return 1 if SCHEDULE_KINDS[schedule] == SINGLE else 2


def stage_ids(pp_rank: int, pp: int, per_rank: int, schedule: str) -> list[int]:
    """Global indices of the stages ``pp_rank`` runs, in the order the schedule expects."""
    if SCHEDULE_KINDS[schedule] == V:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + s * pp for s in range(per_rank)]


def schedule_problems(schedule_name: str, pp: int, per_rank: int, microbatches: int) -> list[str]:
    """Why this schedule cannot run ``microbatches`` micro-batches over ``pp`` ranks (one line each)."""
    schedule = canonical_schedule(schedule_name)
    if schedule is None:
        return [f"strategy.pp_schedule={schedule_name} is not a pipeline schedule; choose one of: "
                f"{', '.join(SCHEDULE_KINDS)}"]
    kind = SCHEDULE_KINDS[schedule]
    problems = []
    if kind == SINGLE and per_rank != 1:
        problems.append(f"strategy.pp_schedule={schedule} runs one stage per rank but strategy.pp_stages_per_rank="
                        f"{per_rank}; use Interleaved1F1B, LoopedBFS or InterleavedZeroBubble for several")
    if kind == V and per_rank != 2:
        problems.append(f"strategy.pp_schedule={schedule} runs exactly 2 stages per rank (a V) but "
                        f"strategy.pp_stages_per_rank={per_rank}; set it to -1 or 2")
    if kind == LOOP and per_rank < 1:
        problems.append(f"strategy.pp_stages_per_rank={per_rank} must be -1 or positive")
    stages = pp * per_rank
    if schedule == "1F1B" and microbatches < pp:
        problems.append(f"strategy.pp_schedule=1F1B needs at least as many micro-batches as stages: "
                        f"{microbatches} < {pp}; raise the batch, lower trainer.micro_batch_size or use GPipe")
    if schedule == "DualPipeV" and microbatches < stages:
        problems.append(f"strategy.pp_schedule=DualPipeV needs at least as many micro-batches as stages: "
                        f"{microbatches} < {stages} (2 per rank x pp={pp})")
    if schedule in ("Interleaved1F1B", "InterleavedZeroBubble"):
        rounds = max(1, microbatches // pp)
        if microbatches % rounds:
            problems.append(f"strategy.pp_schedule={schedule} runs micro-batches in rounds of pp={pp}: "
                            f"{microbatches} micro-batches is not a multiple of {rounds} rounds; use a multiple "
                            f"of {pp}")
    return problems


def build_schedule(schedule: str, stages: list, microbatches: int,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    """The schedule object over this rank's ``stages``. Gradients are not rescaled by the schedule
    (``scale_grads=False``): ``loss_fn`` already divides by the micro-batches of the whole step."""
    from torch.distributed.pipelining.schedules import get_schedule_class

    cls = get_schedule_class(schedule)
    owned = stages[0] if SCHEDULE_KINDS[schedule] == SINGLE else stages
    return cls(owned, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)


def make_stage(module: nn.Module, stage_index: int, num_stages: int, device: torch.device, group):
    from torch.distributed.pipelining import PipelineStage

    return PipelineStage(module, stage_index, num_stages, device, group=group)


def stage_owners(pp: int, per_rank: int, schedule: str) -> list[int]:
    """Pipeline rank of every stage index."""
    owners = [0] * (pp * per_rank)
    for rank in range(pp):
        for stage in stage_ids(rank, pp, per_rank, schedule):
            owners[stage] = rank
    return owners


_DTYPE_CODES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _send(tensor: torch.Tensor, dst: int, group) -> None:
    """A header (dtype, rank, shape) then the tensor; both on the tensor's device (NCCL has no CPU backend)."""
    import torch.distributed as dist

    header = torch.zeros(8, dtype=torch.int64, device=tensor.device)
    header[0], header[1] = _DTYPE_CODES.index(tensor.dtype), tensor.dim()
    header[2:2 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64, device=tensor.device)
    dist.send(header, group_dst=dst, group=group)
    dist.send(tensor.contiguous(), group_dst=dst, group=group)


def _recv(src: int, group, device: torch.device) -> torch.Tensor:
    import torch.distributed as dist

    header = torch.zeros(8, dtype=torch.int64, device=device)
    dist.recv(header, group_src=src, group=group)
    code, ndim, *dims = header.tolist()
    tensor = torch.empty(dims[:ndim], dtype=_DTYPE_CODES[code], device=device)
    dist.recv(tensor, group_src=src, group=group)
    return tensor


@torch.no_grad()
def forward_only(parts: dict[int, nn.Module], owners: list[int], pp_rank: int, group,
                 micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum of ``loss_fn`` over ``micro_batches`` (on the rank holding the last stage; 0 elsewhere), on the
    inputs' device, running the stages one after the other with blocking sends: evaluation needs no
    overlap, and not every schedule can run forward-only (torch's V schedules fail in ``eval``)."""
    last = len(owners) - 1
    device = micro_batches[0][0].device
    total = torch.zeros((), device=device)
    for inputs, targets in micro_batches:
        hidden = None
        for stage, owner in enumerate(owners):
            if owner != pp_rank:
                continue
            if stage == 0:
                hidden = inputs
            elif owners[stage - 1] != pp_rank:
                hidden = _recv(owners[stage - 1], group, device)
            hidden = parts[stage](hidden)
            if stage == last:
                total = total + loss_fn(hidden, targets).float()
            elif owners[stage + 1] != pp_rank:
                _send(hidden, owners[stage + 1], group)
    return total
