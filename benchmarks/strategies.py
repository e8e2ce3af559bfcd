"""Step time, memory and communication of every strategy (native and DeepSpeed) against ddp, on the same model
and global batch.

    python benchmarks/strategies.py --out benchmarks/results/strategies.json [--world 4] [--steps 5]

Each strategy runs in fresh processes (gloo on CPU, one process group per strategy, so peak RSS is that
strategy's own), takes ``--warmup`` steps, then times ``--steps`` steps (median). Per rank it records:

  - ``step_time_s``: median wall time of ``train_step`` (the slowest rank's, since every step ends in a
    collective);
  - ``state_bytes``: parameters + gradients + optimizer state actually allocated (distinct storages;
    the quantity sharding reduces), and the start-up estimate of the same for comparison;
  - ``peak_rss_delta_bytes``: peak resident memory minus the resident memory before the model was
    built (includes activations, communication buffers and allocator caching; coarse on CPU);
  - ``comm``: collectives of one step by kind, with calls, payload bytes and estimated ring wire bytes
    (see ``dtrain.metrics.comm``), per rank (max over ranks) and summed over ranks.

Ratios are against ddp at the same world size. On a 2-core CPU machine with more ranks than cores, the
times measure framework and communication overhead under oversubscription, not accelerator speed: use
them to compare strategies with each other here, not to predict GPU throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

MODEL = ["model=gpt_tiny", "model.n_layer=4", "model.d_model=256", "model.n_head=8", "model.tie_embeddings=false",
         "data=synthetic", "data.seq_len=128", "data.vocab_size=256", "optim.warmup_steps=0"]
GLOBAL_BATCH, MICRO_BATCH = 16, 4
STRATEGIES: dict[str, list[str]] = {
    "ddp": ["strategy=ddp"],
    "fsdp": ["strategy=fsdp"],
    "fsdp_no_reshard": ["strategy=fsdp", "strategy.reshard_after_forward=false"],
    "hsdp": ["strategy=hsdp"],
    "tp": ["strategy=tp"],
    "fsdp_tp": ["strategy=fsdp_tp"],
    "pp_1f1b": ["strategy=pp", "strategy.pp=-1", "strategy.pp_schedule=1F1B"],
    # the same with the embedding tied to the head: a copy on the last stage, one more all-reduce per step
    "pp_1f1b_tied": ["strategy=pp", "strategy.pp=-1", "strategy.pp_schedule=1F1B", "model.tie_embeddings=true"],
    "pp_fsdp": ["strategy=pp_fsdp"],
    "pp_fsdp_interleaved": ["strategy=pp_fsdp", "strategy.pp_schedule=Interleaved1F1B"],
    "3d": ["strategy=3d", "strategy.dp_shard=-1"],
    "zero1": ["strategy=zero1"],
    "zero2": ["strategy=zero2"],
    "zero3": ["strategy=zero3"],
    "zero2_offload": ["strategy=zero2", "strategy.offload_optimizer=cpu"],
    "ds_pp": ["strategy=ds_pp"],
    "ds_tp": ["strategy=ds_tp"],
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _storage_bytes(tensors) -> int:
    from torch.distributed.tensor import DTensor

    storages = {}
    for t in tensors:
        if t is not None:
            local = t._local_tensor if isinstance(t, DTensor) else t
            storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def _deepspeed_tensors(strategy) -> list:
    """What a DeepSpeed rank holds besides optimizer state: the module's parameters (ZeRO-3: their
    partitions) and the base optimizer's flat fp32 partitions (ZeRO keeps them apart from the module's)."""
    from dtrain.parallel.deepspeed_private import fp32_partitions

    module = [getattr(p, "ds_tensor", p) for p in strategy.model.parameters()]
    flats = [flat for _, flat in fp32_partitions(strategy.engine.optimizer)] if strategy.stage >= 1 else []
    return module + flats


def _worker(rank: int, world: int, port: int, overrides: list[str], warmup: int, steps: int, out_dir: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch.distributed as dist

    from dtrain.config.validate import load_config
    from dtrain.distributed.env import discover_env
    from dtrain.metrics.comm import CommCounter
    from dtrain.models import build_model
    from dtrain.optim import build_optimizer
    from dtrain.parallel.memory import estimate_rank_memory, local_numel_and_bytes, optimizer_params
    from dtrain.strategies import StepSpec, build_strategy
    from dtrain.strategies.layout import parallel_dims

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = load_config([*MODEL, *overrides, "run.name=bench", f"trainer.global_batch_size={GLOBAL_BATCH}",
                           f"trainer.micro_batch_size={MICRO_BATCH}"], world)
        rss_before = _rss_bytes()
        spec = StepSpec(GLOBAL_BATCH, MICRO_BATCH, 1.0, "fp32", 0)
        strategy = build_strategy(cfg, spec, discover_env(), torch.device("cpu"))
        strategy.setup(build_model(cfg.model, 0), lambda named: build_optimizer(named, cfg.optim))
        batch = torch.randint(0, 256, (GLOBAL_BATCH, 129), generator=torch.Generator().manual_seed(0))
        local = batch.chunk(strategy.dp_size)[strategy.dp_rank]
        deepspeed = hasattr(strategy, "engine")
        params = _deepspeed_tensors(strategy) if deepspeed else optimizer_params(strategy.optimizer)
        grads: dict[int, int] = {}  # storage -> bytes; ZeRO steps its flat partitions one param group at a time

        def record_grads(*_) -> None:
            for p in [*params, *(strategy.model.parameters() if deepspeed else [])]:
                if p.grad is not None:
                    grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # DTensor: this rank's shard
                    grads[grad.untyped_storage().data_ptr()] = grad.untyped_storage().nbytes()

        strategy.optimizer.register_step_pre_hook(record_grads)
        for _ in range(warmup):
            strategy.train_step(local)
        times = []
        for _ in range(steps):
            dist.barrier()
            start = time.perf_counter()
            strategy.train_step(local).loss.item()
            times.append(time.perf_counter() - start)
        grads.clear()  # the gradients of the measured step only (set_to_none makes new ones every step)
        with CommCounter() as counter:
            strategy.train_step(local)
        state = _storage_bytes(params) + sum(grads.values()) + _storage_bytes(
            v for s in strategy.optimizer.state.values() for k, v in s.items() if k != "step")
        dims = parallel_dims(cfg.strategy.name, cfg.strategy, world)
        # the dry run's estimate exists for the native layouts only
        estimate = dims and estimate_rank_memory(cfg, dims, rank, local_numel_and_bytes(params)[1])
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        layout = dims.describe() if dims else " x ".join(f"{k}={v}" for k, v in vars(strategy.layout).items() if v > 1)
        result = {"rank": rank, "step_time_s": statistics.median(times), "state_bytes": state,
                  "estimated_state_bytes": estimate and estimate.params + estimate.grads + estimate.optimizer,
                  "estimated_activation_bytes": estimate and estimate.activations,
                  "peak_rss_delta_bytes": peak_rss - rss_before, "comm": counter.summary(), "layout": layout}
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
        strategy.teardown()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_strategy(overrides: list[str], world: int, warmup: int, steps: int, timeout: float) -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.start_processes(_worker, args=(world, _free_port(), overrides, warmup, steps, out_dir),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{overrides} did not finish within {timeout}s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return [json.loads(Path(out_dir, f"{r}.json").read_text()) for r in range(world)]


def summarize(ranks: list[dict]) -> dict:
    kinds = sorted({k for r in ranks for k in r["comm"]})
    comm = {k: {"calls_per_rank_max": max(r["comm"].get(k, {}).get("calls", 0) for r in ranks),
                "bytes_per_rank_max": max(r["comm"].get(k, {}).get("bytes", 0) for r in ranks),
                "wire_bytes_per_rank_max": max(r["comm"].get(k, {}).get("wire_bytes", 0) for r in ranks),
                "bytes_all_ranks": sum(r["comm"].get(k, {}).get("bytes", 0) for r in ranks)} for k in kinds}
    return {"layout": ranks[0]["layout"],
            "step_time_s": max(r["step_time_s"] for r in ranks),
            "state_bytes_per_rank_max": max(r["state_bytes"] for r in ranks),
            "estimated_state_bytes_per_rank_max": max((r["estimated_state_bytes"] or 0 for r in ranks)) or None,
            "estimated_activation_bytes_per_rank_max": max(r["estimated_activation_bytes"] or 0 for r in ranks),
            "peak_rss_delta_bytes_per_rank_max": max(r["peak_rss_delta_bytes"] for r in ranks),
            "comm_bytes_per_rank_max": max(sum(v["bytes"] for v in r["comm"].values()) for r in ranks),
            "comm_bytes_all_ranks": sum(sum(v["bytes"] for v in r["comm"].values()) for r in ranks),
            "comm_wire_bytes_per_rank_max": max(sum(v["wire_bytes"] for v in r["comm"].values()) for r in ranks),
            "comm": comm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--world", type=int, default=4, help="ranks (processes) per strategy")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="subset of: " + ", ".join(STRATEGIES))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    names = args.only or list(STRATEGIES)
    if "ddp" not in names:
        names = ["ddp", *names]
    results: dict[str, dict] = {}
    for name in names:
        start = time.monotonic()
        results[name] = summarize(run_strategy(STRATEGIES[name], args.world, args.warmup, args.steps, timeout=900))
        print(f"{name:16s} {results[name]['layout']:24s} step {results[name]['step_time_s']:.3f}s  "
              f"state/rank {results[name]['state_bytes_per_rank_max'] / 2**20:.2f} MiB  "
              f"comm/rank {results[name]['comm_bytes_per_rank_max'] / 2**20:.2f} MiB payload, "
              f"{results[name]['comm_wire_bytes_per_rank_max'] / 2**20:.2f} MiB wire  "
              f"({time.monotonic() - start:.0f}s)", flush=True)
    base = results["ddp"]
    compared = {"step_time": "step_time_s", "state_bytes": "state_bytes_per_rank_max",
                "peak_rss_delta": "peak_rss_delta_bytes_per_rank_max", "comm_bytes_per_rank": "comm_bytes_per_rank_max",
                "comm_wire_bytes_per_rank": "comm_wire_bytes_per_rank_max"}
    for r in results.values():
        r["vs_ddp"] = {name: r[key] / base[key] for name, key in compared.items()}
    report = {"world_size": args.world, "global_batch": GLOBAL_BATCH, "micro_batch": MICRO_BATCH, "model": MODEL,
              "steps_timed": args.steps, "torch": torch.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "backend": "gloo", "strategies": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
