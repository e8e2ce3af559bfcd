"""What measuring exposed communication costs: dtrain's training step with the meter on vs off.

    python benchmarks/exposed_comm_overhead.py --out benchmarks/results/exposed_comm_overhead.json

Two measurements, because a 1% effect drowns in the noise of a shared 2-core machine:

1. End to end, per strategy (ddp, fsdp, tp, pp): it launches itself under torchrun on 2 gloo ranks,
   builds one Trainer and times ``run_step`` in short blocks, alternately with the meter installed and
   armed (``trainer.measure_comm=true``) and removed entirely; the order flips every round, round 0
   warms up. Headline: the paired ratio (median over rounds of on-block / off-block medians) with a
   bootstrap 95% interval, as in benchmarks/overhead.py. Goal: ratio <= 1.01.
2. Per collective: in one process (a 1-rank gloo group, where a collective costs only its software
   path), blocks of synchronous and asynchronous all-reduces with the meter armed vs removed give the
   meter's cost per collective; times the collectives a step issues (the meter counts them) over the
   step time, that bounds the cost per step: ``derived_fraction`` (goal <= 0.01). TP issues the most
   collectives per step (~200 here), so it is the worst case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.overhead import bootstrap_median_interval  # noqa: E402

MODEL = ["model=gpt_tiny", "model.tie_embeddings=false", "data=synthetic", "data.seq_len=128",
         "trainer.global_batch_size=16", "trainer.micro_batch_size=4", "trainer.eval_every=0",
         "trainer.sample_tokens=0", "logging.progress=off", "trainer.max_steps=1000000", "checkpoint.interval_steps=0",
         "checkpoint.save_final=false"]
STRATEGIES = {"ddp": ["strategy=ddp"], "fsdp": ["strategy=fsdp"], "tp": ["strategy=tp"], "pp": ["strategy=pp"]}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--rounds", type=int, default=12, help="rounds after one warm-up round")
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--only", nargs="*", default=None, help=f"subset of: {', '.join(STRATEGIES)}")
    parser.add_argument("--strategy", help=argparse.SUPPRESS)  # set when re-launched under torchrun
    parser.add_argument("--part", help=argparse.SUPPRESS)
    return parser.parse_args()


def worker(args: argparse.Namespace) -> None:
    import torch

    from dtrain.config.validate import load_config
    from dtrain.distributed.env import discover_env
    from dtrain.distributed.process_group import destroy_process_group, init_process_group
    from dtrain.metrics.exposed_comm import CommMeter
    from dtrain.trainer import Trainer, _world_dimension

    torch.set_num_threads(1)
    env = discover_env()
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config([*MODEL, *STRATEGIES[args.strategy], f"run.dir={run_dir}", "trainer.measure_comm=false"],
                          env.world_size)
        init_process_group(env, "gloo", device, 300)
        trainer = Trainer.build(cfg, env, device)
        world_dim = _world_dimension(cfg, env.world_size)

        def block(measure: bool) -> list[float]:
            trainer.comm = CommMeter(0.0, world_dim) if measure else None
            samples = []
            for _ in range(args.steps):
                start = time.perf_counter()
                trainer.run_step()
                samples.append(time.perf_counter() - start)
            if trainer.comm is not None:
                trainer.comm.close()
                trainer.comm = None
            return samples

        times: dict[str, list[float]] = {"off": [], "on": []}
        ratios: list[float] = []
        for round_index in range(args.rounds + 1):
            order = ["off", "on"] if round_index % 2 == 0 else ["on", "off"]
            samples = {name: block(name == "on") for name in order}
            if round_index > 0:
                for name in order:
                    times[name].extend(samples[name])
                ratios.append(statistics.median(samples["on"]) / statistics.median(samples["off"]))
        trainer.comm = CommMeter(0.0, world_dim)
        calls = trainer.run_step()["comm_calls"]
        trainer.comm.close()
        trainer.logger.close()
        if env.is_rank_zero:
            result = {"strategy": args.strategy, "off_step_s": statistics.median(times["off"]),
                      "on_step_s": statistics.median(times["on"]), "ratio": statistics.median(ratios),
                      "ratio_95ci": bootstrap_median_interval(ratios), "round_ratios": ratios,
                      "collectives_per_step": calls}
            Path(args.part).write_text(json.dumps(result))
        destroy_process_group()


def per_collective_cost(blocks: int = 30, calls: int = 400) -> dict[str, float]:
    """Seconds the armed meter adds to one collective (sync and async + wait), in a 1-rank gloo group."""
    import socket

    import torch
    import torch.distributed as dist

    from dtrain.metrics.exposed_comm import CommMeter

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    tensor = torch.ones(16)

    def run(kind: str) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            if kind == "sync":
                dist.all_reduce(tensor)
            else:
                dist.all_reduce(tensor, async_op=True).wait()
        return (time.perf_counter() - start) / calls

    out = {}
    try:
        for kind in ("sync", "async"):
            differences = []
            for index in range(blocks + 1):
                meter = None
                pair = {}
                for armed in ((False, True) if index % 2 else (True, False)):
                    if armed:
                        meter = CommMeter(0.0)
                        meter.begin_step()
                    pair[armed] = run(kind)
                    if meter is not None:
                        meter.end_step(1.0)
                        meter.close()
                        meter = None
                if index:
                    differences.append(pair[True] - pair[False])
            out[f"{kind}_extra_s"] = statistics.median(differences)
            out[f"{kind}_extra_95ci_s"] = bootstrap_median_interval(differences)
    finally:
        dist.destroy_process_group()
    return out


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ:
        worker(args)
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cost = per_collective_cost()
    per_call = max(cost["sync_extra_s"], cost["async_extra_s"])
    print(f"meter cost per collective: sync {cost['sync_extra_s'] * 1e6:.1f} us, async+wait "
          f"{cost['async_extra_s'] * 1e6:.1f} us", flush=True)
    results = {}
    for name in args.only or list(STRATEGIES):
        with tempfile.NamedTemporaryFile(suffix=".json") as part:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
                       "--out", args.out, "--rounds", str(args.rounds), "--steps", str(args.steps),
                       "--strategy", name, "--part", part.name]
            code = subprocess.call(command, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
            if code:
                sys.exit(f"{name}: torchrun exited {code}")
            results[name] = result = json.loads(Path(part.name).read_text())
        result["derived_fraction"] = result["collectives_per_step"] * per_call / result["off_step_s"]
        print(f"{name:5s} off {result['off_step_s']:.4f}s on {result['on_step_s']:.4f}s ratio {result['ratio']:.4f} "
              f"95% [{result['ratio_95ci'][0]:.4f}, {result['ratio_95ci'][1]:.4f}]; "
              f"{result['collectives_per_step']} collectives/step -> derived {result['derived_fraction']:.2%}",
              flush=True)
    import torch

    report = {"benchmark": "exposed_comm_overhead", "world_size": 2, "backend": "gloo", "model": MODEL,
              "rounds": args.rounds, "steps_per_round": args.steps, "goal": "ratio <= 1.01",
              "torch": torch.__version__, "cpus": os.cpu_count(), "per_collective": cost, "strategies": results,
              "worst_ratio": max(r["ratio"] for r in results.values()),
              "worst_derived_fraction": max(r["derived_fraction"] for r in results.values())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
