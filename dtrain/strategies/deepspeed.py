"""DeepSpeed behind the strategy protocol: ``zero1``, ``zero2``, ``zero3`` (ZeRO over every rank), ``ds_pp``
(DeepSpeed's pipeline engine, ZeRO-1 across the data-parallel rest) and ``ds_tp`` (AutoTP, any ZeRO stage
across the rest). One class: the engine owns forward, backward and the optimizer step; dtrain owns the
config it is built from (dtrain.strategies.deepspeed_config), the loss, the optimizer and its schedule,
and the checkpoint layout (dtrain.strategies.deepspeed_state).

The step is the native strategies' math: the global number of targets first, then each micro-batch's
summed token loss x dp / count backpropagated with ``engine.backward(..., scale_wrt_gas=False)``
(DeepSpeed would otherwise divide by the accumulation steps once more), DeepSpeed's average over the
data-parallel ranks, clipping by the global norm, the client AdamW at the LR dtrain's scheduler set.
Gradients are reduced once per step, not per micro-batch: the micro-batches of a step run inside
``engine.coalesce_grad_reduction()`` (ZeRO 1-3; ZeRO-2 and -3 would otherwise reduce-scatter after every
micro-batch), or with the accumulation boundary only on the last one (stage 0); the pipeline engine
reduces once per ``train_batch`` itself.

DeepSpeed joins the process group dtrain started (``init_distributed(dist_init_required=False)``); on a
CPU it uses that gloo group and is kept from JIT-compiling ops (see deepspeed_private).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from dtrain.config.errors import ConfigError
from dtrain.distributed.env import DistEnv
from dtrain.parallel.materialize import materialize
from dtrain.parallel.precision import apply_autocast
from dtrain.strategies.base import OptimizerFactory, StepResult, StepSpec
from dtrain.strategies.deepspeed_config import (DeepSpeedLayout, build_config, config_problems, resolve_layout,
                                                zero_stage)
from dtrain.strategies.deepspeed_state import EngineState, Entry, create_optimizer_state, state_mesh
from dtrain.strategies.loss import (global_mean, global_target_count, gradient_scale, inputs_and_targets,
                                    token_loss_sum)
from dtrain.strategies.native import forward_loss_sum, split_micro_batches

log = logging.getLogger(__name__)


def _import_deepspeed(device: torch.device, level: str):
    """DeepSpeed, set up for this process: its accelerator is the training device's type (chosen at import,
    and its auto-detection warns on every CPU run), its logs at dtrain's level or above."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(max(logging.WARNING, logging.getLevelName(level)))
    if device.type == "cpu":
        from dtrain.parallel.deepspeed_private import skip_shm_comm_compile

        skip_shm_comm_compile()
    return deepspeed


def model_keys(model: nn.Module) -> dict[str, str]:
    """The model's state-dict keys -> the name of the parameter behind each (a tied weight has two keys,
    ``wte.weight`` and ``lm_head.weight``, and one parameter, ``wte.weight``)."""
    first: dict[int, str] = {}
    for name, param in model.named_parameters():
        first.setdefault(id(param), name)
    return {key: first[id(value)] for key, value in model.state_dict(keep_vars=True).items()
            if isinstance(value, nn.Parameter)}


def model_problems(name: str, cfg: DictConfig, layout: DeepSpeedLayout) -> list[str]:
    """What the built-in GPT needs to be split by AutoTP or DeepSpeed's pipeline."""
    from dtrain.models.gpt_deepspeed import autotp_problems

    m = cfg.model
    if name not in ("ds_pp", "ds_tp"):
        return []
    if not {"n_layer", "n_head", "d_model"} <= set(m.keys()):
        return [f"strategy={name} needs DeepSpeed plans for model._target_={m._target_}; only the built-in GPT "
                "has them (strategy=zero1|zero2|zero3 take any model)"]
    if name == "ds_pp" and m.n_layer < layout.pp:
        return [f"strategy.pp={layout.pp} pipeline stages but model.n_layer={m.n_layer}: every stage needs at "
                "least one block; lower strategy.pp or add layers"]
    if name == "ds_tp":
        return autotp_problems(m.n_head, m.d_model, m.get("mlp_ratio", 4), m.get("dropout", 0.0), layout.tp)
    return []


