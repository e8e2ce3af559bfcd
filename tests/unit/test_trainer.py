"""The loop in one process: bf16 autocast, worker processes for data, evaluation and sampling."""

from __future__ import annotations

import math

from dtrain.cli import run
from tests.helpers import read_metrics

SMALL = ["strategy=single", "model.n_layer=1", "model.d_model=32", "data.seq_len=16", "data.max_bytes=200000",
         "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.log_every=1", "logging.progress=off",
         "checkpoint.interval_steps=0", "checkpoint.save_final=false"]


def test_bf16_autocast_trains_close_to_fp32(tmp_path):
    assert run([*SMALL, "trainer.max_steps=4", "trainer.eval_every=0", "trainer.sample_tokens=0",
                f"run.dir={tmp_path / 'fp32'}"]) == 0
    assert run([*SMALL, "trainer.max_steps=4", "trainer.eval_every=0", "trainer.sample_tokens=0",
                "trainer.precision=bf16", f"run.dir={tmp_path / 'bf16'}"]) == 0
    fp32, bf16 = read_metrics(tmp_path / "fp32"), read_metrics(tmp_path / "bf16")
    assert all(math.isfinite(r["loss"]) for r in bf16)
    assert bf16[0]["loss"] != fp32[0]["loss"]  # autocast really changed the arithmetic
    assert abs(bf16[-1]["loss"] - fp32[-1]["loss"]) < 0.1


def test_data_workers_eval_and_sample(tmp_path, capsys):
    """The printed sample is the trained model's own greedy continuation of the prompt: decoded again here,
    independently, from the weights of the final checkpoint."""
    import torch
    from safetensors.torch import load_file

    from dtrain.checkpoint.cli import main as ckpt
    from dtrain.models.gpt import GPT

    assert run([*SMALL, "trainer.max_steps=4", "trainer.data_workers=2", "trainer.eval_every=2",
                "trainer.eval_batches=2", "trainer.sample_tokens=16", "trainer.sample_temperature=0",
                "checkpoint.save_final=true", f"run.dir={tmp_path}"]) == 0
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    out = capsys.readouterr().out
    printed = out.split("--- sample after 4 steps ---\n", 1)[1].split("\n--- end of sample ---", 1)[0]
    assert ckpt(["export", str(tmp_path / "checkpoints" / "step_00000004"), str(tmp_path / "m.safetensors")]) == 0
    model = GPT(vocab_size=256, seq_len=16, n_layer=1, n_head=4, d_model=32)
    model.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=False)
    model.tie_weights()
    model.eval()
    tokens = list(b"def ")
    with torch.no_grad():
        for _ in range(16):
            logits = model(torch.tensor([tokens[-16:]]))
            tokens.append(int(logits[0, -1].argmax()))
    expected = bytes(tokens).decode("utf-8", errors="replace")
    assert printed == expected and len(printed) > len("def "), (printed, expected)


def test_building_a_fresh_trainer_leaves_the_optimizer_untouched(tmp_path):
    """The start-up save-time estimate must not build the optimizer's state dict: on a fresh optimizer that
    runs a zero step, so rank 0 alone would start with Adam's step count at 1 and DDP replicas drift apart
    (and an interrupted run would not resume to the uninterrupted run's losses)."""
    import torch

    from dtrain.config.validate import load_config
    from dtrain.distributed.env import discover_env
    from dtrain.trainer import Trainer

    cfg = load_config([*SMALL, "trainer.max_steps=2", "trainer.eval_every=0", f"run.dir={tmp_path}"], 1)
    trainer = Trainer.build(cfg, discover_env(), torch.device("cpu"), write_bandwidth=1e9)
    try:
        assert not trainer.strategy.optimizer.state
    finally:
        trainer.checkpoints.close()
        trainer.preemption.close()
