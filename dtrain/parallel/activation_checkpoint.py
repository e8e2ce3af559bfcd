"""Activation checkpointing of transformer blocks: trade recompute for activation memory.

``full``: a block keeps only its input; everything inside is recomputed in backward (about one extra
forward). ``selective``: a block keeps the outputs of its matrix multiplies and attention and
recomputes only the cheap element-wise ops (layer norm, GELU), saving most of the memory of those at a
small recompute cost. The block's own ``forward`` is replaced by a checkpointed call of it (torch's
public ``torch.utils.checkpoint``, non-reentrant), so no wrapper module enters the tree and parameter
names, checkpoints and plans applied afterwards (compile, FSDP) see the same model.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

AC_MODES = ("none", "full", "selective")

# ops whose outputs "selective" keeps: the expensive ones
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_save_matmuls)


def apply_ac(blocks: nn.ModuleDict, mode: str) -> None:
    """Wrap every block of ``blocks`` in place (same keys); ``none`` leaves them alone."""
    if mode not in AC_MODES:
        raise ValueError(f"activation checkpointing mode {mode!r} is not one of {AC_MODES}")
    if mode == "none":
        return
    kwargs = {"context_fn": _selective_context} if mode == "selective" else {}
    for block in blocks.values():
        block.forward = _checkpointed(block.forward, kwargs)


def _checkpointed(forward: Callable, kwargs: dict) -> Callable:
    @functools.wraps(forward)
    def run(*args, **inner):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs, **inner)

    return run
