"""Fully sharded data parallelism with FSDP2 (``fully_shard``): one communication group per block + the root.

Per-block groups let the all-gather of block ``i+1`` overlap the compute of block ``i`` and bound the
unsharded memory to about one block; the root group holds what is left (embeddings, final norm, head),
so a tied embedding and head stay one parameter in one group.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mixed_precision(param_dtype: str | None, reduce_dtype: str | None) -> MixedPrecisionPolicy:
    """``param_dtype`` is what forward/backward and the all-gather run in; ``reduce_dtype`` what gradients
    are reduced in. The sharded parameters and the optimizer state stay in their own (fp32) dtype."""
    return MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype] if param_dtype else None,
                                reduce_dtype=DTYPES[reduce_dtype] if reduce_dtype else None)


def apply_fsdp(model: nn.Module, blocks: Iterable[nn.Module], dp_mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy,
               reshard_after_forward: bool) -> FSDPModule:
    """Shard each block, then the root, over ``dp_mesh`` (1-D: FSDP; 2-D (replicate, shard): HSDP).

    ``reshard_after_forward=False`` keeps gathered block parameters from forward to backward: one
    all-gather less per block and micro-batch, at the cost of holding the whole unsharded stage. The
    root is left to FSDP (it keeps its parameters, needed first in backward)."""
    for block in blocks:
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    return fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy)


def fsdp_modules(modules: Iterable[nn.Module]) -> list[FSDPModule]:
    return [m for root in modules for m in root.modules() if isinstance(m, FSDPModule)]


def reshard(modules: Iterable[nn.Module]) -> None:
    """Free gathered parameters (a forward without backward, e.g. evaluation, leaves the root gathered),
    so state dicts and the next step see the sharded parameters."""
    for module in fsdp_modules(modules):
        module.reshard()
