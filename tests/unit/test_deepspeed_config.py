"""The DeepSpeed strategies' config: what dtrain generates from its own settings, and bad input as one
line each, before any process group (so nothing is started and no checkpoint is touched)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dtrain.config.errors import ConfigError
from dtrain.config.validate import load_config
from dtrain.strategies.deepspeed_config import DeepSpeedLayout, build_config, resolve_layout
from tests.helpers import REPO, subprocess_env

SMALL = ["run.name=t", "model=gpt_tiny", "data=synthetic", "trainer.global_batch_size=16", "trainer.micro_batch_size=2"]


def config_for(overrides: list[str], world: int) -> dict:
    cfg = load_config([*SMALL, *overrides], world)
    t = cfg.trainer
    layout = resolve_layout(cfg.strategy.name, cfg.strategy, world)[0]
    config, problems = build_config(cfg.strategy.name, cfg.strategy, t.global_batch_size, t.micro_batch_size,
                                    t.grad_clip, t.precision, layout)
    assert problems == []
    return config


def test_the_deepspeed_config_comes_from_dtrains_settings():
    config = config_for(["strategy=zero2", "trainer.grad_clip=0.5", "strategy.offload_optimizer=cpu"], 4)
    assert config["train_batch_size"] == 16 and config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 2  # 16 / (2 x 4)
    assert config["gradient_clipping"] == 0.5
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    assert "optimizer" not in config and "scheduler" not in config  # dtrain's own AdamW and LR schedule
    zero3 = config_for(["strategy=zero3", "strategy.offload_param=cpu"], 2)["zero_optimization"]
    assert zero3 == {"stage": 3, "offload_optimizer": {"device": "none"}, "offload_param": {"device": "cpu"}}
    tp = config_for(["strategy=ds_tp", "strategy.zero_stage=2"], 4)
    assert tp["tensor_parallel"]["autotp_size"] == 2 and tp["zero_optimization"]["stage"] == 2
    assert tp["gradient_accumulation_steps"] == 4 and "train_batch_size" not in tp  # 16 / (2 x dp 2)
    pp = config_for(["strategy=ds_pp"], 4)
    assert pp["zero_optimization"]["stage"] == 1 and pp["gradient_accumulation_steps"] == 4


def test_raw_keys_merge_over_the_generated_config_unless_they_contradict_it():
    config = config_for(["strategy=zero2", "+strategy.ds_config.zero_optimization.reduce_bucket_size=1000",
                         "+strategy.ds_config.gradient_clipping=1.0", "+strategy.ds_config.wall_clock_breakdown=true"],
                        2)
    assert config["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "none"},
                                           "reduce_bucket_size": 1000}
    assert config["wall_clock_breakdown"] is True and config["gradient_clipping"] == 1.0  # agrees: accepted


def test_the_layout_follows_deepspeeds_rank_order():
    pipe = DeepSpeedLayout(pp=2, dp=2)  # PipeDataParallelTopology: rank = stage x dp + data index
    assert [pipe.dp_rank(r) for r in range(4)] == [0, 1, 0, 1] and [pipe.stage(r) for r in range(4)] == [0, 0, 1, 1]
    tensor = DeepSpeedLayout(tp=2, dp=2)  # AutoTP's (data, tensor) mesh: tensor-parallel peers are neighbours
    assert [tensor.dp_rank(r) for r in range(4)] == [0, 0, 1, 1]


@pytest.mark.parametrize("overrides,world,expected", [
    (["strategy=zero2", "strategy.pp=2"], 2,
     "strategy=zero2 with strategy.pp=2: DeepSpeed refuses ZeRO stage 2 and 3 with pipeline parallelism; use "
     "strategy=ds_pp (ZeRO-1 across the data-parallel ranks of each stage) or the native strategy=pp_fsdp"),
    (["strategy=ds_pp", "strategy.zero_stage=3"], 2, "strategy=ds_pp with strategy.zero_stage=3: DeepSpeed refuses"),
    (["strategy=zero2", "strategy.offload_param=cpu"], 2,
     "strategy.offload_param=cpu needs ZeRO stage 3 (parameters are only partitioned there), but this is stage 2"),
    (["strategy=ds_tp", "strategy.tp=3"], 4,
     "strategy=ds_tp: world size 4 is not divisible by strategy.tp=3; launch a multiple of 3 ranks"),
    (["strategy=ds_pp", "strategy.pp=3"], 4, "world size 4 is not divisible by strategy.pp=3"),
    (["strategy=zero2", "+strategy.ds_config.train_batch_size=32"], 2,
     "strategy.ds_config.train_batch_size=32 contradicts trainer.global_batch_size=16, which dtrain sets to 16"),
    (["strategy=zero3", "+strategy.ds_config.bf16.enabled=true"], 2,
     "strategy.ds_config.bf16.enabled=True contradicts trainer.precision=fp32"),
    (["strategy=zero1", "+strategy.ds_config.optimizer.type=Adam"], 2,
     "strategy.ds_config.optimizer.type=Adam contradicts optim.* (dtrain passes its own AdamW)"),
    (["strategy=ds_tp", "+strategy.ds_config.zero_optimization.stage=3"], 2,
     "strategy.ds_config.zero_optimization.stage=3 contradicts strategy=ds_tp (ZeRO stage 1), which dtrain sets to 1"),
    (["strategy=zero2", "strategy.zero_stage=3"], 2, "strategy=zero2 is ZeRO stage 2 but strategy.zero_stage=3"),
    (["strategy=zero1", "strategy.zero_stage=null", "strategy.offload_optimizer=nvme"], 2,
     "strategy.offload_optimizer=nvme is not one of: none, cpu"),
    (["strategy=zero2", "strategy.tp=2"], 2, "strategy=zero2 does not use strategy.tp=2; set it to 1 (use "
                                             "strategy=ds_tp for tensor parallelism)"),
    (["strategy=zero2", "strategy.activation_checkpointing=full"], 2,
     "strategy.activation_checkpointing=full is a native-strategy setting that strategy=zero2 does not use"),
    (["strategy=ddp", "strategy.offload_optimizer=cpu"], 2,
     "strategy.offload_optimizer=cpu is a DeepSpeed setting that strategy=ddp would ignore"),
    (["strategy=ds_pp", "strategy.microbatches=2"], 2, "strategy.microbatches=2: DeepSpeed's pipeline runs all 8 "
                                                       "micro-batches of a rank's step"),
    (["strategy=ds_pp", "model.n_layer=1"], 2, "strategy.pp=2 pipeline stages but model.n_layer=1"),
    (["strategy=ds_tp", "model.n_head=3", "model.d_model=96"], 2, "strategy.tp=2 does not divide model.n_head=3"),
    (["strategy=ds_pp", "strategy.pp_schedule=GPipe"], 2, "strategy=ds_pp runs DeepSpeed's own 1F1B schedule"),
])
def test_bad_input_is_one_line_before_any_process_group(overrides, world, expected):
    with pytest.raises(ConfigError) as info:
        load_config([*SMALL, *overrides], world)
    rendered = info.value.render()
    assert expected in rendered, rendered
    assert len(info.value.problems) == 1, info.value.problems


def test_missing_deepspeed_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # as if not installed: importing it fails
    with pytest.raises(ConfigError) as info:
        load_config([*SMALL, "strategy=zero2"], 2)
    assert info.value.problems == ["strategy=zero2 needs DeepSpeed, which is not installed; install it with: "
                                   "pip install 'dtrain[deepspeed]'"]


def test_bad_input_exits_2_and_leaves_checkpoints_untouched(tmp_path, capsys):
    from dtrain.cli import run

    step = tmp_path / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    (step / "manifest.json").write_text('{"step": 4}')
    before = sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    code = run([*SMALL, "strategy=zero2", "+strategy.ds_config.train_micro_batch_size_per_gpu=8",
                f"run.dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [
        "dtrain: config error: strategy.ds_config.train_micro_batch_size_per_gpu=8 contradicts "
        "trainer.micro_batch_size=2, which dtrain sets to 2; remove it from strategy.ds_config and change "
        "trainer.micro_batch_size instead"]
    assert sorted((p.relative_to(tmp_path), p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == before


def test_validation_imports_deepspeed_for_no_strategy():
    """Checking a config, DeepSpeed's or not, must neither need nor import DeepSpeed (its import alone
    takes seconds)."""
    code = ("import sys; from dtrain.config.validate import load_config\n"
            "for name in ('ddp', 'fsdp', 'zero2', 'ds_pp', 'ds_tp'):\n"
            "    load_config(['run.name=t', 'strategy=' + name], 2)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                            env=subprocess_env(), timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", result.stdout
