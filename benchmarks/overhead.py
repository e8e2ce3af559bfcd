"""dtrain's ``ddp`` loop against a minimal hand-written torch DDP loop: same model, data, batch, ranks.

    python benchmarks/overhead.py --out overhead.json          # launches itself on 2 gloo ranks
    python benchmarks/overhead.py --baseline deepspeed --out overhead-ds.json
                                  # dtrain's zero2 against a hand-written deepspeed.initialize loop

Both loops live in the same two processes and take turns in short blocks of steps (the order flips
every round); the first round is warm-up. On a shared 2-core machine the step time drifts by several
per cent within a minute, far more than the overhead being measured, so the headline ``ratio`` is
paired: the median over rounds of (dtrain block median / baseline block median), which cancels drift
that both loops of a round share. The JSON also holds both overall medians, their plain ratio and a
bootstrap 95% interval of the paired ratio, so the noise of the measurement is visible (goal: <= 1.02).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OVERRIDES = ["model=gpt_tiny", "data=stdlib", "data.seq_len=128", "data.max_bytes=4000000", "strategy=ddp",
             "trainer.global_batch_size=32", "trainer.micro_batch_size=8", "trainer.eval_every=0",
             "trainer.log_every=1", "trainer.sample_tokens=0", "logging.progress=off", "trainer.max_steps=1000000"]
# --baseline deepspeed: the same run as ZeRO stage 2 (see DeepSpeedBaselineLoop)
DEEPSPEED_OVERRIDES = [o if o != "strategy=ddp" else "strategy=zero2" for o in OVERRIDES]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--rounds", type=int, default=24, help="rounds after one warm-up round")
    parser.add_argument("--steps", type=int, default=3, help="steps per loop per round")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--baseline", choices=("ddp", "deepspeed"), default="ddp",
                        help="ddp: dtrain's ddp vs torch DDP by hand; deepspeed: dtrain's zero2 vs "
                             "deepspeed.initialize by hand")
    return parser.parse_args()


def launch(args: argparse.Namespace) -> int:
    """Re-run this file under torchrun on ``--nproc`` local ranks."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               __file__, "--out", args.out, "--rounds", str(args.rounds), "--steps", str(args.steps),
               "--baseline", args.baseline]
    return subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


class BaselineLoop:
    """What a user writes by hand: DistributedSampler, DDP, no_sync accumulation, clipping, AdamW, LambdaLR."""

    def __init__(self, cfg, device):
        import torch
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch.nn.parallel import DistributedDataParallel
        from torch.utils.data import DataLoader, DistributedSampler

        from dtrain.data.loader import build_dataset
        from dtrain.models import build_model
        from dtrain.optim import build_optimizer, build_scheduler
        from dtrain.parallel.materialize import materialize

        self.torch, self.F = torch, F
        model = build_model(cfg.model, cfg.trainer.seed)
        materialize(model, device, cfg.trainer.seed)
        self.optimizer = build_optimizer(model.named_parameters(), cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.trainer.max_steps)
        self.model = DistributedDataParallel(model)
        dataset = build_dataset(cfg.data, "train")
        local_batch = cfg.trainer.global_batch_size // dist.get_world_size()
        sampler = DistributedSampler(dataset, seed=cfg.trainer.seed)
        self.batches = iter(DataLoader(dataset, batch_size=local_batch, sampler=sampler, drop_last=True))
        self.micro, self.clip = cfg.trainer.micro_batch_size, cfg.trainer.grad_clip

    def step(self) -> float:
        batch = next(self.batches)
        chunks = batch.split(self.micro)
        for i, chunk in enumerate(chunks):
            context = self.model.no_sync() if i < len(chunks) - 1 else contextlib.nullcontext()
            with context:
                logits = self.model(chunk[:, :-1])
                loss = self.F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
                (loss / len(chunks)).backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return loss.item()


