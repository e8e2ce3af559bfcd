"""dtrain's ``ddp`` loop against a hand-written torch DDP loop doing the same work, per case, on 2 gloo ranks.

    python benchmarks/overhead.py --out benchmarks/results/overhead.json     # both cases; launches torchrun
    python benchmarks/overhead.py --baseline deepspeed --out benchmarks/results/overhead_deepspeed.json
                                  # dtrain's zero2 against a hand-written deepspeed.initialize loop

Cases (``--case``; default: both):

- ``default``: gpt_tiny (0.9M parameters), global batch 32 of 128 tokens, 2 micro-batches per rank, no
  checkpoints. The headline: top-level ``ratio`` (goal <= 1.02).
- ``small``: a 2-layer, 64-wide GPT, global batch 8 of 64 tokens: many short steps, so a fixed cost per
  step shows. A checkpoint every ``--checkpoint-every`` steps falls inside the timed window: dtrain saves
  through its CheckpointManager (DCP shards with CRC32C, fsync, RNG and trainer state, manifest commit,
  retention); the baseline saves the same model and optimizer state with plain
  ``torch.distributed.checkpoint.save`` (same writer threads, fsync) and prunes to the same ``keep_last``.

Identical work. Both arms start from the same weights, read the same samples in the same order (the
baseline's plain ``DataLoader`` takes dtrain's index order, ``RankSliceSampler``), and compute the same
step: token-weighted loss (one all-reduce of the target count, loss sum x dp / count backpropagated),
``no_sync`` on all but the last micro-batch, ``clip_grad_norm_``, AdamW, the LR schedule, and the global
loss all-reduced for logging. Each arm's loss at every step is in ``losses``; they must be equal. What
dtrain does on top (throughput/MFU/memory metrics, a metrics.jsonl line per step, the preemption vote,
the checkpoint's checksums, manifest and retention) is its overhead and is counted; ``work`` lists it.

Method. Both loops live in the same two processes and take turns in blocks of ``--steps`` steps, the
order flipping every round; round 0 warms up both and is not timed. On a shared 2-core machine the step
time drifts by several per cent within a minute, more than the overhead being measured, so the ratio is
paired: per round, dtrain's block time / the baseline's block time, where a block's time is the sum of
its steps' wall times (so a checkpoint save inside the block counts). ``ratio`` is the median of these
``round_ratios``, with a bootstrap 95% interval over rounds; ``rounds`` holds every timed step's seconds,
so the ratio can be recomputed from the file. Other numbers per case: ``*_step_s`` (median step time),
``overhead_ms_per_step`` (median over rounds of the block-time difference / steps), and in the
checkpoint case ``save_step_s`` / ``plain_step_s`` (median time of steps with and without a save).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig
    from torch.utils.data import Dataset

    from dtrain.distributed.env import DistEnv

COMMON = ["data=stdlib", "data.max_bytes=4000000", "strategy=ddp", "trainer.eval_every=0", "trainer.log_every=1",
          "trainer.sample_tokens=0", "logging.progress=off", "trainer.max_steps=1000000"]


@dataclass(frozen=True)
class Case:
    """One workload: config overrides, default rounds and steps per round, checkpoint interval (0: none)."""

    name: str
    what: str
    overrides: list[str]
    rounds: int
    steps: int
    checkpoint_every: int = 0
    keep_last: int = 2
    goal: str = "report only"


CASES: dict[str, Case] = {
    "default": Case("default", "gpt_tiny, global batch 32 x 128 tokens, 2 micro-batches per rank, no checkpoints",
                    ["model=gpt_tiny", "data.seq_len=128", "trainer.global_batch_size=32",
                     "trainer.micro_batch_size=8"], rounds=24, steps=3, goal="ratio <= 1.02"),
    "small": Case("small", "2-layer 64-wide GPT, global batch 8 x 64 tokens (short steps: per-step framework cost "
                  "shows), a checkpoint every `checkpoint_every` steps inside the timed window",
                  ["model=gpt_tiny", "model.n_layer=2", "model.d_model=64", "model.n_head=4", "data.seq_len=64",
                   "trainer.global_batch_size=8", "trainer.micro_batch_size=4"], rounds=24, steps=20,
                  checkpoint_every=10),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--case", choices=[*CASES, "all"], default="all")
    parser.add_argument("--baseline", choices=list(BASELINES), default="ddp", help="the hand-written loop")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds after one warm-up round "
                        "(default: the case's)")
    parser.add_argument("--steps", type=int, default=None, help="steps per loop per round (default: the case's)")
    parser.add_argument("--checkpoint-every", type=int, default=None,
                        help="checkpoint interval of the checkpoint case (default: the case's)")
    parser.add_argument("--nproc", type=int, default=2)
    return parser.parse_args(argv)


def launch(args: argparse.Namespace) -> int:
    """Re-run this file under torchrun on ``--nproc`` local ranks with the same arguments."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, *sys.argv[1:]]
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


