"""Mixed precision by autocast around a module's forward only.

A pipeline schedule runs forward and backward itself, so the strategy cannot wrap just the forward
in ``torch.autocast`` the way the other strategies do; these hooks enter autocast when a stage's
forward starts and leave it when it returns (also on an error), so backward runs outside autocast
as torch recommends (it uses the dtypes forward chose). Activation checkpointing re-enters the
recorded autocast state when it recomputes.
"""

from __future__ import annotations

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def apply_autocast(module: nn.Module, device_type: str, precision: str) -> None:
    """Run ``module``'s forward under autocast to ``precision`` (no-op for fp32)."""
    if precision == "fp32":
        return
    active: list[torch.autocast] = []

    def enter(mod: nn.Module, args: tuple) -> None:
        context = torch.autocast(device_type=device_type, dtype=DTYPES[precision])
        context.__enter__()
        active.append(context)

    def leave(mod: nn.Module, args: tuple, output: object) -> None:
        active.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)
