"""Typed schemas for every config group, registered in Hydra's ConfigStore.

YAML files under ``configs/`` extend these (``defaults: [<group>_schema]``), so a typo in a key or a
string where a number belongs fails at compose time. ``model`` and ``data`` are open (``Any``): a
user's own class plugs in by ``_target_`` with its own arguments; the built-in ones still extend a
schema. There is deliberately no ``hydra:`` field here (Hydra owns that node).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class RunConfig:
    # Every rank must resolve the same name: see dtrain.config.compose (run-name resolver).
    name: str = "${dtrain_run_name:}"
    dir: str = "runs/${run.name}"


@dataclass
class TrainerConfig:
    max_steps: int = 200
    seed: int = 1234
    global_batch_size: int = 16  # sequences per optimizer step, summed over data-parallel ranks
    micro_batch_size: int = 4  # sequences per forward/backward on one rank
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (the norm is still reported)
    precision: str = "fp32"  # fp32 | bf16 (autocast; parameters and optimizer state stay fp32)
    device: str = "auto"  # auto | cpu | cuda
    eval_every: int = 50  # steps between evaluations; 0 disables
    eval_batches: int = 4  # global batches of validation data per evaluation
    log_every: int = 10
    data_workers: int = 0  # DataLoader worker processes per rank
    sample_tokens: int = 200  # tokens generated from the trained model at the end; 0 disables
    sample_prompt: str = "def "
    sample_temperature: float = 0.8


@dataclass
class DistConfig:
    backend: str = "auto"  # auto | gloo | nccl
    timeout_s: float = 600.0


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1  # on every 2-D weight, embeddings included (GPT-2/nanoGPT); never biases or norms
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio
    decay_steps: Optional[int] = None  # defaults to trainer.max_steps


@dataclass
class StrategyConfig:
    name: str = "ddp"
    # parallel degrees; -1 means "whatever is left of the world size"
    dp_replicate: int = 1
    dp_shard: int = 1
    tp: int = 1
    pp: int = 1
    # DDP
    bucket_cap_mb: float = 25.0
    find_unused_parameters: bool = False
    # FSDP / TP / PP knobs live here too so one flat node describes every strategy
    reshard_after_forward: bool = True
    param_dtype: Optional[str] = None  # e.g. bf16 for FSDP mixed precision; None = fp32
    reduce_dtype: Optional[str] = None
    sequence_parallel: bool = True
    pp_schedule: str = "1F1B"
    microbatches: int = -1  # pipeline micro-batches per schedule round; -1: the whole local batch in one round
    pp_stages_per_rank: int = -1  # -1: 1 for GPipe/1F1B, 2 for interleaved and V schedules
    pp_layers_per_stage: Optional[list[int]] = None  # explicit split (one count per stage); None: even
    activation_checkpointing: str = "none"  # none | full | selective
    compile: bool = False
    # DeepSpeed (strategy=zero1|zero2|zero3|ds_pp|ds_tp); see dtrain.strategies.deepspeed_config
    zero_stage: Optional[int] = None  # ZeRO stage 0-3; None: the strategy's own (zeroN: N; ds_pp, ds_tp: 1)
    offload_optimizer: str = "none"  # none | cpu: optimizer state and its step on the CPU (ZeRO stage >= 1)
    offload_param: str = "none"  # none | cpu: parameters on the CPU between uses (ZeRO stage 3 only)
    # raw DeepSpeed keys merged over the config dtrain generates; one that contradicts a dtrain setting is
    # an error (add keys with +strategy.ds_config.KEY=VALUE)
    ds_config: dict[str, Any] = field(default_factory=dict)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "dtrain"
    mode: str = "offline"  # offline needs no network; online needs WANDB_API_KEY
    entity: Optional[str] = None


@dataclass
class TensorBoardConfig:
    enabled: bool = False


@dataclass
class LoggingConfig:
    level: str = "INFO"
    progress: str = "auto"  # auto (a bar on a terminal, lines otherwise) | bar | lines | off
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)


@dataclass
class HardwareConfig:
    name: str = "cpu"
    # dense bf16 (or fp32 on CPU) peak of one device; None: report FLOP/s but no MFU
    peak_flops_per_device: Optional[float] = None


@dataclass
class CheckpointConfig:
    uri: str = "${run.dir}/checkpoints"  # a path, file://, s3://, gs:// or memory://
    # passed to fsspec (endpoint_url, anon, ...); credentials belong in the environment, and are redacted
    # from every file and log dtrain writes
    storage_options: dict[str, Any] = field(default_factory=dict)
    interval_steps: int = 100  # 0: only the final (and preemption) checkpoint
    keep_last: int = 2  # committed steps kept; never fewer than 1
    async_mode: str = "off"  # off | thread | process
    resume: str = "auto"  # auto | never | <step> | <URI of a step_XXXXXXXX folder>
    verify_checksums: bool = True  # CRC32C of every file before loading (sizes are always checked)
    save_final: bool = True
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    grace_period_s: float = 30.0  # time between the signal and SIGKILL (torchrun, K8s and Slurm defaults: 30 s)
    commit_timeout_s: float = 600.0  # how long ranks wait for each other to finish a background save
    # one writer per URI: a lease not renewed for this long belongs to a dead job; 0 switches leases off
    # (only for stores without consistent listings)
    lease_ttl_s: float = 60.0
    write_threads: int = 4  # files per rank written (and hashed) in parallel


@dataclass
class GPTSchema:
    _target_: str = "dtrain.models.gpt.GPT"
    vocab_size: int = MISSING
    seq_len: int = MISSING
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 128
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True
    tie_embeddings: bool = True


@dataclass
class StdlibCorpusSchema:
    _target_: str = "dtrain.data.corpus.StdlibCorpus"
    seq_len: int = 128
    vocab_size: int = 256
    val_fraction: float = 0.05
    max_bytes: Optional[int] = None  # None: every .py file of the standard library (~30 MB)


@dataclass
class MemmapSchema:
    _target_: str = "dtrain.data.memmap.MemmapTokens"
    seq_len: int = 1024
    vocab_size: int = 50257
    train_path: str = MISSING
    val_path: Optional[str] = None
    dtype: str = "uint16"


@dataclass
class SyntheticSchema:
    _target_: str = "dtrain.data.synthetic.SyntheticTokens"
    seq_len: int = 128
    vocab_size: int = 256
    num_samples: int = 100_000


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    model: Any = MISSING
    data: Any = MISSING


def register_schemas() -> None:
    """Idempotent: ConfigStore overwrites same-named entries."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="strategy", name="strategy_schema", node=StrategyConfig)
    cs.store(group="optim", name="optim_schema", node=OptimConfig)
    cs.store(group="logging", name="logging_schema", node=LoggingConfig)
    cs.store(group="hardware", name="hardware_schema", node=HardwareConfig)
    cs.store(group="checkpoint", name="checkpoint_schema", node=CheckpointConfig)
    cs.store(group="model", name="gpt_schema", node=GPTSchema)
    cs.store(group="data", name="stdlib_schema", node=StdlibCorpusSchema)
    cs.store(group="data", name="memmap_schema", node=MemmapSchema)
    cs.store(group="data", name="synthetic_schema", node=SyntheticSchema)