# -- arms -------------------------------------------------------------------------------------------------
class Arm(Protocol):
    """One training loop under test. ``step`` runs one optimizer step (and a save when one is due) and
    returns the global loss; ``saved_steps`` lists the steps after which it saved a checkpoint."""

    name: str
    saved_steps: list[int]

    def step(self) -> float: ...

    def close(self) -> dict[str, Any]: ...


class DtrainArm:
    """dtrain's own loop: ``Trainer.advance`` (step, metrics, log line, checkpoint when due, preemption vote)."""

    name = "dtrain"

    def __init__(self, cfg: DictConfig, env: DistEnv, device: torch.device):
        from dtrain.trainer import Trainer

        self.trainer = Trainer.build(cfg, env, device)
        self.saved_steps: list[int] = []

    def step(self) -> float:
        metrics = self.trainer.advance()
        if "ckpt_blocked_s" in metrics:
            self.saved_steps.append(self.trainer.step)
        return metrics["loss"]

    def close(self) -> dict[str, Any]:
        """Finish background work, then (rank 0) list the committed steps and verify the newest one."""
        from dtrain.checkpoint.manager import committed_steps
        from dtrain.checkpoint.manifest import read_manifest, step_dir, verify_files

        trainer = self.trainer
        trainer.checkpoints.finalize()
        report: dict[str, Any] = {"saved_steps": self.saved_steps}
        if trainer.env.is_rank_zero:
            storage = trainer.checkpoints.storage
            committed = committed_steps(storage)
            report["committed_at_end"] = committed
            if committed:
                name = step_dir(committed[-1])
                manifest = read_manifest(storage, name)
                report["newest_verified"] = not verify_files(storage, name, manifest.files, checksums=True)
                report["newest_files"] = len(manifest.files)
        trainer.checkpoints.close()
        trainer.logger.close()
        trainer.preemption.close()
        return report


