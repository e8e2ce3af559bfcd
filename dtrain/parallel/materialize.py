"""Turn a meta-device model (possibly already sharded) into real, initialized parameters.

Initial values come from the model's ``init_tensor(name, full_shape, seed)``: a pure function of the
parameter's name, so every rank and every strategy starts from the same full weights, whatever the
sharding. Only one full parameter exists in memory at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

# Wrappers that insert a level into parameter names without changing the model.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def has_meta_params(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate on ``device`` and fill every parameter from ``model.init_tensor``; re-tie shared weights."""
    if not has_meta_params(model):
        model.to(device)
        return
    model.to_empty(device=device)
    for module in model.modules():
        if hasattr(module, "tie_weights"):
            module.tie_weights()
    for name, param in model.named_parameters():
        full_shape = param.shape  # a DTensor reports its global shape
        value = model.init_tensor(canonical_name(name), full_shape, seed).to(device=device, dtype=param.dtype)
        if isinstance(param, DTensor):
            value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(value)
    for module in model.modules():
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
