"""End to end through real torchrun on gloo: parity with one process, metrics, bad input, rank agreement."""

from __future__ import annotations

import time

import pytest
from omegaconf import OmegaConf

from tests.helpers import TINY, TINY_TRAIN, dtrain_single, read_metrics, torchrun

STEPS = 8


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    result = dtrain_single([*TINY, "strategy=single", f"trainer.max_steps={STEPS}", f"run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_ddp_on_two_ranks_matches_one_process(reference_run, tmp_path):
    result = torchrun(2, [*TINY, "strategy=ddp", f"trainer.max_steps={STEPS}", f"run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    single, ddp = read_metrics(reference_run), read_metrics(tmp_path)
    assert [r["step"] for r in ddp] == list(range(1, STEPS + 1))
    for a, b in zip(single, ddp):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert single[-1]["loss"] < single[0]["loss"]
    for key in ("step", "loss", "lr", "step_time_s", "tokens_per_s", "data_wait_share", "grad_norm",
                "peak_mem_gib", "model_flops_per_s_per_device"):
        assert key in ddp[0], key
    # one shared run directory, with the resolved config every rank agreed on
    saved = OmegaConf.load(tmp_path / "config.yaml")
    assert saved.strategy.name == "ddp" and saved.run.dir == str(tmp_path)
    assert "[rank1]" not in result.stdout  # console progress comes from rank 0 only


def test_quickstart_shape_run_prints_a_sample(tmp_path):
    result = torchrun(2, [*TINY, "trainer.max_steps=3", "trainer.sample_tokens=20", "trainer.eval_every=3",
                          f"run.dir={tmp_path}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("--- sample after 3 steps ---") == 1
    assert "val" in result.stdout
    assert "val_loss" in read_metrics(tmp_path)[-1]


@pytest.mark.parametrize("overrides,message", [
    (["strategy=nope"], "unknown strategy 'nope'; choose one of: 3d, ddp, ds_pp, ds_tp, fsdp, fsdp_tp, hsdp, pp, "
                        "pp_fsdp, single, tp, zero1, zero2, zero3"),
    (["trainer.global_batch_size=6"], "trainer.global_batch_size=6 is not divisible by micro_batch_size x "
                                      "data-parallel size = 2 x 2 = 4"),
    (["strategy=single"], "strategy=single runs one process but the world size is 2"),
    (["data=memmap", "data.train_path=/missing.bin"], "data.train_path=/missing.bin does not exist"),
])
def test_bad_input_fails_fast_on_every_rank_with_one_line(tmp_path, overrides, message):
    start = time.monotonic()
    result = torchrun(2, [*TINY_TRAIN, *overrides, f"run.dir={tmp_path / 'run'}"], timeout=120)
    assert result.returncode != 0
    assert message in result.stderr
    ours = [line for line in result.stderr.splitlines() if "dtrain: config error" in line]
    assert len(ours) == 1, ours  # printed once (local rank 0), not once per rank
    before_ours = result.stderr.split("dtrain: config error", 1)[0]
    assert "Traceback" not in before_ours  # our line comes before torchrun's own failure summary
    # the workers print no traceback; the only one is torchrun's own ChildFailedError summary
    assert "/dtrain/" not in result.stderr and result.stderr.count("Traceback") <= 1
    assert not (tmp_path / "run").exists()  # nothing was created before the error
    assert time.monotonic() - start < 60


def test_ranks_with_different_resolved_configs_refuse_to_train(tmp_path):
    # each rank resolves LOCAL_RANK itself, so the seeds differ between ranks
    result = torchrun(2, [*TINY, "trainer.seed=${oc.env:LOCAL_RANK}", f"run.dir={tmp_path}"], timeout=120)
    assert result.returncode != 0
    assert "ranks resolved different configs" in result.stderr
    assert not (tmp_path / "metrics.jsonl").exists()
