"""A DeepSpeed run end to end through real torchrun, the unchanged trainer loop and checkpoint manager:
background (async) saves commit, a SIGTERM preemption commits and resumes bit-identically, ``dtrain
ckpt`` reads the checkpoint like any other, and a checkpoint of another model is refused. The run trains
with dropout and a data-loader worker, so an RNG stream that a resume does not restore would show in
the losses."""

from __future__ import annotations

import shutil
import signal
import time

import pytest

from dtrain.checkpoint.cli import main as ckpt
from dtrain.checkpoint.manager import committed_steps
from dtrain.checkpoint.storage import Storage
from tests.helpers import TINY, finish, read_metrics, start, torchrun, torchrun_args, wait_for_rows

STEPS = 12
COMMON = [*TINY, "model.dropout=0.1", "trainer.data_workers=1", "strategy=zero2", "checkpoint.interval_steps=4",
          "checkpoint.async_mode=thread", f"trainer.max_steps={STEPS}"]
METRICS = {"step", "loss", "lr", "step_time_s", "data_wait_share", "grad_norm", "peak_mem_gib", "tokens_per_s",
           "model_flops_per_s_per_device"}


def losses(run_dir) -> dict[int, float]:
    return {row["step"]: row["loss"] for row in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted zero2 run on 2 ranks, saving in the background at steps 4 and 8, and at 12 (final)."""
    run_dir = tmp_path_factory.mktemp("zero2")
    result = torchrun(2, [*COMMON, f"run.dir={run_dir}"], timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    assert committed_steps(Storage(str(run_dir / "checkpoints"))) == [8, 12]  # keep_last=2
    return run_dir


def test_zero2_logs_the_same_metrics_as_every_strategy(reference):
    rows = read_metrics(reference)
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    assert all(METRICS <= set(row) for row in rows), set(rows[0])
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_sigterm_preempts_a_zero2_run_which_then_resumes_exactly(reference, tmp_path):
    overrides = [*COMMON, f"run.dir={tmp_path}"]
    proc = start(torchrun_args(2, overrides))
    wait_for_rows(tmp_path, 5, proc, timeout=300)
    proc.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    result = finish(proc, timeout=120)
    assert result.stderr.count("preempted by SIGTERM") == 2, result.stderr[-3000:]  # both workers saved and left
    assert time.monotonic() - sent < 30  # inside torchrun's shutdown window
    preempted = committed_steps(Storage(str(tmp_path / "checkpoints")))[-1]
    assert 5 <= preempted < STEPS
    resumed = torchrun(2, overrides, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"step_{preempted:08d}" in resumed.stderr.split("resumed from", 1)[1].splitlines()[0]
    expected, got = losses(reference), losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in got] == [expected[s] for s in got]  # bit-identical


def test_ckpt_cli_reads_a_deepspeed_checkpoint_unchanged(reference, tmp_path, capsys):
    from safetensors.torch import load_file

    uri = str(reference / "checkpoints")
    step = f"{uri}/step_{STEPS:08d}"
    assert ckpt(["ls", uri]) == 0
    assert f"step_{STEPS:08d}" in capsys.readouterr().out
    assert ckpt(["verify", uri]) == 0
    assert ckpt(["inspect", step]) == 0
    assert "strategy zero2" in capsys.readouterr().out.replace("=", " ").replace(":", " ")
    assert ckpt(["export", step, str(tmp_path / "model.safetensors")]) == 0
    weights = load_file(str(tmp_path / "model.safetensors"))
    assert {"wte.weight", "lm_head.weight", "blocks.1.mlp.fc_out.weight"} <= set(weights)
    assert weights["blocks.0.attn.q_proj.weight"].shape == (64, 64)  # whole, not a rank's partition


def test_a_checkpoint_of_another_model_is_refused_and_kept(reference, tmp_path):
    shutil.copytree(reference / "checkpoints", tmp_path / "checkpoints")
    before = sorted(p.name for p in (tmp_path / "checkpoints").rglob("*"))
    result = torchrun(1, [*COMMON, "model.n_layer=3", f"run.dir={tmp_path}"], timeout=300)
    assert result.returncode != 0
    assert "the checkpoint was written for another model: model.n_layer=2 (now 3)" in result.stderr, \
        result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "checkpoints").rglob("*")) == before
