"""Pipeline-parallel strategies: ``pp``, ``pp_fsdp`` (stages sharded with FSDP2) and ``3d`` (pp x dp x tp).

Each rank builds its stage(s) from the meta-device model (blocks of other stages deleted, names kept),
applies the same tensor-parallel / checkpointing / compile / FSDP plans as the sharded strategies to
each stage, and hands the stages to a torch.distributed.pipelining schedule that owns forward and
backward.

Micro-batching: a pipeline micro-batch is ``trainer.micro_batch_size`` sequences, as everywhere. A
rank's share of the global batch is ``accumulation = global / (micro x dp)`` micro-batches;
``strategy.microbatches`` is how many of them one schedule round pipelines (-1: all of them, one
round per step). Fewer per round bound the activations GPipe keeps alive at the cost of more
bubbles; gradients then accumulate over ``accumulation / microbatches`` rounds (with FSDP, each round
ends in a reduce-scatter: the schedule owns that).

Tied embeddings: the embedding lives on the first stage and the head on the last, so each keeps a copy
of the tied weight and their gradients are summed by one all-reduce per step between the two ranks
(``dtrain/parallel/tied.py``); a rank holding both stages (V schedules) uses one Parameter for both.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from dtrain.config.errors import ConfigError
from dtrain.distributed.env import DistEnv
from dtrain.distributed.parallel_dims import ParallelDims
from dtrain.models.gpt_plans import (
    share_tied_weight,
    split_problems,
    split_stage,
    stage_layer_counts,
    stages_view,
    tied_copies,
)
from dtrain.parallel.fsdp import reshard
from dtrain.parallel.grad_norm import clip_grad_norm
from dtrain.parallel.materialize import materialize
from dtrain.parallel.memory import optimizer_params
from dtrain.parallel.precision import apply_autocast
from dtrain.parallel.tied import TiedWeight, embedding_group
from dtrain.parallel.pipeline import (
    SPLIT_BACKWARD,
    build_schedule,
    canonical_schedule,
    forward_only,
    make_stage,
    schedule_problems,
    stage_ids,
    stage_owners,
    stages_per_rank,
)
from dtrain.strategies.base import OptimizerFactory, StepResult, StepSpec
from dtrain.strategies.layout import MeshDataParallel, common_problems, resolve_layout
from dtrain.strategies.loss import global_mean, global_target_count, gradient_scale, inputs_and_targets, token_loss_sum
from dtrain.strategies.sharded import model_problems, parallelize
from dtrain.strategies.state import get_model_optim_state, set_model_optim_state


def pipeline_shape(cfg: DictConfig, dims: ParallelDims) -> dict[str, int]:
    """Stages and micro-batches (per step and per schedule round) of a known schedule, from the config."""
    t, s = cfg.trainer, cfg.strategy
    per_rank = stages_per_rank(canonical_schedule(s.pp_schedule), s.pp_stages_per_rank)
    accumulation = t.global_batch_size // (t.micro_batch_size * dims.dp)
    microbatches = accumulation if s.microbatches == -1 else s.microbatches
    return {"stages_per_rank": per_rank, "stages": dims.pp * per_rank, "accumulation": accumulation,
            "microbatches": microbatches}


def pipeline_problems(cfg: DictConfig, dims: ParallelDims) -> list[str]:
    """Model, split, micro-batch and schedule problems of a pipeline config (schedule name already known)."""
    s, m, t = cfg.strategy, cfg.model, cfg.trainer
    shape = pipeline_shape(cfg, dims)
    problems = []
    if "n_layer" in m:
        problems += split_problems(m.n_layer, shape["stages"], s.get("pp_layers_per_stage"))
    else:
        problems.append(f"strategy.pp={dims.pp} needs a pipeline split for model._target_={m._target_}; only the "
                        "built-in GPT has one")
    if t.global_batch_size % (t.micro_batch_size * dims.dp):
        return problems  # reported by the generic batch check
    if s.microbatches != -1 and (s.microbatches < 1 or shape["accumulation"] % s.microbatches):
        problems.append(f"strategy.microbatches={s.microbatches} must divide the {shape['accumulation']} micro-batches "
                        f"of a rank's step (global {t.global_batch_size} / (micro {t.micro_batch_size} x dp "
                        f"{dims.dp})); use -1 for all of them in one round")
        return problems
    problems += schedule_problems(s.pp_schedule, dims.pp, shape["stages_per_rank"], shape["microbatches"])
    if s.compile and canonical_schedule(s.pp_schedule) in SPLIT_BACKWARD:
        problems.append(f"strategy.compile=true cannot be used with strategy.pp_schedule={s.pp_schedule}: torch "
                        "cannot split the backward of compiled stages; use 1F1B or Interleaved1F1B")
    return problems


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


class PipelineStrategy(MeshDataParallel):
    """Pipeline stages over the ``pp`` mesh dimension, each optionally FSDP- and TP-sharded."""

    def __init__(self, name: str, cfg: DictConfig, spec: StepSpec, env: DistEnv, device: torch.device):
        self.name, self.cfg, self.spec, self.env, self.device = name, cfg, spec, env, device
        dims, problems = resolve_layout(name, cfg, env.world_size)
        if problems:
            raise ConfigError(problems)
        self.dims: ParallelDims = dims
        self.schedule_name = canonical_schedule(cfg.pp_schedule)
        self.per_rank = stages_per_rank(self.schedule_name, cfg.pp_stages_per_rank)
        self.n_stages = dims.pp * self.per_rank
        self.pp_rank = dims.coordinates(env.rank)["pp"]
        self.stage_ids = stage_ids(self.pp_rank, dims.pp, self.per_rank, self.schedule_name)
        self.has_first = 0 in self.stage_ids
        self.has_last = self.n_stages - 1 in self.stage_ids
        self.mesh = None
        self.parts: list[nn.Module] = []
        self.view: nn.Module | None = None
        self.tied: TiedWeight | None = None  # this rank's copy of a tied embedding, if it holds one
        self.schedule = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._accumulation = 1  # micro-batches in a rank's share of the step
        self._microbatches = 1  # of which one schedule round pipelines this many
        self._scale = torch.ones(())  # this step's gradient scale (dp / global target count)

    @staticmethod
    def check_config(name: str, cfg: DictConfig, world_size: int) -> list[str]:
        problems = resolve_layout(name, cfg, world_size)[1] + common_problems(cfg)
        if canonical_schedule(cfg.pp_schedule) is None:
            problems += schedule_problems(cfg.pp_schedule, 1, 1, 1)
        return problems

    @staticmethod
    def check_fit(name: str, cfg: DictConfig, world_size: int) -> list[str]:
        dims, problems = resolve_layout(name, cfg.strategy, world_size)
        if problems or canonical_schedule(cfg.strategy.pp_schedule) is None:
            return []
        return model_problems(cfg, dims) + pipeline_problems(cfg, dims)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        assert self._optimizer is not None, "setup() first"
        return self._optimizer

    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        self.mesh = self.dims.build_mesh(self.device.type)
        counts = stage_layer_counts(model.n_layer, self.n_stages, self.cfg.get("pp_layers_per_stage"))
        self.parts = []
        for stage in self.stage_ids:
            part = parallelize(split_stage(model, stage, counts), self.dims, self.mesh, self.cfg)
            materialize(part, self.device, self.spec.seed)
            apply_autocast(part, self.device.type, self.spec.precision)
            self.parts.append(part)
        self.tied = self._tie_embedding()
        self.view = stages_view(self.parts)
        followers = {id(p) for p in self.tied.followers} if self.tied else set()
        self._optimizer = build_optimizer((name, p) for name, p in self.view.named_parameters()
                                          if id(p) not in followers)
        group = self.mesh["pp"].get_group()
        stages = [make_stage(part, stage, self.n_stages, self.device, group)
                  for part, stage in zip(self.parts, self.stage_ids)]
        micro = self.spec.micro_batch_size
        self._accumulation = self.spec.global_batch_size // (micro * self.dims.dp)
        self._microbatches = self._accumulation if self.cfg.microbatches == -1 else self.cfg.microbatches
        self.schedule = build_schedule(self.schedule_name, stages, self._microbatches, self._scaled_loss)

    def _tie_embedding(self) -> TiedWeight | None:
        """This rank's copy of a tied embedding: one Parameter where the rank holds the first and the last
        stage (FSDP2 keeps two: the head's follows the embedding's), summed over the embedding group
        with the other stage's copy otherwise (see dtrain/parallel/tied.py)."""
        if not self.parts[0].tie_embeddings:
            return None
        owners = stage_owners(self.dims.pp, self.per_rank, self.schedule_name)
        group = embedding_group(self.dims, self.mesh, owners[0], owners[-1])  # collective: every rank
        share_tied_weight(self.parts)
        copies = tied_copies(self.parts)
        return TiedWeight(copies[0], copies[1:], group) if copies else None

    def _scaled_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A micro-batch's loss sum times the step's gradient scale, so gradients need no rescaling
        afterwards. No side effects: the schedule also calls it on placeholder tensors to infer shapes."""
        return token_loss_sum(logits, targets) * self._scale

    def _loss_context(self) -> contextlib.AbstractContextManager:
        """Vocabulary-sharded logits on the last stage (tp > 1): loss on the shards, forward and backward."""
        return loss_parallel() if self.dims.tp > 1 else contextlib.nullcontext()

    def _mean(self, loss_sum: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """Only last-stage ranks hold a loss sum, equal among their tensor-parallel peers."""
        return global_mean(loss_sum if self.has_last else torch.zeros_like(loss_sum), count, copies=self.dims.tp)

    def train_step(self, batch: torch.Tensor) -> StepResult:
        for part in self.parts:
            part.train()
        batch = batch.to(self.device, non_blocking=True)
        count = global_target_count(batch, self.dp_size)
        self._scale = gradient_scale(count, self.dp_size)
        scaled: list[torch.Tensor] = []  # the real micro-batches' scaled losses (last stage only)
        for round_batch in batch.chunk(self._accumulation // self._microbatches):
            inputs, targets = inputs_and_targets(round_batch)
            args = (inputs,) if self.has_first else ()
            losses: list[torch.Tensor] = []  # the schedule clears the list it is given
            with self._loss_context():
                self.schedule.step(*args, target=targets if self.has_last else None, losses=losses)
            scaled += losses
        loss_sum = sum((_full(loss.detach()) for loss in scaled), torch.zeros((), device=self.device)) / self._scale
        if self.tied is not None:
            self.tied.reduce_gradients()
        copies = {self.tied.param: self.tied.copies} if self.tied is not None else None
        # a plain (unsharded) parameter would be repeated on every rank of its stage; followers are not stepped
        grad_norm = clip_grad_norm(optimizer_params(self.optimizer), self.spec.grad_clip,
                                   plain_replicas=self.dims.dp * self.dims.tp * self.dims.cp, stage_copies=copies)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.tied is not None:
            self.tied.sync_followers()
        return StepResult(loss=self._mean(loss_sum, count), grad_norm=grad_norm)

    @torch.no_grad()
    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            part.eval()
        batch = batch.to(self.device, non_blocking=True)
        count = global_target_count(batch, self.dp_size)
        micro_batches = [inputs_and_targets(mb) for mb in batch.split(self.spec.micro_batch_size)]
        owners = stage_owners(self.dims.pp, self.per_rank, self.schedule_name)
        with self._loss_context():
            loss_sum = forward_only(dict(zip(self.stage_ids, self.parts)), owners, self.pp_rank,
                                    self.mesh["pp"].get_group(), micro_batches,
                                    lambda logits, targets: _full(token_loss_sum(logits, targets)))
        reshard(self.parts)
        return self._mean(loss_sum, count)

    def state_dict(self) -> dict[str, Any]:
        return get_model_optim_state(self.view, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_optim_state(self.view, self.optimizer, state)
        if self.tied is not None:
            self.tied.sync_followers()

    def sampling_model(self) -> nn.Module | None:
        return None  # no rank holds the whole model

    def teardown(self) -> None:
        self.parts, self.view, self.schedule, self._optimizer, self.mesh = [], None, None, None, None
        self.tied = None
