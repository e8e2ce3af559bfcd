"""Every shipped config composes and validates; bad input gives one clear line per problem."""

from __future__ import annotations

import pytest

from dtrain.config.compose import compose_config, config_hash, diff_keys, group_options
from dtrain.config.errors import ConfigError
from dtrain.config.validate import load_config

GROUPS = ("model", "data", "strategy", "optim", "logging", "hardware", "experiment", "launcher")
NEEDS = {("data", "memmap"): ["data.train_path=/dev/null"]}  # validated separately below
# the smallest world each strategy's default degrees fit
WORLD = {"ddp": 2, "fsdp": 2, "hsdp": 4, "tp": 2, "fsdp_tp": 4, "pp": 2, "pp_fsdp": 4, "3d": 8, "zero1": 2, "zero2": 2,
         "zero3": 2, "ds_pp": 2, "ds_tp": 2}


def options(group):
    return [o for o in group_options(group) if not o.endswith("_schema")]


@pytest.mark.parametrize("group,choice", [(g, c) for g in GROUPS for c in options(g)])
def test_every_group_option_composes(group, choice):
    overrides = [f"{group}={choice}", "run.name=t", *NEEDS.get((group, choice), [])]
    if (group, choice) == ("data", "memmap"):
        cfg, problems = compose_config(overrides)
        assert problems == [] and cfg.data.train_path == "/dev/null"
        return
    world = WORLD.get(choice, 1) if group == "strategy" else 1
    cfg = load_config(overrides, world_size=world)
    assert cfg.run.dir == "runs/t"


def test_gpt_sizes_match_their_names():
    from dtrain.models import build_model

    sizes = {}
    for name in ("gpt_tiny", "gpt_small", "gpt2_124m"):
        cfg = load_config([f"model={name}", "run.name=t"], 1)
        sizes[name] = build_model(cfg.model, 0).num_params()
    assert 0.5e6 < sizes["gpt_tiny"] < 1.5e6
    assert 8e6 < sizes["gpt_small"] < 13e6
    assert 120e6 < sizes["gpt2_124m"] < 130e6


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as info:
        load_config(["model=nope", "trainer.max_steps=0", "optim.lr=-1", "trainer.global_batch_size=10",
                     "run.name=t"], world_size=1)
    problems = info.value.problems
    assert len(problems) == 4
    assert "unknown model 'nope'" in problems[0] and "gpt_tiny" in problems[0]
    assert any("trainer.max_steps=0" in p for p in problems)
    assert any("optim.lr=-1" in p for p in problems)
    assert any("4 x 1 = 4" in p for p in problems)


@pytest.mark.parametrize("overrides,world,expected", [
    (["strategy=foo"], 1, "unknown strategy 'foo'; choose one of: 3d, ddp, ds_pp, ds_tp, fsdp, fsdp_tp, hsdp, pp, "
                          "pp_fsdp, single, tp, zero1, zero2, zero3"),
    (["trainer.global_batch_size=12", "trainer.micro_batch_size=4"], 2,
     "global_batch_size=12 is not divisible by micro_batch_size x data-parallel size = 4 x 2 = 8"),
    (["strategy=single"], 2, "strategy=single runs one process but the world size is 2"),
    (["data=memmap", "data.train_path=/no/such/file.bin"], 1, "data.train_path=/no/such/file.bin does not exist"),
    (["data=memmap"], 1, "data.train_path is required"),
    (["trainer.max_steps=abc"], 1, "could not be converted to Integer"),
    (["trainer.typo=1"], 1, "Key 'typo' not in 'TrainerConfig'"),
    (["model.n_head=3"], 1, "model.d_model=128 is not divisible by model.n_head=3"),
    (["trainer.precision=fp8"], 1, "trainer.precision=fp8 is not one of: fp32, bf16"),
    (["model._target_=no.such.Model"], 1, "model._target_=no.such.Model cannot be imported"),
])
def test_bad_input_is_one_clear_line(overrides, world, expected):
    with pytest.raises(ConfigError) as info:
        load_config([*overrides, "run.name=t"], world_size=world)
    rendered = info.value.render()
    assert expected in rendered
    assert "Traceback" not in rendered and len(info.value.problems) == 1


def test_user_model_and_dataset_plug_in_by_target(tmp_path):
    """A user's own classes, from the user's own config folder, train through the unchanged loop."""
    from dtrain.cli import run
    from tests.helpers import read_metrics

    (tmp_path / "conf" / "model").mkdir(parents=True)
    (tmp_path / "conf" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "model" / "bigram.yaml").write_text(
        "_target_: tests.unit.user_plugins.BigramLM\nvocab_size: 16\n")
    (tmp_path / "conf" / "data" / "counting.yaml").write_text(
        "_target_: tests.unit.user_plugins.CountingData\nseq_len: 8\nvocab_size: 16\n")
    run_dir = tmp_path / "run"
    code = run([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "model=bigram", "data=counting",
                "strategy=single", "trainer.max_steps=30", "trainer.eval_every=10", "trainer.log_every=10",
                "optim.lr=0.3", "optim.warmup_steps=0", "optim.schedule=constant", "optim.weight_decay=0",
                "logging.progress=off", f"run.dir={run_dir}"])
    assert code == 0
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]  # counting mod 16 is learnable by a bigram model
    assert "model_flops_per_s_per_device" not in rows[0]  # unknown FLOPs are not invented


def test_run_name_is_shared_by_ranks_and_stable_across_requeue(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert load_config([], 1).run.dir == "runs/slurm-4242"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abcdef123456789")
    assert load_config([], 1).run.name == "torchrun-abcdef123456"
    assert load_config(["run.name=mine"], 1).run.dir == "runs/mine"


def test_ranks_without_a_shared_id_must_name_the_run(monkeypatch):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="pass run.name=NAME"):
        load_config([], 2)
    assert load_config(["run.name=x"], 2).run.dir == "runs/x"


def test_config_hash_and_diff():
    a = load_config(["run.name=t"], 1)
    b = load_config(["run.name=t", "trainer.seed=7"], 1)
    assert config_hash(a) == config_hash(load_config(["run.name=t"], 1))
    assert config_hash(a) != config_hash(b)
    assert diff_keys(a, b) == ["trainer.seed"]
