"""Native PyTorch strategies that keep one whole model per step: ``single`` and ``ddp``.

The step: split this rank's share of the global batch into micro-batches, run forward/backward on
each with gradient sync only on the last, clip the global gradient norm, step, zero grads.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from omegaconf import DictConfig
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dtrain.distributed.env import DistEnv
from dtrain.parallel.ddp import apply_ddp
from dtrain.parallel.materialize import materialize
from dtrain.strategies.base import OptimizerFactory, StepResult, StepSpec
from dtrain.strategies.loss import (autocast, global_mean, global_target_count, gradient_scale, inputs_and_targets,
                                    token_loss_sum)
from dtrain.strategies.state import get_model_optim_state, set_model_optim_state

def forward_loss_sum(model: nn.Module, micro_batch: torch.Tensor, device: torch.device,
                     precision: str) -> torch.Tensor:
    """Summed token loss of one ``[B, T+1]`` micro-batch (autocast around the forward only)."""
    inputs, targets = inputs_and_targets(micro_batch.to(device, non_blocking=True))
    with autocast(device, precision):
        logits = model(inputs)
    return token_loss_sum(logits, targets)


def split_micro_batches(batch: torch.Tensor, micro_batch_size: int) -> list[torch.Tensor]:
    if batch.shape[0] % micro_batch_size:
        raise ValueError(f"local batch {batch.shape[0]} is not a multiple of micro batch {micro_batch_size}")
    return list(batch.split(micro_batch_size))


def accumulate_gradients(loss_sum_of: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
                         micro_batch_size: int, sync_gradients: Callable[[bool], contextlib.AbstractContextManager],
                         scale: torch.Tensor,
                         context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                         ) -> torch.Tensor:
    """Forward and backward over one step's micro-batches, syncing gradients only after the last one.

    ``loss_sum_of`` gives a micro-batch's summed token loss; it is backpropagated times ``scale`` (see
    dtrain.strategies.loss). Returns this rank's loss sum. ``sync_gradients(is_last)`` is the wrapper's
    switch (DDP's ``no_sync``, FSDP's ``set_requires_gradient_sync``); ``context`` wraps forward and
    backward together (``loss_parallel`` for vocabulary-sharded logits).
    """
    micro_batches = split_micro_batches(batch, micro_batch_size)
    total = torch.zeros((), device=scale.device)
    for index, micro_batch in enumerate(micro_batches):
        with sync_gradients(index == len(micro_batches) - 1), context():
            loss_sum = loss_sum_of(micro_batch)
            (loss_sum * scale).backward()
        total += _local(loss_sum.detach())
    return total


def _local(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor scalar (a loss under ``loss_parallel``) as a plain tensor."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


class NativeStrategy:
    """``single``: one process, no process group. ``ddp``: DistributedDataParallel over every rank."""

    def __init__(self, name: str, cfg: DictConfig, spec: StepSpec, env: DistEnv, device: torch.device):
        self.name, self.cfg, self.spec, self.env, self.device = name, cfg, spec, env, device
        self.model: nn.Module | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    @staticmethod
    def check_config(name: str, cfg: DictConfig, world_size: int) -> list[str]:
        problems = []
        if name == "single" and world_size != 1:
            problems.append(f"strategy=single runs one process but the world size is {world_size}; "
                            "use strategy=ddp, or launch one process")
        ignored = [f"strategy.{key}={cfg[key]}" for key in ("dp_shard", "tp", "pp") if cfg[key] != 1]
        if ignored:
            problems.append(f"strategy={name} replicates the whole model, so {', '.join(ignored)} would be "
                            "ignored; use strategy=fsdp, tp, pp or 3d for those degrees")
        return problems

    @staticmethod
    def data_parallel_size(name: str, cfg: DictConfig, world_size: int) -> int:
        return world_size if name == "ddp" else 1

    @property
    def dp_rank(self) -> int:
        return self.env.rank if self.name == "ddp" else 0

    @property
    def dp_size(self) -> int:
        return self.data_parallel_size(self.name, self.cfg, self.env.world_size)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        assert self._optimizer is not None, "setup() first"
        return self._optimizer

    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        materialize(model, self.device, self.spec.seed)
        self._optimizer = build_optimizer(model.named_parameters())
        if self.name == "ddp":
            model = apply_ddp(model, self.device, self.cfg.bucket_cap_mb, self.cfg.find_unused_parameters)
        self.model = model

    def _sync_gradients(self, enabled: bool) -> contextlib.AbstractContextManager:
        if isinstance(self.model, DistributedDataParallel) and not enabled:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def _loss_sum(self, micro_batch: torch.Tensor) -> torch.Tensor:
        return forward_loss_sum(self.model, micro_batch, self.device, self.spec.precision)

    def train_step(self, batch: torch.Tensor) -> StepResult:
        self.model.train()
        batch = batch.to(self.device, non_blocking=True)
        count = global_target_count(batch, self.dp_size)
        loss_sum = accumulate_gradients(self._loss_sum, batch, self.spec.micro_batch_size, self._sync_gradients,
                                        gradient_scale(count, self.dp_size))
        max_norm = self.spec.grad_clip if self.spec.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss=global_mean(loss_sum, count, copies=1), grad_norm=grad_norm)

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        batch = batch.to(self.device, non_blocking=True)
        count = global_target_count(batch, self.dp_size)
        loss_sum = sum(self._loss_sum(mb) for mb in split_micro_batches(batch, self.spec.micro_batch_size))
        return global_mean(loss_sum, count, copies=1)

    def _unwrapped(self) -> nn.Module:
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    def state_dict(self) -> dict[str, Any]:
        # the layout every native strategy shares, so checkpoints move between them (see state.py)
        return get_model_optim_state(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_optim_state(self.model, self.optimizer, state)

    def sampling_model(self) -> nn.Module | None:
        return self._unwrapped()

    def teardown(self) -> None:
        self.model = None
        self._optimizer = None
