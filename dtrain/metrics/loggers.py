"""Metric sinks. Decided once: rank 0 gets the real ones, every other rank a no-op."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from dtrain.config.secrets import redacted_container

log = logging.getLogger(__name__)


class MetricLogger(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger:
    """``metrics.jsonl``: one object per logged step; appended, so a resumed run continues the file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", buffering=1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self._file.close()


class ConsoleLogger:
    """Progress on rank 0: a rich bar on a terminal, one compact line per logged step otherwise."""

    def __init__(self, total_steps: int, mode: str):
        from rich.console import Console

        self.console = Console(file=sys.stdout, highlight=False)
        use_bar = mode == "bar" or (mode == "auto" and self.console.is_terminal)
        self.progress = None
        if use_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"), console=self.console)
            self.task = self.progress.add_task("train", total=total_steps, info="")
            self.progress.start()

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        parts = []
        for key, fmt in (("loss", "loss {:.4f}"), ("val_loss", "val {:.4f}"), ("lr", "lr {:.2e}"),
                         ("tokens_per_s", "{:,.0f} tok/s"), ("step_time_s", "{:.3f} s/step"),
                         ("mfu", "mfu {:.1%}"), ("grad_norm", "gnorm {:.2f}")):
            if key in metrics:
                parts.append(fmt.format(metrics[key]))
        info = " | ".join(parts)
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        else:
            self.console.print(f"step {step:>6} | {info}", soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class TensorBoardLogger:
    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, cfg: DictConfig, run_dir: Path, run_name: str, config: DictConfig):
        import wandb

        self.run = wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=str(run_dir),
                              name=run_name, id=run_name, resume="allow",
                              config=redacted_container(config))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MultiLogger:
    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(step, metrics)

    def close(self) -> None:
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as e:  # closing one sink must not keep the others open
                log.warning("closing %s failed: %s", type(logger).__name__, e)


def build_loggers(cfg: DictConfig, is_rank_zero: bool) -> MetricLogger:
    if not is_rank_zero:
        return NullLogger()
    run_dir = Path(cfg.run.dir)
    loggers: list[MetricLogger] = [JsonlLogger(run_dir / "metrics.jsonl")]
    if cfg.logging.progress != "off":
        loggers.append(ConsoleLogger(cfg.trainer.max_steps, cfg.logging.progress))
    if cfg.logging.tensorboard.enabled:
        loggers.append(TensorBoardLogger(run_dir / "tensorboard"))
    if cfg.logging.wandb.enabled:
        loggers.append(WandbLogger(cfg.logging.wandb, run_dir, cfg.run.name, cfg))
    return MultiLogger(loggers)