class DeepSpeedStrategy:
    """One DeepSpeed engine built from the dtrain config (see module docstring)."""

    def __init__(self, name: str, cfg: DictConfig, spec: StepSpec, env: DistEnv, device: torch.device):
        self.name, self.cfg, self.spec, self.env, self.device = name, cfg, spec, env, device
        layout, problems = resolve_layout(name, cfg, env.world_size)
        if problems:
            raise ConfigError(problems)
        self.layout: DeepSpeedLayout = layout
        self.stage = zero_stage(name, cfg)
        self.pipeline = name == "ds_pp"
        self.accumulation = spec.global_batch_size // (spec.micro_batch_size * layout.dp)
        self.engine: Any = None
        self.model: nn.Module | None = None  # the engine's module (what forward runs)
        self._optimizer: torch.optim.Optimizer | None = None
        self._state: EngineState | None = None
        self._loss_sums: list[torch.Tensor] = []  # the pipeline's last stage records each micro-batch's
        self._scale = torch.ones(())

    # -- config --------------------------------------------------------------------------------
    @staticmethod
    def check_config(name: str, cfg: DictConfig, world_size: int) -> list[str]:
        return config_problems(name, cfg, world_size)

    @staticmethod
    def check_fit(name: str, cfg: DictConfig, world_size: int) -> list[str]:
        layout, problems = resolve_layout(name, cfg.strategy, world_size)
        if problems:
            return []
        t, s = cfg.trainer, cfg.strategy
        problems = model_problems(name, cfg, layout)
        if t.global_batch_size % (t.micro_batch_size * layout.dp):
            return problems  # reported by the generic batch check
        accumulation = t.global_batch_size // (t.micro_batch_size * layout.dp)
        if name == "ds_pp" and s.microbatches not in (-1, accumulation):
            problems.append(f"strategy.microbatches={s.microbatches}: DeepSpeed's pipeline runs all {accumulation} "
                            f"micro-batches of a rank's step (global {t.global_batch_size} / (micro "
                            f"{t.micro_batch_size} x dp {layout.dp})) in one schedule; use -1 (or {accumulation}), "
                            "or change trainer.micro_batch_size")
        problems += build_config(name, s, t.global_batch_size, t.micro_batch_size, t.grad_clip, t.precision,
                                 layout)[1]
        return problems

    @staticmethod
    def data_parallel_size(name: str, cfg: DictConfig, world_size: int) -> int | None:
        layout, problems = resolve_layout(name, cfg, world_size)
        return None if problems else layout.dp

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.env.rank)

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """dtrain's own AdamW, which DeepSpeed steps on its fp32 partitions: dtrain's LR scheduler drives it."""
        assert self._optimizer is not None, "setup() first"
        return self._optimizer

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        deepspeed = _import_deepspeed(self.device, logging.getLevelName(logging.getLogger("dtrain").level))
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        keys = model_keys(model)
        if self.pipeline:
            from dtrain.models.gpt_deepspeed import PIPELINE_BLOCK, pipeline_layers, pipeline_parameters

            module = deepspeed.pipe.PipelineModule(pipeline_layers(model, self.spec.seed, self.device),
                                                   num_stages=self.layout.pp, loss_fn=self._pipeline_loss,
                                                   partition_method=f"type:{PIPELINE_BLOCK}")
            apply_autocast(module, self.device.type, self.spec.precision)  # stage forwards only, not backward
            named = list(pipeline_parameters(module))
        else:
            materialize(model, self.device, self.spec.seed)
            module, named = model, list(model.named_parameters())
        optimizer = build_optimizer(named)
        group_of = {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
        groups = {fqn: group_of[id(param)] for fqn, param in named}
        config, problems = build_config(self.name, self.cfg, self.spec.global_batch_size, self.spec.micro_batch_size,
                                        self.spec.grad_clip, self.spec.precision, self.layout)
        if problems:
            raise ConfigError(problems)
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                               dist_init_required=False)
        self.model, self._optimizer = self.engine.module, optimizer
        zero_optimizer = self.engine.optimizer if self.stage >= 1 else None
        params = dict(pipeline_parameters(self.model) if self.pipeline else self.model.named_parameters())
        create_optimizer_state(optimizer, zero_optimizer, params.values())
        aliases = {key: fqn for key, fqn in keys.items() if key != fqn and fqn in params}  # a tied head's name
        self._state = EngineState(self._entries(params, groups), aliases, self._buffers(), optimizer, zero_optimizer,
                                  self.stage, state_mesh(self.layout, self.device.type), self.layout.tp)

    def _entries(self, params: dict[str, nn.Parameter], groups: dict[str, int]) -> list[Entry]:
        from dtrain.models.gpt_deepspeed import autotp_shard_dim

        return [Entry(fqn, param, groups[fqn], autotp_shard_dim(fqn) if self.layout.tp > 1 else None)
                for fqn, param in params.items()]

    def _buffers(self) -> dict[str, torch.Tensor]:
        if self.pipeline:
            return {}
        return {key: value for key, value in self.model.state_dict(keep_vars=True).items()
                if not isinstance(value, nn.Parameter)}

    # -- the step ------------------------------------------------------------------------------
    def _pipeline_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """DeepSpeed's loss_fn on the last stage: records the summed token loss and returns what to
        backpropagate (it divides that by the accumulation steps itself)."""
        loss_sum = token_loss_sum(logits, targets)
        self._loss_sums.append(loss_sum.detach())
        return loss_sum * self._scale

    def _local_sums(self) -> torch.Tensor:
        total = sum(self._loss_sums, torch.zeros((), device=self.device))
        self._loss_sums = []
        return total

    def _run_micro_batches(self, batch: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        engine = self.engine
        micro_batches = split_micro_batches(batch, self.spec.micro_batch_size)
        total = torch.zeros((), device=self.device)
        engine.set_gradient_accumulation_boundary(False)
        coalesce = engine.coalesce_grad_reduction() if self.stage >= 1 else contextlib.nullcontext()
        with coalesce:
            for index, micro_batch in enumerate(micro_batches):
                if self.stage == 0:  # DDP-style: all-reduce after the last micro-batch only
                    engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
                loss_sum = forward_loss_sum(engine, micro_batch, self.device, self.spec.precision)
                engine.backward(loss_sum * scale, scale_wrt_gas=False)
                total += loss_sum.detach()
        engine.set_gradient_accumulation_boundary(True)
        return total

    def _stage0_grad_norm(self) -> torch.Tensor:
        """ZeRO stage 0 reports no norm: the global one over plain gradients that are whole on every
        data-parallel rank and either whole or AutoTP-split on the tensor-parallel ones."""
        total = torch.zeros((), device=self.device)
        for entry in self._state.entries:
            if entry.param.grad is not None:
                copies = self.layout.dp * (self.layout.tp if entry.tp_dim is None else 1)
                total += entry.param.grad.detach().float().square().sum() / copies
        if dist.get_world_size() > 1:
            dist.all_reduce(total)
        return total.sqrt()

    def train_step(self, batch: torch.Tensor) -> StepResult:
        batch = batch.to(self.device, non_blocking=True)
        count = global_target_count(batch, self.dp_size)
        scale = gradient_scale(count, self.dp_size)
        if self.pipeline:
            self._scale = scale * self.accumulation
            micro_batches = [inputs_and_targets(mb) for mb in split_micro_batches(batch, self.spec.micro_batch_size)]
            self.engine.train_batch(iter(micro_batches))
            loss_sum = self._local_sums()
        else:
            self.engine.train()
            loss_sum = self._run_micro_batches(batch, scale)
        norm = self._stage0_grad_norm() if self.stage == 0 and not self.pipeline else None
        if not self.pipeline:
            self.engine.step()
        if norm is None:
            norm = torch.as_tensor(self.engine.get_global_grad_norm(), dtype=torch.float32, device=self.device)
        # tensor-parallel peers hold equal sums; pipeline ranks before the last stage hold none
        return StepResult(loss=global_mean(loss_sum, count, copies=self.layout.tp), grad_norm=norm)

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        count = global_target_count(batch, self.dp_size)
        micro_batches = split_micro_batches(batch, self.spec.micro_batch_size)
        if self.pipeline:
            self.engine.eval_batch(iter([inputs_and_targets(mb) for mb in micro_batches]), reduce_output=None,
                                   bcast_loss=False, num_micro_batches=len(micro_batches))
            loss_sum = self._local_sums()
        else:
            self.engine.eval()
            loss_sum = sum(forward_loss_sum(self.engine, mb, self.device, self.spec.precision) for mb in micro_batches)
        return global_mean(loss_sum, count, copies=self.layout.tp)

    # -- checkpoint ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self._state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state.load_state_dict(state)

    def sampling_model(self) -> nn.Module | None:
        # every rank decodes in lockstep: ZeRO-3 gathers parameters in forward, AutoTP's head is whole
        return None if self.pipeline else self.model

    def teardown(self) -> None:
        from dtrain.parallel.deepspeed_private import forget_groups

        if self.engine is not None:
            self.engine.destroy()
            forget_groups()
        self.engine, self.model, self._optimizer, self._state = None, None, None, None
