"""Every DeepSpeed internal dtrain touches, in one place, each with the reason no public API serves.

tests/unit/test_deepspeed_private.py checks that each still exists with the shape relied on, so a
DeepSpeed upgrade that moves one fails there, by name, rather than in the middle of a run.

- ``deepspeed.ops.__compatible_ops__``: on a CPU accelerator DeepSpeed JIT-compiles a shared-memory
  all-reduce op (~45 s on 2 cores) when its comm backend starts; dtrain's CPU runs use gloo, so it is
  marked unavailable first.
- The ZeRO optimizers' flat fp32 partitions (``single_partition_of_fp32_groups`` for stages 1-2,
  ``fp32_partitioned_groups_flat`` with ``sub_group_to_group_id`` for stage 3): the base optimizer's
  state is keyed by them. dtrain creates that state at start-up (AdamW creates it lazily on the first
  step), so a checkpoint has the same entries before and after the first step, and a resume can fill
  them in; stages 1-2 then link each parameter's view into that state
  (``_lazy_init_hp_params_optimizer_state``, which DeepSpeed itself only calls after a step).
- ``deepspeed.utils.groups`` module globals: DeepSpeed keeps its tensor/data-parallel groups and mpu
  there for the life of the process; a second engine in the same process (tests, a notebook) must not
  inherit the first one's groups.
"""

from __future__ import annotations

from typing import Any

import torch


def skip_shm_comm_compile() -> None:
    """Keep DeepSpeed from compiling its CPU shared-memory all-reduce (must run before its comm starts)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def fp32_partitions(zero_optimizer: Any) -> list[tuple[int, torch.Tensor]]:
    """(param group index, flat fp32 partition) pairs this rank's base optimizer steps."""
    if hasattr(zero_optimizer, "fp32_partitioned_groups_flat"):  # stage 3: sub-groups of param groups
        groups = zero_optimizer.sub_group_to_group_id
        return [(groups[i], flat) for i, flat in enumerate(zero_optimizer.fp32_partitioned_groups_flat)]
    return list(enumerate(zero_optimizer.single_partition_of_fp32_groups))


def link_optimizer_state(zero_optimizer: Any) -> None:
    """Point stage 1-2 parameters' fragments at base optimizer state created outside a step."""
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        zero_optimizer._lazy_init_hp_params_optimizer_state()


_GROUP_GLOBALS = ("mpu", "mesh_device", "_TENSOR_MODEL_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP",
                  "_MPU_TENSOR_MODEL_PARALLEL_WORLD_SIZE", "_MPU_TENSOR_MODEL_PARALLEL_RANK")


def forget_groups() -> None:
    """Drop the process groups DeepSpeed cached for the last engine."""
    from deepspeed.utils import groups

    for name in _GROUP_GLOBALS:
        setattr(groups, name, None)
