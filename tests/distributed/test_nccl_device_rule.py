"""dtrain's own collectives obey NCCL's device rule, checked on CPU.

NCCL has no backend for CPU tensors, so every tensor dtrain puts into a collective outside the model
(preemption vote, config-hash check, loss and metric reductions, pipeline headers, checkpoint
coordination) must live on the training device. ``nccl_device_rule`` (tests/helpers.py) makes a
tensor created without an explicit device fail in a collective exactly as a CPU tensor fails on NCCL;
a 2-rank run then trains, evaluates, votes on a preemption signal, saves and commits under it.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch

from tests.helpers import nccl_device_rule, spawn_workers

COMMON = ["model=gpt_tiny", "model.n_layer=2", "model.d_model=32", "model.n_head=2", "data=synthetic",
          "data.seq_len=16", "data.vocab_size=64", "run.name=nccl-rule", "trainer.global_batch_size=8",
          "trainer.micro_batch_size=2", "trainer.max_steps=50", "trainer.eval_every=2", "trainer.eval_batches=1",
          "trainer.sample_tokens=0", "logging.progress=off", "checkpoint.interval_steps=2"]  # tied: pp sums the copies


def _train_vote_and_save(rank: int, world: int, overrides: list[str], run_dir: str) -> None:
    from dtrain.checkpoint.manager import committed_steps
    from dtrain.checkpoint.preemption import Preempted
    from dtrain.checkpoint.storage import Storage
    from dtrain.cli import _agree_on_config
    from dtrain.config.validate import load_config
    from dtrain.distributed.env import discover_env
    from dtrain.trainer import Trainer

    nccl_device_rule()
    cfg = load_config([*COMMON, *overrides, f"run.dir={run_dir}"], world)
    _agree_on_config(cfg)
    trainer = Trainer.build(cfg, discover_env(), torch.device("cpu"))
    try:
        trainer.advance()
        metrics = trainer.advance()  # evaluates and saves step 2
        assert "val_loss" in metrics and "ckpt_blocked_s" in metrics
        if rank == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # one rank hears the signal; the vote tells the other
        with pytest.raises(Preempted):
            for _ in range(3):
                trainer.advance()
    finally:
        trainer.checkpoints.close()
        trainer.preemption.close()
    assert trainer.step == 4
    assert committed_steps(Storage(f"{run_dir}/checkpoints")) == [2, 4]


@pytest.mark.parametrize("overrides", [["strategy=ddp"], ["strategy=pp"]], ids=["ddp", "pp"])
def test_train_eval_vote_and_save_obey_nccl_device_rule(tmp_path, overrides):
    spawn_workers(_train_vote_and_save, 2, overrides, str(tmp_path))
