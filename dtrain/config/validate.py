"""Cross-field checks on a composed config, run on every rank before any process group exists.

Every problem is collected, so one run of ``dtrain validate`` shows all of them; each message names
the key, the value and how to fix it.
"""

from __future__ import annotations

import importlib.util
import math
import signal
from typing import Callable, Sequence

from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from dtrain.config.compose import compose_config
from dtrain.config.errors import ConfigError
from dtrain.config.uris import uri_problems
from dtrain.optim import OPTIMIZERS, SCHEDULES
from dtrain.strategies import check_strategy, data_parallel_size

Check = Callable[[DictConfig, int], list[str]]


def _positive(cfg: DictConfig, key: str, example: int | float) -> list[str]:
    value = cfg
    for part in key.split("."):
        value = value[part]
    return [] if value > 0 else [f"{key}={value} must be positive (e.g. {key}={example})"]


def check_numbers(cfg: DictConfig, world_size: int) -> list[str]:
    problems = []
    for key, example in (("trainer.max_steps", 100), ("trainer.global_batch_size", 16),
                         ("trainer.micro_batch_size", 4), ("trainer.log_every", 10), ("optim.lr", 3e-4)):
        problems += _positive(cfg, key, example)
    t, o = cfg.trainer, cfg.optim
    if t.eval_every < 0 or (t.eval_every > 0 and t.eval_batches <= 0):
        problems.append(f"trainer.eval_every={t.eval_every} / trainer.eval_batches={t.eval_batches}: "
                        "use eval_every=0 to disable evaluation, else positive values for both")
    if o.warmup_steps < 0:
        problems.append(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        problems.append(f"optim.min_lr_ratio={o.min_lr_ratio} must be within [0, 1]")
    if t.grad_clip < 0:
        problems.append(f"trainer.grad_clip={t.grad_clip} must be >= 0 (0 disables clipping)")
    return problems


def check_choices(cfg: DictConfig, world_size: int) -> list[str]:
    problems = []
    for key, value, valid in (("trainer.precision", cfg.trainer.precision, ("fp32", "bf16")),
                              ("trainer.device", cfg.trainer.device, ("auto", "cpu", "cuda")),
                              ("dist.backend", cfg.dist.backend, ("auto", "gloo", "nccl", "fake")),
                              ("optim.name", cfg.optim.name, OPTIMIZERS),
                              ("optim.schedule", cfg.optim.schedule, SCHEDULES),
                              ("logging.progress", cfg.logging.progress, ("auto", "bar", "lines", "off"))):
        if value not in valid:
            problems.append(f"{key}={value} is not one of: {', '.join(valid)}")
    if cfg.dist.backend == "nccl" and cfg.trainer.device == "cpu":
        problems.append("dist.backend=nccl needs CUDA tensors but trainer.device=cpu; use dist.backend=gloo")
    if cfg.dist.backend == "fake" and (cfg.checkpoint.interval_steps or cfg.checkpoint.save_final):
        # fake: one process plays rank 0 of WORLD_SIZE, collectives return at once (a scaling study's
        # reference for the per-rank work); its weights are not a real run's and its shards not a whole
        problems.append("dist.backend=fake runs one rank alone with collectives that do nothing: it must not "
                        "write checkpoints; set checkpoint.interval_steps=0 checkpoint.save_final=false")
    return problems


def check_batch(cfg: DictConfig, world_size: int) -> list[str]:
    t = cfg.trainer
    if t.global_batch_size <= 0 or t.micro_batch_size <= 0:
        return []
    dp = data_parallel_size(cfg, world_size)
    if dp is None:
        return []
    if t.global_batch_size % (t.micro_batch_size * dp):
        return [f"trainer.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size x "
                f"data-parallel size = {t.micro_batch_size} x {dp} = {t.micro_batch_size * dp}; pick a global "
                f"batch that is a multiple of {t.micro_batch_size * dp} or change trainer.micro_batch_size"]
    return []


def _target_class(node: DictConfig, group: str) -> tuple[type | None, list[str]]:
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    if not target:
        return None, [f"{group} config has no _target_; pick a built-in ({group}=...) or set {group}._target_"]
    try:
        return get_class(target), []
    except Exception as e:
        return None, [f"{group}._target_={target} cannot be imported ({str(e).splitlines()[0]})"]


def check_model_and_data(cfg: DictConfig, world_size: int) -> list[str]:
    model_cls, problems = _target_class(cfg.model, "model")
    data_cls, data_problems = _target_class(cfg.data, "data")
    problems += data_problems
    if data_cls is not None and hasattr(data_cls, "check_config"):
        problems += data_cls.check_config(cfg.data)
    if model_cls is not None and {"d_model", "n_head"} <= set(cfg.model.keys()):
        m = cfg.model
        if m.d_model % m.n_head:
            problems.append(f"model.d_model={m.d_model} is not divisible by model.n_head={m.n_head}")
        if "vocab_size" in cfg.data and m.vocab_size < cfg.data.vocab_size:
            problems.append(f"model.vocab_size={m.vocab_size} is smaller than the data's vocabulary "
                            f"data.vocab_size={cfg.data.vocab_size}")
        if "seq_len" in cfg.data and m.seq_len < cfg.data.seq_len:
            problems.append(f"model.seq_len={m.seq_len} is shorter than data.seq_len={cfg.data.seq_len}")
    return problems


def check_checkpoint(cfg: DictConfig, world_size: int) -> list[str]:
    c = cfg.checkpoint
    problems = []
    if c.keep_last < 1:
        problems.append(f"checkpoint.keep_last={c.keep_last} must be >= 1 (the newest committed step is always kept)")
    problems += _interval_problems(c.interval_steps, c.mtbi_s)
    if c.async_mode not in ("off", "thread", "process"):
        problems.append(f"checkpoint.async_mode={c.async_mode} is not one of: off, thread, process")
    resume = str(c.resume)
    if resume not in ("auto", "never") and not resume.isdigit() and "step_" not in resume:
        problems.append(f"checkpoint.resume={resume} must be auto, never, a step number, or the URI of a "
                        "step_<8 digits> folder")
    problems += uri_problems("checkpoint.uri", c.uri)
    if "CHANGE-ME" in c.uri:
        problems.append(f"checkpoint.uri={c.uri} is the template's placeholder; set checkpoint.uri=s3://BUCKET/PATH "
                        "(or gs://...)")
    for name in c.preemption_signals:
        if not isinstance(name, str) or not name.startswith("SIG") or not hasattr(signal, name):
            problems.append(f"checkpoint.preemption_signals has {name!r}, not a signal name (e.g. SIGTERM, SIGUSR1)")
    if c.write_threads < 1:
        problems.append(f"checkpoint.write_threads={c.write_threads} must be >= 1")
    if c.grace_period_s <= 0:
        problems.append(f"checkpoint.grace_period_s={c.grace_period_s} must be positive")
    if c.storage_timeout_s <= 0:
        problems.append(f"checkpoint.storage_timeout_s={c.storage_timeout_s} must be positive")
    if c.lease_ttl_s < 0:
        problems.append(f"checkpoint.lease_ttl_s={c.lease_ttl_s} must be >= 0 (0 switches the writer lease off)")
    return problems


def check_monitoring(cfg: DictConfig, world_size: int) -> list[str]:
    """Prometheus port and alert thresholds, hang and straggler settings: each a number in its range."""
    p, a, m = cfg.logging.prometheus, cfg.logging.prometheus.alerts, cfg.monitor
    problems = []
    if not 0 <= p.port <= 65535:
        problems.append(f"logging.prometheus.port={p.port} must be a TCP port in 1..65535, or 0 for off")
    elif p.port and importlib.util.find_spec("prometheus_client") is None:
        problems.append(f"logging.prometheus.port={p.port} needs prometheus_client: pip install 'dtrain[prometheus]'")
    for key, value, low, high, what in (
            ("logging.prometheus.alerts.no_progress_s", a.no_progress_s, 0.0, None, "seconds > 0"),
            ("logging.prometheus.alerts.throughput_drop_ratio", a.throughput_drop_ratio, 0.0, 1.0,
             "a share of the median in (0, 1]"),
            ("logging.prometheus.alerts.checkpoint_intervals", a.checkpoint_intervals, 0.0, None, "a count > 0"),
            ("logging.prometheus.alerts.restart_storm_restarts", a.restart_storm_restarts, 0, None, "a count > 0"),
            ("monitor.straggler_threshold", m.straggler_threshold, 0.0, 1.0, "a score in (0, 1]")):
        if not (value > low and (high is None or value <= high)):
            problems.append(f"{key}={value} must be {what}")
    if not 0.0 <= a.mfu_floor < 1.0:  # written so that nan fails too
        problems.append(f"logging.prometheus.alerts.mfu_floor={a.mfu_floor} must be in [0, 1) (0 switches it off)")
    if not m.hang_timeout_s >= 0:
        problems.append(f"monitor.hang_timeout_s={m.hang_timeout_s} must be >= 0 (0 switches hang detection off)")
    if not m.heartbeat_s > 0 or (m.hang_timeout_s > 0 and m.heartbeat_s * 2 > m.hang_timeout_s):
        problems.append(f"monitor.heartbeat_s={m.heartbeat_s} must be positive and at most half of "
                        f"monitor.hang_timeout_s={m.hang_timeout_s}")
    if m.flight_recorder_entries < 0:
        problems.append(f"monitor.flight_recorder_entries={m.flight_recorder_entries} must be >= 0 (0: off)")
    if m.straggler_window < 0 or m.straggler_window == 1:
        problems.append(f"monitor.straggler_window={m.straggler_window} must be 0 (off) or at least 2 steps")
    return problems


def _interval_problems(interval: object, mtbi_s: float | None) -> list[str]:
    problems = []
    if interval == "auto":
        if mtbi_s is None:
            problems.append("checkpoint.interval_steps=auto needs checkpoint.mtbi_s, the mean time between "
                            "interruptions of this job in seconds (e.g. checkpoint.mtbi_s=14400 for one every 4 h)")
    elif isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
        problems.append(f"checkpoint.interval_steps={interval} must be a whole number >= 0 (0: only final/preemption "
                        "saves) or auto (from measured save costs and checkpoint.mtbi_s)")
    if mtbi_s is not None and not (0 < mtbi_s < math.inf):
        problems.append(f"checkpoint.mtbi_s={mtbi_s} must be a positive number of seconds (the mean time between "
                        "interruptions, e.g. checkpoint.mtbi_s=14400)")
    return problems


def check_strategy_fits(cfg: DictConfig, world_size: int) -> list[str]:
    return check_strategy(cfg, world_size)


CHECKS: tuple[Check, ...] = (check_numbers, check_choices, check_strategy_fits, check_batch, check_model_and_data,
                             check_checkpoint, check_monitoring)


def find_problems(cfg: DictConfig, world_size: int) -> list[str]:
    """Every problem of the config, one line each; a check that needs a missing value is skipped."""
    problems = [f"{key} is required; set it on the command line ({key}=...)"
                for key in sorted(OmegaConf.missing_keys(cfg))]
    for check in CHECKS:
        try:
            problems += check(cfg, world_size)
        except MissingMandatoryValue:
            continue
    return problems


def load_config(overrides: Sequence[str], world_size: int) -> DictConfig:
    """Compose, resolve and validate; raise one ConfigError listing every problem found."""
    cfg, problems = compose_config(overrides)
    if cfg is not None:
        problems += find_problems(cfg, world_size)
    if problems:
        raise ConfigError(problems)
    return cfg
