"""Strategy registry: config name -> the class that implements it (imported lazily).

Lazy so that ``dtrain validate`` and the unit tests do not import DeepSpeed or pipelining code for a
strategy nobody asked for.
"""

from __future__ import annotations

import importlib

import torch
from omegaconf import DictConfig

from dtrain.distributed.env import DistEnv
from dtrain.strategies.base import StepResult, StepSpec, Strategy
from dtrain.strategies.deepspeed_config import DEEPSPEED_STRATEGIES

__all__ = ["STRATEGIES", "StepResult", "StepSpec", "Strategy", "build_strategy", "check_strategy",
           "data_parallel_size"]

# name -> "module:Class"; one class per family, several names per class
STRATEGIES: dict[str, str] = {
    "single": "dtrain.strategies.native:NativeStrategy",
    "ddp": "dtrain.strategies.native:NativeStrategy",
    "fsdp": "dtrain.strategies.sharded:ShardedStrategy",
    "hsdp": "dtrain.strategies.sharded:ShardedStrategy",
    "tp": "dtrain.strategies.sharded:ShardedStrategy",
    "fsdp_tp": "dtrain.strategies.sharded:ShardedStrategy",
    "pp": "dtrain.strategies.pipeline:PipelineStrategy",
    "pp_fsdp": "dtrain.strategies.pipeline:PipelineStrategy",
    "3d": "dtrain.strategies.pipeline:PipelineStrategy",
    **{name: "dtrain.strategies.deepspeed:DeepSpeedStrategy" for name in DEEPSPEED_STRATEGIES},
}
# DeepSpeed-only knobs and the value that means "not used"
_DEEPSPEED_KNOBS = {"zero_stage": None, "offload_optimizer": "none", "offload_param": "none", "ds_config": {}}


def _strategy_class(name: str) -> type:
    module, _, cls = STRATEGIES[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def check_strategy(cfg: DictConfig, world_size: int) -> list[str]:
    """Problems with ``cfg.strategy`` for this world size, as one-line messages."""
    name = cfg.strategy.name
    if name not in STRATEGIES:
        return [f"unknown strategy.name '{name}'; choose one of: {', '.join(STRATEGIES)}"]
    cls = _strategy_class(name)
    problems = cls.check_config(name, cfg.strategy, world_size)
    if name not in DEEPSPEED_STRATEGIES:
        problems += [f"strategy.{key}={cfg.strategy.get(key)} is a DeepSpeed setting that strategy={name} would "
                     f"ignore; remove it or use strategy={'|'.join(DEEPSPEED_STRATEGIES)}"
                     for key, unused in _DEEPSPEED_KNOBS.items() if cfg.strategy.get(key) != unused]
    if not problems and hasattr(cls, "check_fit"):
        # optional: checks that need the model, data and batch too (heads vs tp, layers vs stages, ...)
        problems = cls.check_fit(name, cfg, world_size)
    return problems


def data_parallel_size(cfg: DictConfig, world_size: int) -> int | None:
    """How many ways the global batch is split; None when the strategy name is unknown or its degrees
    do not fit the world size (reported by ``check_strategy``)."""
    name = cfg.strategy.name
    if name not in STRATEGIES:
        return None
    return _strategy_class(name).data_parallel_size(name, cfg.strategy, world_size)


def build_strategy(cfg: DictConfig, spec: StepSpec, env: DistEnv, device: torch.device) -> Strategy:
    name = cfg.strategy.name
    return _strategy_class(name)(name, cfg.strategy, spec, env, device)
