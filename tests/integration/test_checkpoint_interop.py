"""Checkpoints move between strategies and world sizes through the real trainer and checkpoint manager.

A ddp@2 run is the reference; the other runs start from one of its (or each other's) committed steps
under another strategy or world size, and must continue with the reference's losses (fp32, CPU).
"""

from __future__ import annotations

import shutil

import pytest

from tests.helpers import TINY, read_metrics, torchrun

STEPS = 12
COMMON = [*TINY, "model.tie_embeddings=false", "checkpoint.interval_steps=4", "checkpoint.keep_last=3",
          f"trainer.max_steps={STEPS}"]
LOSS_ATOL = 1e-5


def losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir)}


def continue_from(source, step: int, run_dir, nproc: int, strategy: list[str]) -> None:
    """Copy the source's committed steps up to ``step`` into a fresh run and resume it there."""
    for folder in sorted((source / "checkpoints").glob("step_*")):
        if int(folder.name[5:]) <= step:
            shutil.copytree(folder, run_dir / "checkpoints" / folder.name)
    result = torchrun(nproc, [*COMMON, *strategy, f"run.dir={run_dir}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"step_{step:08d}" in result.stderr.split("resumed from", 1)[1].splitlines()[0]


def assert_continues(reference, run_dir, first: int) -> None:
    expected, got = losses(reference), losses(run_dir)
    assert sorted(got) == list(range(first, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(expected[step], abs=LOSS_ATOL), (step, got[step], expected[step])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """ddp@2 (reference) -> fsdp@2 from its step 4, both to step 12."""
    ref, fsdp = tmp_path_factory.mktemp("ddp2"), tmp_path_factory.mktemp("fsdp2")
    result = torchrun(2, [*COMMON, "strategy=ddp", f"run.dir={ref}"])
    assert result.returncode == 0, result.stderr[-3000:]
    continue_from(ref, 4, fsdp, 2, ["strategy=fsdp"])
    return ref, fsdp


def test_ddp_to_fsdp(chain):
    ref, fsdp = chain
    assert_continues(ref, fsdp, 5)


@pytest.mark.parametrize("strategy", [["strategy=tp"], ["strategy=pp", "strategy.pp_schedule=1F1B"]],
                         ids=["fsdp@2->tp@2", "fsdp@2->pp@2"])
def test_fsdp_to_tp_and_pp(chain, tmp_path, strategy):
    ref, fsdp = chain
    continue_from(fsdp, 8, tmp_path, 2, strategy)
    assert_continues(ref, tmp_path, 9)


def test_ddp2_to_fsdp4_to_fsdp2(chain, tmp_path_factory):
    ref, _ = chain
    fsdp4, fsdp2 = tmp_path_factory.mktemp("fsdp4"), tmp_path_factory.mktemp("fsdp2b")
    continue_from(ref, 4, fsdp4, 4, ["strategy=fsdp"])
    assert_continues(ref, fsdp4, 5)
    continue_from(fsdp4, 8, fsdp2, 2, ["strategy=fsdp"])
    assert_continues(ref, fsdp2, 9)
