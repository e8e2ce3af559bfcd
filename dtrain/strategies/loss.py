"""The loss of one optimizer step: the mean cross entropy over every target token of the global batch.

Token-weighted, not a mean of per-micro-batch or per-rank means: a sample may mark positions with
``IGNORE_INDEX`` (padding, masked prompts), so micro-batches hold different numbers of targets, and
a mean of means would weigh a token of a short sample more than one of a long sample, differently
under every strategy and micro-batch size. Each rank therefore learns the global number of targets
before the step (one tiny all-reduce), backpropagates ``sum of its token losses x dp / count`` (data
parallelism then averages gradients over the ``dp`` replicas, which leaves exactly ``1 / count``), and
reports ``sum over all ranks / count``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from dtrain.distributed import collectives

IGNORE_INDEX = -100  # a token id < 0 in a sample: not a target, fed to the model as token 0

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def inputs_and_targets(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T+1]`` samples -> inputs ``[B, T]`` (ignored positions read as token 0) and targets ``[B, T]``."""
    return batch[:, :-1].clamp(min=0), batch[:, 1:]


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross entropies over the targets that are not ``IGNORE_INDEX`` (float32 softmax).

    ``logits`` may be a vocabulary-sharded DTensor: under ``loss_parallel`` the softmax is computed on
    the shards and the full logits are never gathered."""
    return F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def target_count(batch: torch.Tensor) -> torch.Tensor:
    """Targets that count in a ``[B, T+1]`` batch (int64, on the batch's device)."""
    return (batch[:, 1:] != IGNORE_INDEX).sum()


def global_target_count(local_batch: torch.Tensor, dp_size: int) -> torch.Tensor:
    """Targets in the whole global batch, on every rank. Each data-parallel slice is read by
    ``world / dp`` ranks (its tensor- and pipeline-parallel peers), so the world sum counts it that often."""
    total = collectives.all_reduce_sum(target_count(local_batch))
    return total // (collectives.world_size() // dp_size)


def gradient_scale(count: torch.Tensor, dp_size: int) -> torch.Tensor:
    """Factor on a rank's loss sum before backward, so that gradients averaged over ``dp`` replicas are
    those of the global token mean. A count of 0 (every target ignored) gives zero gradients, not NaN."""
    return dp_size / count.clamp(min=1).to(torch.float32)


def global_mean(local_sum: torch.Tensor, count: torch.Tensor, copies: int) -> torch.Tensor:
    """The step's token mean on every rank, from each rank's loss sum. ``copies``: how many ranks hold
    the same sum for one data-parallel slice (its tensor-parallel peers, and pipeline peers unless only
    the last stage reports one), so each contributes ``1 / copies`` of it."""
    return collectives.all_reduce_sum(local_sum / copies) / count.clamp(min=1).to(torch.float32)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])
