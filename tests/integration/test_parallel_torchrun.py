"""End to end through real torchrun: the CLI, the loader's data-parallel slicing, the unchanged trainer
loop and the strategies together give the single-process losses for 10 steps; bad layouts fail
before any rank starts work.

One run per family and world size (process start-up dominates on 2 cores); the wider matrix of
schedules and options runs in tests/distributed/test_parallel_strategies.py.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers import TINY_DATA, TINY_TRAIN, dtrain_single, read_metrics, torchrun

STEPS = 10
# the default tied model everywhere: pipelines keep a copy of the embedding on the last stage (3d@8 with
# FSDP and tensor parallel shards of it) and sum the copies' gradients
PARITY = [*TINY_TRAIN, *TINY_DATA, "model.n_layer=4", f"trainer.max_steps={STEPS}"]
LOSS_ATOL, NORM_RTOL = 1e-5, 1e-4  # fp32; observed differences are ~1e-6


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    result = dtrain_single([*PARITY, "strategy=single", f"run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5  # it learns (by 0.58 in 10 steps), so matching is not trivial
    return rows


@pytest.mark.parametrize("nproc,overrides", [
    (2, ["strategy=tp", "trainer.micro_batch_size=4"]),
    (2, ["strategy=pp", "strategy.pp_schedule=Interleaved1F1B"]),
    (8, ["strategy=3d", "trainer.micro_batch_size=4", "strategy.pp_schedule=GPipe"]),
], ids=["tp@2", "pp-interleaved@2", "3d@8"])
def test_losses_match_one_process_step_by_step(reference, tmp_path, nproc, overrides):
    result = torchrun(nproc, [*PARITY, *overrides, f"run.dir={tmp_path}"], timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for a, b in zip(reference, rows):
        assert abs(b["loss"] - a["loss"]) <= LOSS_ATOL, (a["step"], a["loss"], b["loss"])
        assert abs(b["grad_norm"] - a["grad_norm"]) <= NORM_RTOL * a["grad_norm"], (a["step"], a["grad_norm"],
                                                                                    b["grad_norm"])
    # one start-up line with the per-rank memory estimate, from rank 0 only
    lines = [line for line in result.stderr.splitlines() if "memory estimate per rank" in line]
    assert len(lines) == 1 and "[rank0]" in lines[0] and "params" in lines[0] and "activations" in lines[0], lines


def test_a_layout_the_model_cannot_take_fails_fast_with_one_line(tmp_path):
    start = time.monotonic()
    result = torchrun(2, [*TINY_TRAIN, "strategy=tp", "model.n_head=3", "model.d_model=96",
                          f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if "dtrain: config error" in line]
    assert ours == ["[rank0] dtrain: config error: strategy.tp=2 does not divide model.n_head=3; pick a tp degree "
                    "that divides it"], ours
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - start < 60
