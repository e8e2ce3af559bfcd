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
    # a plan whose per-rank memory estimate exceeds the device is refused at start-up; true: warn instead
    allow_memory_overcommit: bool = False
    sample_tokens: int = 200  # tokens generated from the trained model at the end; 0 disables
    sample_prompt: str = "def "
    sample_temperature: float = 0.8
    # time every step spends waiting on communication, by mesh dimension (exposed_comm_* in metrics.jsonl;
    # CPU/gloo runs; see dtrain/metrics/exposed_comm.py)
    measure_comm: bool = True


@dataclass
class DistConfig:
    backend: str = "auto"  # auto | gloo | nccl | fake (rank 0 alone, collectives do nothing: a study reference)
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
class AlertThresholds:
    """Exported as ``dtrain_alert_*`` gauges that the rules in deploy/monitoring/ compare against, so each
    run carries its own thresholds and the rule files stay static (see dtrain/metrics/prometheus.py)."""

    no_progress_s: float = 900.0  # no optimizer step for this long
    throughput_drop_ratio: float = 0.5  # tokens/s below this share of the run's own 1-hour median
    mfu_floor: float = 0.0  # MFU below this (0..1); 0 switches the alert off
    checkpoint_intervals: float = 3.0  # newest committed checkpoint older than this many checkpoint intervals
    restart_storm_restarts: int = 3  # this many restarts within an hour without checkpoint progress


@dataclass
class PrometheusConfig:
    port: int = 0  # 0: off; else local rank 0 of every node serves /metrics on addr:port
    addr: str = "127.0.0.1"  # 0.0.0.0 to be scraped from another host
    alerts: AlertThresholds = field(default_factory=AlertThresholds)


@dataclass
class LoggingConfig:
    level: str = "INFO"
    progress: str = "auto"  # auto (a bar on a terminal, lines otherwise) | bar | lines | off
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)


@dataclass
class MonitorConfig:
    """Hang and straggler detection (dtrain/metrics/hang.py, dtrain/metrics/straggler.py)."""

    # a rank that makes no progress (no phase or step change) for this long ends the job with a named
    # culprit and trace dumps in <run.dir>/hang/; 0: off. Longer than the slowest legitimate phase
    # (first step with compile, a checkpoint save); shorter than dist.timeout_s to beat the collective timeout
    hang_timeout_s: float = 300.0
    heartbeat_s: float = 2.0  # how often each rank publishes its phase to the job's store
    # PyTorch Flight Recorder ring (entries per rank; TORCH_FR_BUFFER_SIZE / TORCH_NCCL_TRACE_BUFFER_SIZE);
    # 0: off (set explicitly: torch records gloo collectives by default). Names the last collective of every
    # rank in a hang; on NCCL it also dumps on a collective timeout
    flight_recorder_entries: int = 2000
    straggler_window: int = 10  # steps per straggler score (one small all-gather per window); 0: off
    straggler_threshold: float = 0.8  # a score below this names the rank (log, metrics, and the alert)


@dataclass
class HardwareConfig:
    name: str = "cpu"
    # dense bf16 (or fp32 on CPU) peak of one device; None: report FLOP/s but no MFU
    peak_flops_per_device: Optional[float] = None
    # What the projection (`dtrain scale project`) needs; a training run ignores these. Units and the
    # model's constants: dtrain/scaling/hardware.py. None: not stated (the projection's default applies).
    peak_tflops: Optional[float] = None  # dense FP16/BF16 tensor-core peak per device
    peak_tflops_fp32: Optional[float] = None
    peak_tflops_fp8: Optional[float] = None
    hbm_gib: Optional[float] = None
    hbm_gbps: Optional[float] = None
    gpus_per_node: Optional[int] = None
    nvlink_gbps_per_gpu: Optional[float] = None  # per direction
    nic_gbps_per_gpu: Optional[float] = None
    compute_slots_per_node: Optional[int] = None
    corun_slowdown: Optional[float] = None
    step_jitter_cv: Optional[float] = None
    async_device: Optional[bool] = None
    matmul_efficiency: Optional[float] = None
    memory_efficiency: Optional[float] = None
    nvlink_efficiency: Optional[float] = None
    nic_efficiency: Optional[float] = None
    all_gather_efficiency: Optional[float] = None
    reduce_scatter_efficiency: Optional[float] = None
    all_gather_latency_factor: Optional[float] = None
    reduce_scatter_latency_factor: Optional[float] = None
    nvlink_latency_us: Optional[float] = None
    nic_latency_us: Optional[float] = None
    kernel_overhead_us: Optional[float] = None
    attention: Optional[str] = None  # flash | unfused
    latency_steps: Optional[str] = None  # ring | log2
    flash_attention_efficiency: Optional[float] = None


