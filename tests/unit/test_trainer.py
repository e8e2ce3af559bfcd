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
    assert run([*SMALL, "trainer.max_steps=4", "trainer.data_workers=2", "trainer.eval_every=2",
                "trainer.eval_batches=2", "trainer.sample_tokens=16", f"run.dir={tmp_path}"]) == 0
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "val_loss" in r] == [2, 4]
    out = capsys.readouterr().out
    assert "--- sample after 4 steps ---" in out and out.count("def ") >= 1
