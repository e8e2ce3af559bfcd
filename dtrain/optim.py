"""Optimizer and learning-rate schedule from ``cfg.optim``."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from omegaconf import DictConfig
from torch import nn

OPTIMIZERS = ("adamw",)
SCHEDULES = ("cosine", "linear", "constant")


def build_optimizer(named_params: Iterable[tuple[str, nn.Parameter]], cfg: DictConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on every matrix, the embeddings included (GPT-2 and nanoGPT practice);
    biases, norm weights and other 1-D tensors are not decayed."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)


def lr_multiplier(cfg: DictConfig, max_steps: int) -> Callable[[int], float]:
    """Factor on ``cfg.lr`` for step ``s`` (0-based): linear warmup, then the chosen decay to min_lr_ratio."""
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio
    decay_steps = cfg.decay_steps or max_steps

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, decay_steps - warmup))
        if cfg.schedule == "linear":
            return 1.0 - (1.0 - floor) * progress
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: DictConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg, max_steps))