@dataclass
class CheckpointConfig:
    uri: str = "${run.dir}/checkpoints"  # a path, file://, s3://, gs:// or memory://
    # passed to fsspec (endpoint_url, anon, ...); credentials belong in the environment, and are redacted
    # from every file and log dtrain writes
    storage_options: dict[str, Any] = field(default_factory=dict)
    # steps between saves; 0: only the final (and preemption) checkpoint; auto: Young/Daly from the measured
    # blocking save time and step time and mtbi_s (typed Any: OmegaConf 2.3 has no Union[int, str])
    interval_steps: Any = 100
    mtbi_s: Optional[float] = None  # mean time between interruptions of this job, seconds (for interval auto)
    keep_last: int = 2  # committed steps kept; never fewer than 1
    async_mode: str = "off"  # off | thread | process
    resume: str = "auto"  # auto | never | <step> | <URI of a step_XXXXXXXX folder>
    verify_checksums: bool = True  # CRC32C of every file before loading (sizes are always checked)
    save_final: bool = True
    # SIGINT too: one Ctrl-C saves and stops a foreground run cleanly; a second one exits at once
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    grace_period_s: float = 30.0  # time between the signal and SIGKILL (torchrun, K8s and Slurm defaults: 30 s)
    commit_timeout_s: float = 600.0  # how long ranks wait for each other to finish a background save
    storage_timeout_s: float = 30.0  # start-up probe of the store: an endpoint silent this long is an error
    # one writer per URI: a lease not renewed for this long belongs to a dead job; 0 switches leases off
    # (only for stores without consistent listings)
    lease_ttl_s: float = 60.0
    write_threads: int = 4  # files per rank written (and hashed) in parallel


@dataclass
class LauncherConfig:
    """How ``dtrain launch torchrun|slurm|k8s`` runs this config on a cluster (dtrain/launch/).

    One flat node for every platform, like ``strategy``: keys a platform does not use are ignored by it.
    """

    kind: str = "torchrun"  # torchrun | slurm | k8s
    job_name: str = "dtrain"  # Slurm job name; Kubernetes Job and Service name
    nodes: int = 1
    nproc_per_node: int = 1  # training processes per node (one per GPU on a GPU node)
    gpus_per_node: int = 0
    cpus_per_node: Optional[int] = None  # Slurm --cpus-per-task of the one task per node; Kubernetes cpu request
    memory: Optional[str] = None  # per node: Slurm --mem (e.g. 200G), Kubernetes memory request (e.g. 200Gi)
    time_limit: Optional[str] = None  # Slurm --time (HH:MM:SS or D-HH:MM:SS); Kubernetes activeDeadlineSeconds
    # time between the preemption signal and SIGKILL; None: derived from the checkpoint save estimate
    grace_period_s: Optional[float] = None
    save_time_s: Optional[float] = None  # a measured save time (dtrain logs "committed ... in X s"); None: estimate
    write_mb_s: float = 500.0  # checkpoint write bandwidth of one node, for the estimate
    grace_margin: float = 2.0  # grace >= margin x save time + stop_overhead_s
    stop_overhead_s: float = 15.0  # signal -> save start (up to two training steps) plus process teardown
    max_restarts: int = 0  # torchrun's in-place restarts of a crashed worker group, before the scheduler retries
    max_crash_retries: int = 2  # scheduler retries of a crash (Slurm requeues, Kubernetes backoffLimitPerIndex)
    rdzv_port: int = 29400  # torchrun and Kubernetes; Slurm derives a port from the job id
    rdzv_timeout_s: float = 900.0  # how long nodes wait for the rendezvous host (DNS, then its port)
    python: str = "python"  # the interpreter that has dtrain installed, on the nodes
    setup: list[str] = field(default_factory=list)  # shell lines before training (module load, venv activate)
    env: dict[str, str] = field(default_factory=dict)  # extra environment of the training processes
    # Slurm
    partition: Optional[str] = None
    account: Optional[str] = None
    output: str = "slurm-%x-%j.out"  # appended to across requeues
    # Kubernetes
    namespace: str = "default"
    image: Optional[str] = None
    env_from: Optional[str] = None  # a Kubernetes Secret whose keys become the pods' environment (storage credentials)
    service_account: Optional[str] = None
    node_selector: dict[str, str] = field(default_factory=dict)
    shm_size: str = "16Gi"  # /dev/shm of each pod (data-loader workers, NCCL)


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
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
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
    cs.store(group="launcher", name="launcher_schema", node=LauncherConfig)
    cs.store(group="model", name="gpt_schema", node=GPTSchema)
    cs.store(group="data", name="stdlib_schema", node=StdlibCorpusSchema)
    cs.store(group="data", name="memmap_schema", node=MemmapSchema)
    cs.store(group="data", name="synthetic_schema", node=SyntheticSchema)
