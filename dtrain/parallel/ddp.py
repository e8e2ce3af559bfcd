"""Data parallelism with torch DistributedDataParallel."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def apply_ddp(model: nn.Module, device: torch.device, bucket_cap_mb: float = 25.0,
              find_unused_parameters: bool = False, process_group=None) -> DistributedDataParallel:
    """Wrap a materialized model; gradients are averaged over ``process_group`` (default: all ranks)."""
    return DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=bucket_cap_mb,
        find_unused_parameters=find_unused_parameters,
        gradient_as_bucket_view=True,
        process_group=process_group,
    )
