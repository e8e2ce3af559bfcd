"""The global gradient norm over every shard of every stage with one all-reduce, and clipping by it.

A rank's gradients are plain tensors or DTensors sharded and/or replicated over parts of the mesh
(pending ``Partial`` sums are reduced first, see :func:`reduce_partial_grads`).
Each rank adds the squares of its local pieces, weighting a piece by 1/(number of ranks holding the
same piece): a DTensor's piece is repeated over the mesh dimensions where it is ``Replicate``; a plain
tensor over every rank of its stage (``plain_replicas``); a weight that two pipeline stages hold a copy of
(a tied embedding, see ``tied.py``) is repeated once more per copy (``stage_copies``). One all-reduce
over the world then sums each distinct element exactly once, across data-parallel shards,
tensor-parallel shards and pipeline stages alike. One collective instead of one per layout and mesh
dimension, and the same float on every rank.

The weighting assumes what the plans guarantee: a DTensor's mesh spans every non-pipeline dimension
of degree > 1 (FSDP2 puts all parameters on the data-parallel mesh, tensor parallel on the tp mesh).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate
from torch.nn.utils import clip_grads_with_norm_, get_total_norm


def _replicas(grad: torch.Tensor, plain_replicas: int) -> int:
    if isinstance(grad, DTensor):
        mesh = grad.device_mesh
        return math.prod(mesh.size(dim) for dim, p in enumerate(grad.placements) if p.is_replicate())
    return plain_replicas


def _local(grad: torch.Tensor) -> torch.Tensor:
    return grad.to_local() if isinstance(grad, DTensor) else grad


def reduce_partial_grads(params: Iterable[torch.Tensor]) -> None:
    """Finish gradients DTensor left as pending sums: a replicated parameter used on sharded activations
    (a sequence-parallel layer norm) gets a ``Partial`` gradient, one summand per rank. Reduce them once
    per step, here, so the norm, the clipping and the optimizer all see the real gradient: the gradients
    with the same mesh and the same placements (only ``Partial`` and ``Replicate``) go flattened into one
    collective (one per step, not one per layer norm: each costs a latency)."""
    batches: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        grad = p.grad
        if isinstance(grad, DTensor) and any(pl.is_partial() for pl in grad.placements):
            target = p.placements if isinstance(p, DTensor) else tuple(
                Replicate() if pl.is_partial() else pl for pl in grad.placements)
            if all(pl.is_partial() or pl.is_replicate() for pl in grad.placements) and all(
                    pl.is_replicate() for pl in target):
                batches.setdefault((grad.device_mesh, tuple(grad.placements), grad.dtype), []).append(p)
            else:
                p.grad = grad.redistribute(grad.device_mesh, target)
    for (mesh, placements, _), members in batches.items():
        locals_ = [p.grad.to_local() for p in members]
        flat = DTensor.from_local(torch.cat([g.reshape(-1) for g in locals_]), mesh, placements, run_check=False)
        summed = flat.redistribute(mesh, [Replicate()] * mesh.ndim).to_local()
        for p, local, piece in zip(members, locals_, summed.split([g.numel() for g in locals_])):
            p.grad = DTensor.from_local(piece.view_as(local), mesh, [Replicate()] * mesh.ndim, run_check=False)


def global_grad_norm(params: Iterable[torch.Tensor], plain_replicas: int = 1,
                     group: dist.ProcessGroup | None = None,
                     stage_copies: Mapping[torch.Tensor, int] | None = None) -> torch.Tensor:
    """L2 norm of all gradients of all ranks of ``group`` (default: the world), a float32 scalar on the
    gradients' device (NCCL needs it there). ``stage_copies``: parameters that also exist on other pipeline
    ranks, with the number of copies."""
    params = list(params)
    stage_copies = stage_copies or {}
    by_weight: dict[int, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            weight = _replicas(p.grad, plain_replicas) * stage_copies.get(p, 1)
            by_weight.setdefault(weight, []).append(_local(p.grad))
    device = _local(params[0]).device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    for replicas, grads in by_weight.items():
        total = total + get_total_norm(grads, 2.0).float().square() / replicas
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total.sqrt()


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, plain_replicas: int = 1,
                   stage_copies: Mapping[torch.Tensor, int] | None = None) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm`` (<= 0: no clipping) with torch's own
    ``clip_grads_with_norm_``; return the norm before clipping."""
    reduce_partial_grads(params)
    total = global_grad_norm(params, plain_replicas, stage_copies=stage_copies)
    if max_norm > 0:
        # one call per mesh: a foreach kernel cannot mix DTensors and plain tensors, nor meshes
        groups: dict[object, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        for mesh, members in groups.items():
            norm = total if mesh is None else DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim,
                                                                 run_check=False)
            clip_grads_with_norm_(members, max_norm, norm)
    return total
