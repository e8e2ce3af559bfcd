"""The training loop: batch -> strategy.train_step -> metrics -> (eval) -> log. Nothing strategy-specific.

``Trainer.build`` wires the parts from a validated config; ``run_step`` is one full iteration of the
loop (also what the overhead benchmark times); ``fit`` repeats it and samples text at the end.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from dtrain.checkpoint.manager import CheckpointManager, Restored
from dtrain.checkpoint.preemption import Preempted, PreemptionWatcher
from dtrain.config.compose import config_hash
from dtrain.config.errors import ConfigError
from dtrain.data.loader import ResumableLoader, build_dataset, eval_batches
from dtrain.distributed.env import DistEnv
from dtrain.metrics.goodput import NullLedger, open_ledger
from dtrain.metrics.exposed_comm import CommMeter, world_dimension
from dtrain.metrics.loggers import MetricLogger, build_loggers
from dtrain.metrics.monitor import RunMonitor
from dtrain.metrics.throughput import peak_memory_bytes, step_throughput
from dtrain.models import build_model
from dtrain.models.generate import generate
from dtrain.optim import build_optimizer, build_scheduler
from dtrain.parallel.memory import ADAM_STATES, check_memory_fit, local_numel_and_bytes, optimizer_params
from dtrain.strategies import Strategy, StepSpec, build_strategy
from dtrain.strategies.layout import parallel_dims

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: DictConfig, env: DistEnv, device: torch.device, strategy: Strategy,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, train_loader: ResumableLoader,
                 val_dataset: Dataset | None, logger: MetricLogger, flops_per_token: float | None,
                 checkpoints: CheckpointManager, preemption: PreemptionWatcher | None = None,
                 monitor: RunMonitor | None = None, goodput: NullLedger | None = None,
                 comm: CommMeter | None = None):
        self.cfg, self.env, self.device, self.strategy = cfg, env, device, strategy
        self.scheduler, self.train_loader, self.val_dataset = scheduler, train_loader, val_dataset
        self.logger, self.flops_per_token = logger, flops_per_token
        self.checkpoints, self.preemption, self.comm = checkpoints, preemption, comm
        self.monitor = monitor if monitor is not None else RunMonitor.off(env, device)
        self.step = 0
        self.tokens_per_step = cfg.trainer.global_batch_size * cfg.data.seq_len
        self._grace_warned = False
        self.goodput = goodput or NullLedger()  # where the wall time goes (rank 0 writes the run's ledger)
        self.restored: Restored | None = None

    @classmethod
    def build(cls, cfg: DictConfig, env: DistEnv, device: torch.device,
              write_bandwidth: float | None = None) -> "Trainer":
        """Wire every part from a validated config, then resume from the newest committed checkpoint."""
        t = cfg.trainer
        monitor = RunMonitor.build(cfg, env, device, {"strategy": cfg.strategy.name, "world_size": str(env.world_size),
                                                      "model": cfg.model._target_.rsplit(".", 1)[-1]})
        torch.manual_seed(t.seed + env.rank)  # dropout and sampling differ per rank; weights do not
        train_set = build_dataset(cfg.data, "train")
        val_set = build_dataset(cfg.data, "val") if t.eval_every > 0 else None
        model = build_model(cfg.model, t.seed)
        flops = model.flops_per_token(cfg.data.seq_len) if hasattr(model, "flops_per_token") else None
        n_params = sum(p.numel() for p in model.parameters())
        spec = StepSpec(t.global_batch_size, t.micro_batch_size, t.grad_clip, t.precision, t.seed)
        strategy = build_strategy(cfg, spec, env, device)
        strategy.setup(model, lambda named: build_optimizer(named, cfg.optim))
        check_memory_fit(cfg, env.world_size, env.rank, strategy.optimizer, device, env.local_world_size)
        scheduler = build_scheduler(strategy.optimizer, cfg.optim, t.max_steps)
        loader = ResumableLoader(train_set, t.global_batch_size, strategy.dp_rank, strategy.dp_size, t.seed,
                                 t.data_workers)
        accumulation = t.global_batch_size // (t.micro_batch_size * strategy.dp_size)
        log.info("model %s: %.2fM parameters | strategy %s on %d ranks (data-parallel %d) | global batch %d = "
                 "micro %d x accumulation %d x dp %d | %d tokens/step | run dir %s",
                 cfg.model._target_.rsplit(".", 1)[-1], n_params / 1e6, strategy.name, env.world_size,
                 strategy.dp_size, t.global_batch_size, t.micro_batch_size, accumulation, strategy.dp_size,
                 t.global_batch_size * cfg.data.seq_len, cfg.run.dir)
        checkpoints = CheckpointManager(cfg, env, config_hash(cfg), strategy.name)
        preemption = PreemptionWatcher(list(cfg.checkpoint.preemption_signals), device, cfg.checkpoint.grace_period_s,
                                       lambda: checkpoints.newest_committed)
        monitor.attach(checkpoints, preemption, role=getattr(strategy, "pp_rank", 0))
        goodput = open_ledger(cfg.run.dir, env.is_rank_zero, env.world_size)
        checkpoints.on_commit = goodput.commit
        trainer = cls(cfg, env, device, strategy, scheduler, loader, val_set, build_loggers(cfg, env.is_rank_zero),
                      flops, checkpoints, preemption, monitor, goodput,
                      CommMeter.for_run(t.measure_comm, device, _world_dimension(cfg, env.world_size)))
        restore_start = time.perf_counter()
        try:
            trainer.resume()
        except BaseException:
            checkpoints.close()  # releases the writer lease
            monitor.close()
            raise
        restore_s = time.perf_counter() - restore_start
        trainer.warn_if_save_exceeds_grace(write_bandwidth)
        restored = trainer.restored
        goodput.begin(trainer.step, restored and restored.step, restored and restored.manifest_crc32c, restore_s)
        return trainer

    # -- checkpoint state ------------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """Everything besides model and optimizer that an exact resume needs (JSON, same on every rank)."""
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "loader": self.train_loader.state_dict(),
                "seed": self.cfg.trainer.seed}

    def resume(self) -> None:
        templates: list[dict[str, Any]] = []

        def template() -> dict[str, Any]:
            templates.append(self.strategy.state_dict())
            return templates[-1]

        restored = self.checkpoints.restore(template)
        if restored is None:
            return
        self.strategy.load_state_dict(templates[-1])
        self.scheduler.load_state_dict(restored.extras["scheduler"])
        try:
            self.train_loader.load_state_dict(restored.extras["loader"])
        except ValueError as e:
            raise ConfigError(f"cannot resume from {restored.source}: {e}") from None
        self.step, self.restored = restored.step, restored

    def save_checkpoint(self, blocking: bool = False, kind: str = "interval") -> float:
        blocked = self.checkpoints.save(self.step, self.strategy.state_dict(), self.extra_state(), blocking)
        self.goodput.checkpoint(self.step, blocked, kind)
        self.warn_if_save_exceeds_grace()
        return blocked

    def warn_if_save_exceeds_grace(self, write_bandwidth: float | None = None) -> None:
        """A preemption save must finish between the signal and SIGKILL; say so early when it cannot."""
        grace = self.cfg.checkpoint.grace_period_s
        if self._grace_warned or not self.env.is_rank_zero:
            return
        if write_bandwidth:
            # from the parameters, not from strategy.state_dict(): building a state dict initializes an empty
            # optimizer (a zero step), and doing that on rank 0 alone would desynchronize the ranks' Adam
            _, param_bytes = local_numel_and_bytes(optimizer_params(self.strategy.optimizer))
            state_bytes = param_bytes * (1 + ADAM_STATES)
            estimate, how = state_bytes / write_bandwidth, f"estimated from {state_bytes / 1e6:.0f} MB per rank at " \
                f"{write_bandwidth / 1e6:.0f} MB/s"
        elif self.checkpoints.last_save_seconds is not None:
            estimate, how = self.checkpoints.last_save_seconds, "measured on the last save"
        else:
            return
        if estimate > 0.8 * grace:
            self._grace_warned = True
            log.warning("a checkpoint save takes ~%.1f s (%s) but checkpoint.grace_period_s=%.0f: a preemption "
                        "save may be killed; raise the launcher's grace period or use faster storage", estimate,
                        how, grace)

    def run_step(self) -> dict[str, Any]:
        """One optimizer step with its measurements. Step time includes waiting for data."""
        if self.comm is not None:
            self.comm.begin_step()
        start = time.perf_counter()
        self.monitor.enter("data", self.step + 1)
        batch = next(self.train_loader)
        data_time = time.perf_counter() - start
        lr = self.scheduler.get_last_lr()[0]
        self.monitor.enter("step", self.step + 1)
        cpu_start = time.thread_time()
        result = self.strategy.train_step(batch)
        self.scheduler.step()
        loss = result.loss.item()  # synchronizes the device, so the clock below is honest
        self.monitor.compute_done(cpu_start)
        step_time = time.perf_counter() - start
        self.step += 1
        metrics: dict[str, Any] = {"loss": loss, "lr": lr, "step_time_s": step_time,
                                   "data_wait_share": data_time / step_time,
                                   "grad_norm": float(result.grad_norm),
                                   "peak_mem_gib": peak_memory_bytes(self.device) / 2**30}
        metrics.update(step_throughput(self.tokens_per_step, step_time, self.flops_per_token,
                                       self.env.world_size, self.cfg.hardware.peak_flops_per_device))
        if self.comm is not None:
            metrics.update(self.comm.end_step(step_time))
        return metrics

    def evaluate(self) -> float:
        t = self.cfg.trainer
        losses = [self.strategy.eval_loss(batch) for batch in
                  eval_batches(self.val_dataset, t.global_batch_size, self.strategy.dp_rank, self.strategy.dp_size,
                               t.eval_batches)]
        return float(torch.stack(losses).mean()) if losses else float("nan")

    def advance(self) -> dict[str, Any]:
        """One turn of the loop: a step, then evaluation, checkpoint, logging and the preemption check."""
        t = self.cfg.trainer
        metrics = self.run_step()
        self.goodput.step(self.step, metrics["step_time_s"], metrics["step_time_s"] * metrics["data_wait_share"])
        if self.val_dataset is not None and (self.step % t.eval_every == 0 or self.step == t.max_steps):
            self.monitor.enter("eval", self.step)
            start = time.perf_counter()
            metrics["val_loss"] = self.evaluate()
            self.goodput.evaluation(self.step, time.perf_counter() - start)
        if self.checkpoints.due(self.step, metrics["step_time_s"]):
            self.monitor.enter("checkpoint", self.step)
            metrics["ckpt_blocked_s"] = self.save_checkpoint()
        goodput = self.goodput.ratio()
        if goodput is not None:
            metrics["goodput"] = goodput
        metrics.update(self.monitor.step_done(self.step, metrics))
        if (self.step % t.log_every == 0 or self.step == t.max_steps or "val_loss" in metrics
                or "ckpt_blocked_s" in metrics or "straggler_scores" in metrics):
            self.logger.log(self.step, metrics)
        self.monitor.enter("vote", self.step)
        if self.preemption is not None and self.preemption.agreed():
            self.preemption.saving()
            self.monitor.enter("checkpoint", self.step)
            self.save_checkpoint(blocking=True, kind="preemption")
            self.checkpoints.finalize()
            raise Preempted(self.step, self.preemption.signal_name)
        return metrics

    def fit(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if self.step:
            log.info("continuing at step %d of %d", self.step, self.cfg.trainer.max_steps)
        self.monitor.start()
        try:
            while self.step < self.cfg.trainer.max_steps:
                metrics = self.advance()
            self.monitor.enter("checkpoint", self.step)
            if self.cfg.checkpoint.save_final:
                self.save_checkpoint(blocking=True, kind="final")
            self.checkpoints.finalize()
        except BaseException as e:
            self.goodput.end(self.step, "preempted" if isinstance(e, Preempted) else "error")
            raise
        finally:
            self.train_loader.close()
            self.monitor.close()
            self.logger.close()
            self.checkpoints.close()
            if self.comm is not None:
                self.comm.close()
            if self.preemption is not None:
                self.preemption.close()
        self.sample_text()
        self.goodput.end(self.step, "done")
        return metrics

    def sample_text(self) -> str | None:
        """Decode a short sample on every rank in lockstep (sharded models need all of them); rank 0 prints."""
        t = self.cfg.trainer
        dataset = self.train_loader.dataset
        model = self.strategy.sampling_model()
        if t.sample_tokens <= 0 or model is None or not hasattr(dataset, "decode"):
            return None
        prompt = dataset.encode(t.sample_prompt)
        tokens = generate(model, prompt, t.sample_tokens, self.cfg.data.seq_len, t.sample_temperature,
                          seed=t.seed, device=self.device)
        text = t.sample_prompt + dataset.decode(tokens)
        if self.env.is_rank_zero:
            print(f"\n--- sample after {self.step} steps ---\n{text}\n--- end of sample ---", flush=True)
        return text


def _world_dimension(cfg: DictConfig, world_size: int) -> str:
    """Which mesh dimension the default process group's collectives belong to (exposed-comm attribution)."""
    dims = parallel_dims(cfg.strategy.name, cfg.strategy, world_size)
    return world_dimension(dims.degrees if dims is not None else None)
