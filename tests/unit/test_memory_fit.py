"""A plan that cannot fit the device is refused before the first step; near the limit, a warning."""

from __future__ import annotations

import pytest

from dtrain.cli import run
from dtrain.parallel import memory

SMALL = ["strategy=single", "model.n_layer=1", "model.d_model=32", "data.seq_len=16", "data.max_bytes=200000",
         "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.eval_every=0",
         "trainer.sample_tokens=0", "logging.progress=off", "trainer.max_steps=2"]


@pytest.fixture
def tiny_ram(monkeypatch):
    monkeypatch.setattr(memory, "_mem_available", lambda: 2**16)


def test_a_plan_over_the_limit_is_refused_with_the_numbers_and_the_knobs(tmp_path, capsys, tiny_ram):
    assert run([*SMALL, f"run.dir={tmp_path}"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dtrain:")]
    assert len(lines) == 1, lines
    line = lines[0]
    assert "rank 0 would need about" in line and "but has 64.00 KiB (64.00 KiB available RAM / 1 ranks" in line
    for knob in ("trainer.micro_batch_size", "activation_checkpointing=full", "fsdp", "more ranks",
                 "trainer.allow_memory_overcommit=true"):
        assert knob in line, knob
    assert not (tmp_path / "metrics.jsonl").exists() and not list(tmp_path.glob("checkpoints/step_*"))


def test_overcommit_can_be_allowed(tmp_path, capsys, tiny_ram):
    assert run([*SMALL, "trainer.allow_memory_overcommit=true", f"run.dir={tmp_path}"]) == 0
    assert "allowed by trainer.allow_memory_overcommit=true" in capsys.readouterr().err


def test_near_the_limit_is_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(memory, "NEAR_LIMIT", 0.0)
    assert run([*SMALL, f"run.dir={tmp_path}"]) == 0
    assert "it may run out of memory" in capsys.readouterr().err


def test_the_limit_is_this_nodes_available_memory_shared_by_its_ranks():
    import torch

    whole, _ = memory.device_memory_limit(torch.device("cpu"), 1)
    quarter, source = memory.device_memory_limit(torch.device("cpu"), 4)
    assert 0 < quarter <= whole // 4 + 1 and "/ 4 ranks on this node" in source
