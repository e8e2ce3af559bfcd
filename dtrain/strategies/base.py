"""The strategy protocol: everything that differs between parallelisms, behind five calls.

A strategy owns the step, not just the wrapping: a pipeline schedule or a DeepSpeed engine runs
forward, backward and the optimizer step itself, so the trainer hands over one global step's local
batch and gets back the loss. The trainer never asks which strategy it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

# Builds the optimizer for the parameters a rank holds (after sharding or pipeline splitting).
OptimizerFactory = Callable[[Iterable[tuple[str, nn.Parameter]]], torch.optim.Optimizer]


@dataclass(frozen=True)
class StepSpec:
    """What one optimizer step means, derived once from the trainer config."""

    global_batch_size: int
    micro_batch_size: int
    grad_clip: float
    precision: str  # fp32 | bf16
    seed: int


@dataclass
class StepResult:
    loss: torch.Tensor  # mean token loss over the whole global batch, equal on every rank
    grad_norm: torch.Tensor  # global gradient norm before clipping


class Strategy(Protocol):
    name: str

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (which slice of the batch it reads)."""

    @property
    def dp_size(self) -> int: ...

    @property
    def optimizer(self) -> torch.optim.Optimizer: ...

    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory) -> None:
        """Shard or wrap the (meta-device) model, materialize and initialize it, build the optimizer."""

    def train_step(self, batch: torch.Tensor) -> StepResult:
        """One optimizer step on this rank's share ``[global/dp, T+1]`` of the global batch."""

    def eval_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Mean token loss of a validation batch, averaged over the data-parallel ranks."""

    def state_dict(self) -> dict[str, Any]:
        """``{"model": ..., "optim": ...}`` in torch.distributed.checkpoint form (sharded where sharded).
        Collective: every rank calls it (a DeepSpeed strategy assembles parameters across ranks)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def sampling_model(self) -> nn.Module | None:
        """A module every rank can call forward on for text generation, or None if unsupported."""

    def teardown(self) -> None: ...
