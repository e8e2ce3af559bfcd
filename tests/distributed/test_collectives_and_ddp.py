"""Real gloo process groups on 2 ranks: collectives, and DDP that syncs once per step and matches one process."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from dtrain.distributed import collectives
from dtrain.distributed.env import discover_env
from dtrain.strategies import StepSpec
from dtrain.strategies.native import NativeStrategy
from tests.helpers import spawn_workers


def test_collectives_are_noops_without_a_group():
    value = torch.tensor([3.0])
    assert collectives.all_reduce_mean(value).item() == 3.0
    assert collectives.all_gather_object("x") == ["x"]


def test_collectives_refuse_to_silently_skip_when_a_group_is_expected(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="no process group exists"):
        collectives.all_reduce_mean(torch.tensor([1.0]))


def _collectives_worker(rank: int, world: int) -> None:
    assert collectives.all_reduce_mean(torch.tensor([float(rank)])).item() == pytest.approx(0.5)
    assert collectives.all_reduce_sum(torch.tensor([1.0])).item() == world
    assert collectives.all_reduce_max(torch.tensor([rank])).item() == 1
    assert collectives.all_gather_object(rank * 10) == [0, 10]
    assert collectives.broadcast_object({"r": rank}) == {"r": 0}


def test_collectives_on_two_ranks():
    spawn_workers(_collectives_worker, 2)


def _model_cfg():
    from dtrain.config.validate import load_config

    return load_config(["model=gpt_tiny", "model.n_layer=2", "model.d_model=32", "model.n_head=2",
                        "data=synthetic", "data.seq_len=16", "data.vocab_size=64", "run.name=t"], 1)


def _gradients_after_one_step(name: str, batch: torch.Tensor, world: int, rank: int):
    from dtrain.models import build_model
    from dtrain.optim import build_optimizer

    cfg = _model_cfg()
    spec = StepSpec(global_batch_size=8, micro_batch_size=2, grad_clip=0.0, precision="fp32", seed=11)
    strategy = NativeStrategy(name, cfg.strategy, spec, discover_env(), torch.device("cpu"))
    strategy.setup(build_model(cfg.model, 11), lambda named: build_optimizer(named, cfg.optim))
    # count gradient all-reduces: DDP calls the comm hook once per bucket per synced backward
    calls = []
    if name == "ddp":
        def counting_hook(state, bucket):
            calls.append(bucket.index())
            return allreduce_hook(None, bucket)

        strategy.model.register_comm_hook(None, counting_hook)
    params_before = {n: p.detach().clone() for n, p in strategy.sampling_model().named_parameters()}
    local = batch.chunk(world)[rank]
    result = strategy.train_step(local)
    params_after = {n: p.detach().clone() for n, p in strategy.sampling_model().named_parameters()}
    return result, params_before, params_after, calls


def _ddp_worker(rank: int, world: int, batch: torch.Tensor, reference: dict) -> None:
    result, before, after, calls = _gradients_after_one_step("ddp", batch, world, rank)
    # accumulation 2 per rank: one synced backward -> each bucket reduced exactly once
    assert len(calls) == len(set(calls)) and len(calls) >= 1
    assert result.loss.item() == pytest.approx(reference["loss"], abs=1e-6)
    assert result.grad_norm.item() == pytest.approx(reference["grad_norm"], rel=1e-5)
    for name, value in after.items():
        torch.testing.assert_close(value, reference["after"][name], rtol=1e-5, atol=1e-6)
    gathered = collectives.all_gather_object({k: v for k, v in after.items()})
    for name in after:
        assert torch.equal(gathered[0][name], gathered[1][name]), f"replicas diverged at {name}"


def test_ddp_step_equals_single_process_step_and_syncs_once():
    batch = torch.randint(0, 64, (8, 17), generator=torch.Generator().manual_seed(0))
    result, before, after, _ = _gradients_after_one_step("single", batch, 1, 0)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    reference = {"loss": result.loss.item(), "grad_norm": result.grad_norm.item(), "after": after}
    spawn_workers(_ddp_worker, 2, batch, reference)


def _hash_worker(rank: int, world: int) -> None:
    from dtrain.cli import _agree_on_config
    from dtrain.config.errors import ConfigError
    from dtrain.config.validate import load_config

    same = load_config(["run.name=t"], world)
    _agree_on_config(same)
    different = load_config(["run.name=t", f"trainer.seed={rank}"], world)
    with pytest.raises(ConfigError, match=r"ranks \[0\] have hash .*ranks \[1\] have hash"):
        _agree_on_config(different)


def test_ranks_that_resolved_different_configs_are_named():
    spawn_workers(_hash_worker, 2)
