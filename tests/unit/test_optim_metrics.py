"""LR schedule, weight-decay groups, metric sinks."""

import json

import pytest
from omegaconf import OmegaConf

from dtrain.config.schema import OptimConfig
from dtrain.metrics.loggers import JsonlLogger, NullLogger, build_loggers
from dtrain.metrics.throughput import step_throughput
from dtrain.optim import build_optimizer, lr_multiplier


def optim_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(OptimConfig), kw)


def test_warmup_then_cosine_to_the_floor():
    f = lr_multiplier(optim_cfg(warmup_steps=10, min_lr_ratio=0.1), max_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    values = [f(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_and_constant_schedules():
    assert lr_multiplier(optim_cfg(schedule="linear", warmup_steps=0, min_lr_ratio=0.0), 100)(50) == pytest.approx(0.5)
    assert lr_multiplier(optim_cfg(schedule="constant", warmup_steps=0), 100)(99) == 1.0


def test_weight_decay_on_every_matrix_embeddings_included():
    from dtrain.models.gpt import GPT

    model = GPT(vocab_size=32, seq_len=8, n_layer=1, n_head=2, d_model=8, tie_embeddings=False)
    opt = build_optimizer(model.named_parameters(), optim_cfg(weight_decay=0.2))
    decayed, plain = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    assert decayed["weight_decay"] == 0.2 and plain["weight_decay"] == 0.0
    # GPT-2 / nanoGPT: embeddings and the head decay like any matrix; biases and norms never
    assert {"wte.weight", "wpe.weight", "lm_head.weight", "blocks.0.mlp.fc_in.weight"} <= decayed_names
    assert all(p.dim() == 1 for p in plain["params"]) and len(plain["params"]) > 0
    assert not any(n.endswith("bias") or ".ln_" in n for n in decayed_names)


def test_jsonl_logger_appends_one_object_per_step(tmp_path):
    logger = JsonlLogger(tmp_path / "m.jsonl")
    logger.log(1, {"loss": 2.0})
    logger.close()
    logger = JsonlLogger(tmp_path / "m.jsonl")  # a resumed run continues the same file
    logger.log(2, {"loss": 1.5})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert rows == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5}]


def test_only_rank_zero_logs(tmp_path):
    from dtrain.config.validate import load_config

    cfg = load_config([f"run.dir={tmp_path}", "logging.progress=off"], 1)
    assert isinstance(build_loggers(cfg, is_rank_zero=False), NullLogger)
    logger = build_loggers(cfg, is_rank_zero=True)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert (tmp_path / "metrics.jsonl").exists()


def test_throughput_and_mfu():
    out = step_throughput(tokens_per_step=1000, step_time_s=0.5, flops_per_token=6e6, world_size=2,
                          peak_flops_per_device=1e10)
    assert out["tokens_per_s"] == 2000
    assert out["model_flops_per_s_per_device"] == pytest.approx(6e9)
    assert out["mfu"] == pytest.approx(0.6)
    assert "mfu" not in step_throughput(1000, 0.5, 6e6, 2, None)


def test_tensorboard_and_wandb_write_offline(tmp_path, monkeypatch):
    from dtrain.config.validate import load_config

    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config([f"run.dir={tmp_path}", "logging.progress=off", "logging.tensorboard.enabled=true",
                       "logging.wandb.enabled=true", "logging.wandb.mode=offline", "run.name=tbwb"], 1)
    logger = build_loggers(cfg, is_rank_zero=True)
    for step in (1, 2):
        logger.log(step, {"loss": 3.0 / step, "lr": 1e-3})
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    offline_runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline_runs and list(offline_runs[0].glob("*.wandb"))
