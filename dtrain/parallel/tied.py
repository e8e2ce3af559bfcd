"""One weight used by two pipeline stages (a tied embedding and head): a copy per stage, gradients summed.

A tied GPT uses ``wte.weight`` on the first stage and again as the head on the last. As in Megatron-LM
(its "embedding group") and DeepSpeed (``TiedLayerSpec``), each of the two stages keeps a copy, and after
backward the copies' gradients are summed with one all-reduce over the two pipeline ranks that hold
them (one group per data-/tensor-parallel coordinate), before clipping. Both ranks then clip and step
the same gradient from the same state, so the copies stay bit-identical without ever sending weights.

The copies have the same layout on both stages (the same plans on the same shape: tensor parallel
shards the vocabulary rows, FSDP2 shards dim 0 over the same data-parallel coordinates), so the sum
runs on the local shards, after FSDP2's own reduce-scatter, and never gathers the whole weight.

Where one rank holds both stages (V schedules) the head normally *is* the embedding's Parameter
(``share_tied_weight``): autograd sums the two uses and nothing here runs. Under FSDP2 each stage is
sharded on its own, so that rank keeps two sharded copies: the head's is a *follower*, outside the
optimizer; its gradient is added to the embedding's, and after the step it takes the embedding's values
(a local copy of matching shards).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from dtrain.distributed.parallel_dims import ParallelDims


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard, sharing storage with ``tensor`` (in-place writes reach it)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def embedding_group(dims: ParallelDims, mesh: DeviceMesh, first_pp: int, last_pp: int) -> dist.ProcessGroup | None:
    """This rank's group of {the rank at pipeline coordinate ``first_pp``, the one at ``last_pp``} with the
    same data-/tensor-parallel coordinates (None when one rank holds both stages). Collective: every rank
    of the world must call it, also those holding neither stage. With ``pp=2`` that pair is the pipeline
    group itself, so no new group is created."""
    if first_pp == last_pp:
        return None
    if {first_pp, last_pp} == set(range(dims.pp)):
        return mesh["pp"].get_group()
    stride = dims.world_size // dims.pp  # pp is the outermost mesh dimension
    pairs = [[first_pp * stride + i, last_pp * stride + i] for i in range(stride)]
    mine, _ = dist.new_subgroups_by_enumeration(pairs)
    return mine


def _in_param_layout(param: nn.Parameter) -> None:
    """Give a DTensor gradient its parameter's placements, so that local shards of the two copies are the
    same elements. DTensor's embedding backward returns a replicated gradient for a vocabulary-sharded
    weight; to the parameter's ``Shard(0)`` that is a local slice, no communication."""
    grad = param.grad
    if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(param.placements):
        param.grad = grad.redistribute(param.device_mesh, param.placements)


@dataclass
class TiedWeight:
    """This rank's copy of a tied weight (the one the optimizer steps), its followers, and the group
    holding the other stage's copy."""

    param: nn.Parameter
    followers: list[nn.Parameter] = field(default_factory=list)
    group: dist.ProcessGroup | None = None

    @property
    def copies(self) -> int:
        """Ranks along the pipeline that hold these elements: each counts 1/copies in the gradient norm."""
        return 1 if self.group is None else dist.get_world_size(self.group)

    def reduce_gradients(self) -> None:
        """Sum the gradients of every copy into ``param.grad`` on both ranks (after backward, before clipping)."""
        for copy in (self.param, *self.followers):
            _in_param_layout(copy)
        for follower in self.followers:
            _local(self.param.grad).add_(_local(follower.grad))
            follower.grad = None
        if self.group is not None:
            dist.all_reduce(_local(self.param.grad), group=self.group)

    @torch.no_grad()
    def sync_followers(self) -> None:
        """Give the followers the stepped values (after the optimizer step and after loading)."""
        for follower in self.followers:
            _local(follower).copy_(_local(self.param))
