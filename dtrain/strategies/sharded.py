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
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from dtrain.config.errors import ConfigError
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
from dtrain.strategies.loss import global_mean, global_target_count, gradient_scale
from dtrain.strategies.native import accumulate_gradients, forward_loss_sum, split_micro_batches
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


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


class GatheredLogits(nn.Module):
    """A tensor-parallel model whose logits come back whole (for decoding text, not for training)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return _full(self.model(tokens))


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

    def _loss_sum(self, micro_batch: torch.Tensor) -> torch.Tensor:
        return forward_loss_sum(self.model, micro_batch, self.device, self.spec.precision)

    def _loss_context(self) -> contextlib.AbstractContextManager:
        """Tensor parallelism keeps the logits sharded over the vocabulary: the loss is computed on the
        shards (forward and backward), instead of gathering and upcasting the full logits."""
        return loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()

    def _sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager:
        if isinstance(self.model, FSDPModule):
            # reduce-scatter gradients once per step, after the last micro-batch, not after each
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def train_step(self, batch: torch.Tensor) -> StepResult:
        self.model.train()
        batch = batch.to(self.device, non_blocking=True)
        count = global_target_count(batch, self.dp_size)
        loss_sum = accumulate_gradients(self._loss_sum, batch, self.spec.micro_batch_size, self._sync_gradients,
                                        gradient_scale(count, self.dp_size), self._loss_context)
        grad_norm = clip_grad_norm(list(self.model.parameters()), self.spec.grad_clip,
                                   plain_replicas=self.dims.world_size)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # tensor-parallel peers hold equal loss sums
        return StepResult(loss=global_mean(loss_sum, count, copies=self.dims.tp), grad_norm=grad_norm)

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        batch = batch.to(self.device, non_blocking=True)
        count = global_target_count(batch, self.dp_size)
        with self._loss_context():
            loss_sum = sum(_full(self._loss_sum(mb)) for mb in split_micro_batches(batch, self.spec.micro_batch_size))
        reshard([self.model])
        return global_mean(loss_sum, count, copies=self.dims.tp)

    def state_dict(self) -> dict[str, Any]:
        return get_model_optim_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_optim_state(self.model, self.optimizer, state)

    def sampling_model(self) -> nn.Module | None:
        # sequence parallelism needs the sequence length divisible by tp; decoding grows it one by one
        if self.dims.tp > 1 and self.cfg.sequence_parallel:
            return None
        return GatheredLogits(self.model) if self.dims.tp > 1 else self.model

    def teardown(self) -> None:
        self.model = None
        self._optimizer = None
        self.mesh = None