class DeepSpeedBaselineLoop:
    """What a DeepSpeed user writes by hand: the same model, AdamW, LR schedule and data as BaselineLoop,
    ``deepspeed.initialize`` with the ZeRO-2 config dtrain generates for this run (batch sizes, clipping,
    stage; the client AdamW, so no op is compiled), and DeepSpeed's documented loop: ``engine.backward``
    and ``engine.step`` on every micro-batch, the engine finding the accumulation boundary itself."""

    def __init__(self, cfg, device):
        import deepspeed
        import torch.distributed as dist
        import torch.nn.functional as F
        from torch.utils.data import DataLoader, DistributedSampler

        from dtrain.data.loader import build_dataset
        from dtrain.models import build_model
        from dtrain.optim import build_optimizer, build_scheduler
        from dtrain.parallel.deepspeed_private import skip_shm_comm_compile
        from dtrain.parallel.materialize import materialize

        self.F = F
        skip_shm_comm_compile()  # as dtrain does on a CPU: no shared-memory comm op to compile
        model = build_model(cfg.model, cfg.trainer.seed)
        materialize(model, device, cfg.trainer.seed)
        optimizer = build_optimizer(model.named_parameters(), cfg.optim)
        t, world = cfg.trainer, dist.get_world_size()
        config = {"train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": t.micro_batch_size,
                  "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * world),
                  "gradient_clipping": t.grad_clip, "zero_optimization": {"stage": 2},
                  "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False,
            lr_scheduler=build_scheduler(optimizer, cfg.optim, t.max_steps))
        dataset = build_dataset(cfg.data, "train")
        sampler = DistributedSampler(dataset, seed=t.seed)
        self.batches = iter(DataLoader(dataset, batch_size=t.global_batch_size // world, sampler=sampler,
                                       drop_last=True))
        self.micro = t.micro_batch_size

    def step(self) -> float:
        for chunk in next(self.batches).split(self.micro):
            logits = self.engine(chunk[:, :-1])
            loss = self.F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1))
            self.engine.backward(loss)
            self.engine.step()  # an optimizer step (and LR step) only at the accumulation boundary
        return loss.item()


BASELINES = {"ddp": (OVERRIDES, BaselineLoop), "deepspeed": (DEEPSPEED_OVERRIDES, DeepSpeedBaselineLoop)}


def bootstrap_median_interval(values: list[float], resamples: int = 2000) -> list[float]:
    """95% interval of the median by resampling the rounds (seeded, so the JSON is reproducible)."""
    rng = random.Random(0)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def worker(args: argparse.Namespace) -> None:
    import torch

    from dtrain.config.validate import load_config
    from dtrain.distributed.env import discover_env
    from dtrain.distributed.process_group import destroy_process_group, init_process_group
    from dtrain.trainer import Trainer

    env = discover_env()
    device = torch.device("cpu")
    overrides, baseline_loop = BASELINES[args.baseline]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config([*overrides, f"run.dir={run_dir}"], env.world_size)
        init_process_group(env, "gloo", device, 300)
        trainer = Trainer.build(cfg, env, device)
        baseline = baseline_loop(cfg, device)
        times: dict[str, list[float]] = {"baseline": [], "dtrain": []}
        round_ratios: list[float] = []
        loops = {"baseline": baseline.step, "dtrain": trainer.advance}
        for round_index in range(args.rounds + 1):
            order = ["baseline", "dtrain"] if round_index % 2 == 0 else ["dtrain", "baseline"]
            block = {name: [timed(loops[name]) for _ in range(args.steps)] for name in order}
            if round_index > 0:  # round 0 warms up both
                for name, samples in block.items():
                    times[name].extend(samples)
                round_ratios.append(statistics.median(block["dtrain"]) / statistics.median(block["baseline"]))
        trainer.logger.close()
        if env.is_rank_zero:
            base, ours = statistics.median(times["baseline"]), statistics.median(times["dtrain"])
            result = {"benchmark": "overhead", "baseline": args.baseline, "world_size": env.world_size,
                      "backend": "gloo", "overrides": overrides, "rounds": args.rounds, "steps_per_round": args.steps,
                      "baseline_step_s": base, "dtrain_step_s": ours,
                      "ratio": statistics.median(round_ratios),
                      "ratio_95ci": bootstrap_median_interval(round_ratios),
                      "ratio_of_medians": ours / base, "round_ratios": round_ratios,
                      "goal": "ratio <= 1.02", "torch": torch.__version__}
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
            print(json.dumps(result, indent=2))
        destroy_process_group()


def main() -> None:
    args = parse_args()
    if "RANK" not in os.environ:
        sys.exit(launch(args))
    worker(args)


if __name__ == "__main__":
    main()
