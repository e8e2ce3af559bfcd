"""The DeepSpeed internals dtrain touches (all in dtrain/parallel/deepspeed_private.py) and the public
helpers it builds on still have the shape it relies on. A DeepSpeed upgrade that moves one fails here,
by name, instead of a run failing mid-save."""

from __future__ import annotations

import inspect

import pytest

deepspeed = pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")


def test_the_cpu_shared_memory_op_can_be_marked_unavailable():
    import deepspeed.ops

    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__
    import importlib

    backend = importlib.import_module("deepspeed.comm.torch")  # not torch itself, which deepspeed.comm imports
    assert "__compatible_ops__" in inspect.getsource(backend.build_shm_op)


def test_zero_optimizers_keep_their_flat_fp32_partitions_where_dtrain_reads_them():
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    stage12 = inspect.getsource(DeepSpeedZeroOptimizer)
    assert "self.single_partition_of_fp32_groups" in stage12
    assert callable(DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state)
    stage3 = inspect.getsource(DeepSpeedZeroOptimizer_Stage3)
    assert "self.fp32_partitioned_groups_flat" in stage3 and "self.sub_group_to_group_id" in stage3


def test_the_group_globals_dtrain_resets_exist():
    from deepspeed.utils import groups

    from dtrain.parallel.deepspeed_private import _GROUP_GLOBALS

    missing = [name for name in _GROUP_GLOBALS if not hasattr(groups, name)]
    assert not missing, missing


def test_the_public_helpers_and_engine_calls_dtrain_uses_exist():
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                                 safe_set_full_optimizer_state)

    for helper in (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_set_full_fp32_param,
                   safe_set_full_optimizer_state):
        assert callable(helper)
    for method in ("coalesce_grad_reduction", "set_gradient_accumulation_boundary", "get_global_grad_norm", "destroy"):
        assert callable(getattr(DeepSpeedEngine, method)), method
    # backward is wrapped (nvtx), so its signature is read from the source
    assert "def backward(self, loss, retain_graph=False, scale_wrt_gas=True)" in inspect.getsource(DeepSpeedEngine)
    eval_batch = inspect.signature(PipelineEngine.eval_batch).parameters
    assert {"reduce_output", "bcast_loss", "num_micro_batches"} <= set(eval_batch)
