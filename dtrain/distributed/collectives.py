"""Small collectives that are no-ops in one process and loud when a group is expected but missing.

The trainer calls these unconditionally; deciding "am I distributed?" happens here, once.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


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
