"""Small collectives that are no-ops in one process and loud when a group is expected but missing.

The trainer calls these unconditionally; deciding "am I distributed?" happens here, once.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def _active(group: dist.ProcessGroup | None) -> bool:
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError(f"rank {os.environ.get('RANK', '?')}: WORLD_SIZE>1 but no process group exists; "
                               "a collective ran before init_process_group")
        return False
    return dist.get_world_size(group) > 1


def all_reduce_mean(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Mean over the group; returns a new tensor and leaves ``value`` unchanged."""
    out = value.detach().clone()
    if _active(group):
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        out /= dist.get_world_size(group)
    return out


def all_reduce_sum(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    out = value.detach().clone()
    if _active(group):
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def all_reduce_max(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    out = value.detach().clone()
    if _active(group):
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
    return out


def all_gather_tensor(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Every rank's ``value`` stacked in rank order along a new first dimension (on ``value``'s device)."""
    if not _active(group):
        return value.detach().clone().unsqueeze(0)
    world = dist.get_world_size(group)
    out = torch.empty(world * value.numel(), dtype=value.dtype, device=value.device)  # gloo wants it flat
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the new name, torch 2.13
    gather(out, value.detach().contiguous().view(-1), group=group)
    return out.view(world, *value.shape)


def all_gather_object(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any]:
    if not _active(group):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    if not _active(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if _active(group):
        dist.barrier(group=group)


def gather_object(obj: Any, dst: int = 0, group: dist.ProcessGroup | None = None) -> list[Any] | None:
    """Every rank's ``obj`` on rank ``dst`` (in rank order); None elsewhere."""
    if not _active(group):
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size(group) if rank(group) == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def on_rank_zero(fn: Callable[[], T], group: dist.ProcessGroup | None = None) -> T:
    """Run ``fn`` on rank 0 only and hand every rank its result, or raise its exception on every rank.

    For work that must not be repeated N times at scale (listing a bucket, reading manifests) but whose
    outcome, an error included, every rank must act on in lockstep."""
    outcome: tuple[str, Any] | None = None
    if rank(group) == 0:
        try:
            outcome = ("ok", fn())
        except Exception as e:
            outcome = ("error", e if _picklable(e) else RuntimeError(f"{type(e).__name__}: {e}"))
    outcome = broadcast_object(outcome, group=group)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def _picklable(value: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
        return True
    except Exception:
        return False
