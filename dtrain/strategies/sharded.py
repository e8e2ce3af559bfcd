"""Strategies where every rank runs the whole model on sharded weights: ``fsdp``, ``hsdp``, ``tp``, ``fsdp_tp``.

Setup applies the plans in torchtitan's order on the meta-device model: tensor parallel (DTensor
layouts inside each block) -> activation checkpointing -> torch.compile -> FSDP2 over the
data-parallel mesh, then materializes the shards. The step is the same as DDP's: micro-batches with
gradient reduction only on the last (FSDP2 ``set_requires_gradient_sync``), clip by the global norm
over all shards, step.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule

from dtrain.config.errors import ConfigError
from dtrain.distributed import collectives
from dtrain.distributed.env import DistEnv
from dtrain.distributed.parallel_dims import ParallelDims
from dtrain.models.gpt_plans import apply_tp, tp_problems
from dtrain.parallel.activation_checkpoint import apply_ac
from dtrain.parallel.compile import apply_compile
from dtrain.parallel.fsdp import apply_fsdp, mixed_precision, reshard
from dtrain.parallel.grad_norm import clip_grad_norm
from dtrain.parallel.materialize import materialize
from dtrain.strategies.base import OptimizerFactory, StepResult, StepSpec
from dtrain.strategies.layout import MeshDataParallel, common_problems, resolve_layout
from dtrain.strategies.native import accumulate_gradients, forward_loss, split_micro_batches
from dtrain.strategies.state import get_model_optim_state, set_model_optim_state


def dp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """FSDP's mesh: 2-D (replicate, shard) for HSDP, else the shard dimension alone."""
    return mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh, cfg: DictConfig) -> nn.Module:
    """Apply the configured plans to a meta-device GPT (or one pipeline stage of it), in place."""
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], cfg.sequence_parallel)
    apply_ac(model.blocks, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model.blocks)
    if dims.dp > 1:
        apply_fsdp(model, model.blocks.values(), dp_mesh(mesh, dims),
                   mixed_precision(cfg.param_dtype, cfg.reduce_dtype), cfg.reshard_after_forward)
    return model


def model_problems(cfg: DictConfig, dims: ParallelDims) -> list[str]:
    """Problems between the model/data config and the degrees (only for models that declare their shape)."""
    m = cfg.model
    if not {"n_head", "d_model", "vocab_size"} <= set(m.keys()):
        if dims.tp > 1:
            return [f"strategy.tp={dims.tp} needs a tensor-parallel plan for model._target_={m._target_}; "
                    "only the built-in GPT has one"]
        return []
    seq_len = cfg.data.get("seq_len", m.get("seq_len", 0))
    problems = tp_problems(m.n_head, m.d_model, m.get("mlp_ratio", 4), m.vocab_size, seq_len, dims.tp,
                           cfg.strategy.sequence_parallel, m.get("dropout", 0.0))
    if dims.dp == 1 and (cfg.strategy.param_dtype or cfg.strategy.reduce_dtype):
        problems.append(f"strategy.param_dtype/reduce_dtype are FSDP mixed precision, but the data-parallel "
                        f"degree is 1 ({dims.describe()}); use trainer.precision=bf16 (autocast) instead")
    return problems


class ShardedStrategy(MeshDataParallel):
    """FSDP2 and/or DTensor tensor parallelism over one DeviceMesh (see module docstring)."""

    def __init__(self, name: str, cfg: DictConfig, spec: StepSpec, env: DistEnv, device: torch.device):
        self.name, self.cfg, self.spec, self.env, self.device = name, cfg, spec, env, device
        dims, problems = resolve_layout(name, cfg, env.world_size)
        if problems:
            raise ConfigError(problems)
        self.dims: ParallelDims = dims
        self.mesh: DeviceMesh | None = None
        self.model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    @staticmethod
    def check_config(name: str, cfg: DictConfig, world_size: int) -> list[str]:
        return resolve_layout(name, cfg, world_size)[1] + common_problems(cfg)

    @staticmethod
    def check_fit(name: str, cfg: DictConfig, world_size: int) -> list[str]:
        dims, problems = resolve_layout(name, cfg.strategy, world_size)
        return [] if problems else model_problems(cfg, dims)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        assert self._optimizer is not None, "setup() first"
        return self._optimizer

    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        self.mesh = self.dims.build_mesh(self.device.type)
        self.model = parallelize(model, self.dims, self.mesh, self.cfg)
        materialize(self.model, self.device, self.spec.seed)
        self._optimizer = build_optimizer(self.model.named_parameters())

    def _forward_loss(self, micro_batch: torch.Tensor) -> torch.Tensor:
        return forward_loss(self.model, micro_batch, self.device, self.spec.precision)

    def _sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager:
        if isinstance(self.model, FSDPModule):
            # reduce-scatter gradients once per step, after the last micro-batch, not after each
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def train_step(self, batch: torch.Tensor) -> StepResult:
        self.model.train()
        loss = accumulate_gradients(self._forward_loss, batch, self.spec.micro_batch_size, self._sync_gradients,
                                    self.device)
        grad_norm = clip_grad_norm(list(self.model.parameters()), self.spec.grad_clip,
                                   plain_replicas=self.dims.world_size)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # tensor-parallel peers hold equal losses, so the world mean is the data-parallel mean
        return StepResult(loss=collectives.all_reduce_mean(loss), grad_norm=grad_norm)

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        losses = [self._forward_loss(mb) for mb in split_micro_batches(batch, self.spec.micro_batch_size)]
        reshard([self.model])
        return collectives.all_reduce_mean(torch.stack(losses).mean())

    def state_dict(self) -> dict[str, Any]:
        return get_model_optim_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_optim_state(self.model, self.optimizer, state)

    def sampling_model(self) -> nn.Module | None:
        # sequence parallelism needs the sequence length divisible by tp; decoding grows it one by one
        if self.dims.tp > 1 and self.cfg.sequence_parallel:
            return None
        return self.model

    def teardown(self) -> None:
        self.model = None
        self._optimizer = None
        self.mesh = None
