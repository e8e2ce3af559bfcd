"""Model construction from ``cfg.model``: the built-in GPT or any class named by ``_target_``.

A model class that offers ``init_tensor(name, shape, seed)`` is built on the meta device (no memory
until the strategy has decided where each shard lives); any other model is built eagerly on the CPU
under the run's seed, with its own initialization.
"""

from __future__ import annotations

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from torch import nn


def builds_on_meta(model_cfg: DictConfig) -> bool:
    return hasattr(get_class(model_cfg._target_), "init_tensor")


def build_model(model_cfg: DictConfig, seed: int) -> nn.Module:
    if builds_on_meta(model_cfg):
        with torch.device("meta"):
            return instantiate(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return instantiate(model_cfg)