class TorchDDPArm:
    """What a careful user writes by hand with torch alone, doing the same arithmetic as dtrain.

    Plain ``DataLoader`` in dtrain's sample order, ``DistributedDataParallel`` with dtrain's bucket settings,
    token-weighted loss, ``no_sync`` accumulation, ``clip_grad_norm_``, AdamW + LambdaLR, the global loss
    all-reduced for logging; checkpoints with plain ``torch.distributed.checkpoint.save``."""

    name = "ddp"

    def __init__(self, cfg: DictConfig, env: DistEnv, device: torch.device, dataset: Dataset, checkpoint_dir: Path,
                 checkpoint_every: int, keep_last: int):
        from torch.nn.parallel import DistributedDataParallel

        from dtrain.optim import build_optimizer, build_scheduler

        model = self._model_data_and_checkpoints(cfg, device, dataset, checkpoint_dir, checkpoint_every, keep_last)
        self.optimizer = build_optimizer(model.named_parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self.model = DistributedDataParallel(model, bucket_cap_mb=cfg.strategy.bucket_cap_mb,
                                             gradient_as_bucket_view=True)
        self.write_threads = cfg.checkpoint.write_threads

    def _model_data_and_checkpoints(self, cfg: DictConfig, device: torch.device, dataset: Dataset,
                                    checkpoint_dir: Path, checkpoint_every: int, keep_last: int) -> torch.nn.Module:
        """What every hand-written arm shares: dtrain's initial weights, its sample order, the checkpoint plan."""
        import torch
        import torch.distributed as dist
        from torch.utils.data import DataLoader

        from dtrain.data.loader import RankSliceSampler
        from dtrain.models import build_model
        from dtrain.parallel.materialize import materialize

        t = cfg.trainer
        self.torch, self.dist = torch, dist
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        model = build_model(cfg.model, t.seed)
        materialize(model, device, t.seed)
        sampler = RankSliceSampler(len(dataset), t.global_batch_size, self.rank, self.world, t.seed, start=0)
        self.batches = iter(DataLoader(dataset, batch_sampler=sampler))
        self.micro, self.clip = t.micro_batch_size, t.grad_clip if t.grad_clip > 0 else float("inf")
        self.checkpoint_dir, self.checkpoint_every, self.keep_last = checkpoint_dir, checkpoint_every, keep_last
        self.steps_done = 0
        self.saved_steps: list[int] = []
        return model

    def _loss_sum(self, micro_batch: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        logits = self.model(micro_batch[:, :-1].clamp(min=0))
        return F.cross_entropy(logits.float().flatten(0, -2), micro_batch[:, 1:].flatten(), ignore_index=-100,
                               reduction="sum")

    def step(self) -> float:
        torch, dist = self.torch, self.dist
        batch = next(self.batches)
        count = (batch[:, 1:] != -100).sum()
        dist.all_reduce(count)
        scale = self.world / count.clamp(min=1).to(torch.float32)
        micro_batches = batch.split(self.micro)
        total = torch.zeros(())
        for index, micro_batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.model.no_sync():
                loss_sum = self._loss_sum(micro_batch)
                (loss_sum * scale).backward()
            total += loss_sum.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return self._end_step(total, count)

    def _end_step(self, total: torch.Tensor, count: torch.Tensor) -> float:
        """The global token-mean loss of the step for logging, then a save when one is due."""
        self.dist.all_reduce(total)
        loss = (total / count.clamp(min=1).to(self.torch.float32)).item()
        self.steps_done += 1
        if self.checkpoint_every and self.steps_done % self.checkpoint_every == 0:
            self.save()
        return loss

    def _prune(self) -> None:
        """Record the save just made; rank 0 deletes all but the newest ``keep_last``."""
        self.saved_steps.append(self.steps_done)
        if self.rank == 0:
            for old in self.saved_steps[:-self.keep_last]:
                shutil.rmtree(self.checkpoint_dir / f"step_{old:08d}", ignore_errors=True)

    def save(self) -> None:
        """Model + optimizer (+ step) with plain DCP; rank 0 then deletes all but the newest ``keep_last``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state, "step": self.steps_done}
        writer = dcp.FileSystemWriter(self.checkpoint_dir / f"step_{self.steps_done:08d}",
                                      thread_count=self.write_threads)
        dcp.save(state, storage_writer=writer)  # every rank returns after rank 0 wrote .metadata
        self._prune()

    def close(self) -> dict[str, Any]:
        report: dict[str, Any] = {"saved_steps": self.saved_steps}
        if self.rank == 0 and self.saved_steps:
            kept = sorted(p.name for p in self.checkpoint_dir.glob("step_*") if (p / ".metadata").exists())
            report["kept_at_end"] = [int(name.split("_")[1]) for name in kept]
        return report


class DeepSpeedArm(TorchDDPArm):
    """What a DeepSpeed user writes by hand: ``deepspeed.initialize`` with a ZeRO-2 config for the same
    batch sizes and clipping, the same AdamW and LR schedule as a client optimizer (no op compiled), and
    DeepSpeed's documented loop, ``engine.backward`` and ``engine.step`` on every micro-batch with the
    engine finding the accumulation boundary; the same token-weighted loss (``scale_wrt_gas=False``) and
    sample order as dtrain's ``zero2``; checkpoints with ``engine.save_checkpoint``."""

    name = "deepspeed"
    strategy = "zero2"

    def __init__(self, cfg: DictConfig, env: DistEnv, device: torch.device, dataset: Dataset, checkpoint_dir: Path,
                 checkpoint_every: int, keep_last: int):
        import deepspeed

        from dtrain.optim import build_optimizer, build_scheduler
        from dtrain.parallel.deepspeed_private import skip_shm_comm_compile

        skip_shm_comm_compile()  # as dtrain does on a CPU
        model = self._model_data_and_checkpoints(cfg, device, dataset, checkpoint_dir, checkpoint_every, keep_last)
        optimizer = build_optimizer(model.named_parameters(), cfg.optim)
        t = cfg.trainer
        config = {"train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
                  "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * self.world),
                  "gradient_clipping": t.grad_clip, "zero_optimization": {"stage": 2},
                  "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False,
            lr_scheduler=build_scheduler(optimizer, cfg.optim, t.max_steps))

    def step(self) -> float:
        torch, dist, engine = self.torch, self.dist, self.model
        batch = next(self.batches)
        count = (batch[:, 1:] != -100).sum()
        dist.all_reduce(count)
        scale = self.world / count.clamp(min=1).to(torch.float32)
        total = torch.zeros(())
        for micro_batch in batch.split(self.micro):
            loss_sum = self._loss_sum(micro_batch)
            engine.backward(loss_sum * scale, scale_wrt_gas=False)
            engine.step()  # the optimizer and LR step only at the accumulation boundary
            total += loss_sum.detach()
        return self._end_step(total, count)

    def save(self) -> None:
        """DeepSpeed's own checkpoint; rank 0 then deletes all but the newest ``keep_last``."""
        self.model.save_checkpoint(str(self.checkpoint_dir), tag=f"step_{self.steps_done:08d}")
        self._prune()

    def close(self) -> dict[str, Any]:
        report: dict[str, Any] = {"saved_steps": self.saved_steps}
        if self.rank == 0 and self.saved_steps:
            kept = sorted(p.name for p in self.checkpoint_dir.glob("step_*") if p.is_dir())
            report["kept_at_end"] = [int(name.split("_")[1]) for name in kept]
        return report


BASELINES: dict[str, type] = {"ddp": TorchDDPArm, "deepspeed": DeepSpeedArm}


# -- measurement ------------------------------------------------------------------------------------------
def bootstrap_median_interval(values: list[float], resamples: int = 2000) -> list[float]:
    """95% interval of the median by resampling the rounds (seeded, so the JSON is reproducible)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def timed(fn: Callable[[], float]) -> tuple[float, float]:
    """(seconds, return value) of one call."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def round_ratio(block: dict[str, list[float]], baseline: str) -> float:
    """dtrain's block time / the baseline's: sums of step times, so a save inside the block counts."""
    return sum(block["dtrain"]) / sum(block[baseline])


@dataclass
class Record:
    """Everything one case measured: timed rounds, every step's loss per arm."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    losses: dict[str, list[float]] = field(default_factory=dict)


def run_rounds(arms: dict[str, Arm], rounds: int, steps: int) -> Record:
    """Alternate the arms in blocks of ``steps`` steps; round 0 warms up and is not recorded in ``rounds``."""
    record = Record(losses={name: [] for name in arms})
    names = list(arms)
    for index in range(rounds + 1):
        order = names if index % 2 == 0 else names[::-1]
        block: dict[str, list[float]] = {}
        saves: dict[str, list[int]] = {}
        for name in order:
            before = len(arms[name].saved_steps)
            block[name] = []
            for _ in range(steps):
                seconds, loss = timed(arms[name].step)
                block[name].append(seconds)
                record.losses[name].append(loss)
            saves[name] = arms[name].saved_steps[before:]
        if index > 0:
            record.rounds.append({"order": order, "step_s": block, "saved_steps": saves})
    return record


def summarize(case: Case, record: Record, baseline: str, steps: int, checkpoint_every: int) -> dict[str, Any]:
    """The case's JSON: ratio from the recorded rounds, medians, losses and their agreement."""
    ratios = [round_ratio(r["step_s"], baseline) for r in record.rounds]
    per_step = {name: [s for r in record.rounds for s in r["step_s"][name]] for name in ("dtrain", baseline)}
    base, ours = statistics.median(per_step[baseline]), statistics.median(per_step["dtrain"])
    extra = [(sum(r["step_s"]["dtrain"]) - sum(r["step_s"][baseline])) / steps for r in record.rounds]
    diffs = [abs(a - b) for a, b in zip(record.losses["dtrain"], record.losses[baseline])]
    result = {"case": case.name, "what": case.what, "baseline": baseline, "rounds_timed": len(record.rounds),
              "steps_per_round": steps,
              "checkpoint_every": checkpoint_every,
              "ratio": statistics.median(ratios), "ratio_95ci": bootstrap_median_interval(ratios),
              "goal": case.goal, "round_ratios": ratios,
              "ratio_definition": "median over timed rounds of sum(dtrain step_s) / sum(baseline step_s)",
              "baseline_step_s": base, "dtrain_step_s": ours, "ratio_of_medians": ours / base,
              "overhead_ms_per_step": 1000 * statistics.median(extra),
              "identical_losses": record.losses["dtrain"] == record.losses[baseline],
              "max_abs_loss_diff": max(diffs) if diffs else 0.0,
              "losses": record.losses, "rounds": record.rounds}
    if checkpoint_every:
        result.update(save_split(record, ("dtrain", baseline), steps))
    return result


def save_split(record: Record, names: tuple[str, ...], steps: int) -> dict[str, Any]:
    """Median time of the steps that saved a checkpoint and of those that did not, per arm."""
    saving: dict[str, list[float]] = {name: [] for name in names}
    plain: dict[str, list[float]] = {name: [] for name in names}
    for index, r in enumerate(record.rounds, start=1):
        for name in names:
            first = index * steps + 1  # step number of the block's first step (round 0 = steps 1..steps)
            for offset, seconds in enumerate(r["step_s"][name]):
                (saving if first + offset in r["saved_steps"][name] else plain)[name].append(seconds)
    return {"save_step_s": {n: statistics.median(v) if v else None for n, v in saving.items()},
            "plain_step_s": {n: statistics.median(v) if v else None for n, v in plain.items()}}


WORK = {
    "identical": ["initial weights (same seed and init)", "samples and their order (dtrain's RankSliceSampler)",
                  "token-weighted loss with one all-reduce of the target count", "no_sync on all but the last "
                  "micro-batch", "DDP bucket_cap_mb and gradient_as_bucket_view", "clip_grad_norm_(foreach=True)",
                  "AdamW and LR schedule", "global loss all-reduced and read every step",
                  "checkpoint case: model + optimizer state through DCP with the same writer threads and fsync, "
                  "pruned to the same keep_last"],
    "dtrain_only_counted_as_overhead": ["step metrics (lr, grad norm, tokens/s, MFU, peak memory)",
                                        "a metrics.jsonl line per step (log_every=1)",
                                        "the preemption vote (a non-blocking all-reduce per step)",
                                        "checkpoint case: CRC32C of every file, RNG and trainer-state files, "
                                        "config.yaml, directory fsyncs, manifest commit, writer-lease check, "
                                        "retention in a background thread"],
}


# -- one case ---------------------------------------------------------------------------------------------
def shared_tempdir(env: DistEnv) -> str:
    """A folder every rank uses (rank 0 makes it): checkpoints of all ranks go into the same step folder."""
    from dtrain.distributed import collectives

    return collectives.broadcast_object(tempfile.mkdtemp(prefix="dtrain-overhead-") if env.is_rank_zero else None)


def run_case(case: Case, args: argparse.Namespace, env: DistEnv, device: torch.device) -> dict[str, Any]:
    from dtrain.config.validate import load_config
    from dtrain.distributed import collectives

    rounds = case.rounds if args.rounds is None else args.rounds
    steps = case.steps if args.steps is None else args.steps
    # --checkpoint-every changes the interval of a case that checkpoints; it adds none to one that does not
    every = args.checkpoint_every if case.checkpoint_every and args.checkpoint_every else case.checkpoint_every
    strategy = getattr(BASELINES[args.baseline], "strategy", "ddp")  # dtrain runs what the baseline runs
    common = [o if o != "strategy=ddp" else f"strategy={strategy}" for o in COMMON]
    overrides = [*case.overrides, *common, f"checkpoint.interval_steps={every}",
                 f"checkpoint.keep_last={case.keep_last}"]
    folder = Path(shared_tempdir(env))
    try:
        cfg = load_config([*overrides, f"run.dir={folder / 'run'}"], env.world_size)
        dtrain_arm = DtrainArm(cfg, env, device)
        baseline_arm = BASELINES[args.baseline](cfg, env, device, dtrain_arm.trainer.train_loader.dataset,
                                                folder / "baseline", every, case.keep_last)
        arms: dict[str, Arm] = {"dtrain": dtrain_arm, args.baseline: baseline_arm}
        record = run_rounds(arms, rounds, steps)
        result = {**summarize(case, record, args.baseline, steps, every), "overrides": overrides}
        reports = {name: arm.close() for name, arm in arms.items()}
        result["checkpoints"] = reports if every else None
        result["work"] = WORK
        return result
    finally:
        collectives.barrier()
        if env.is_rank_zero:
            shutil.rmtree(folder, ignore_errors=True)


def worker(args: argparse.Namespace) -> None:
    import torch

    from dtrain.distributed.env import discover_env
    from dtrain.distributed.process_group import destroy_process_group, init_process_group

    env = discover_env()
    device = torch.device("cpu")
    init_process_group(env, "gloo", device, 300)
    try:
        names = list(CASES) if args.case == "all" else [args.case]
        cases = {name: run_case(CASES[name], args, env, device) for name in names}
        if env.is_rank_zero:
            write_result(args.out, cases, env.world_size, torch.__version__)
    finally:
        destroy_process_group()


SUMMARY = ("ratio", "ratio_95ci", "overhead_ms_per_step", "dtrain_step_s", "baseline_step_s", "save_step_s",
           "plain_step_s", "identical_losses")


def write_result(out: str, cases: dict[str, dict[str, Any]], world_size: int, torch_version: str) -> None:
    """Top level: the headline case's ratio (``default`` when it ran), every case under ``cases``."""
    headline = "default" if "default" in cases else next(iter(cases))
    top = cases[headline]
    result = {"benchmark": "overhead", "world_size": world_size, "backend": "gloo", "torch": torch_version,
              "cpu_count": os.cpu_count(), "headline_case": headline, "ratio": top["ratio"],
              "ratio_95ci": top["ratio_95ci"], "goal": top["goal"],
              "summary": {name: {k: c[k] for k in SUMMARY if k in c} for name, c in cases.items()},
              "cases": cases}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}, indent=2))


def main() -> None:
    args = parse_args()
    if "RANK" not in os.environ:
        sys.exit(launch(args))
    worker(args)


if __name__ == "__main__":
    main()
