"""What watching a run costs: dtrain's loop with its run monitor against the same loop without, 2 gloo ranks.

    python benchmarks/monitoring_overhead.py --out benchmarks/results/monitoring_overhead.json

Two parts, both ratios against a baseline measured in the same invocation (goal: <= 1.01 each):

- ``monitor``: one Trainer (``ddp``, a 2-layer 64-wide GPT: short steps, so a per-step cost shows), and
  two monitors that take turns in blocks of ``--steps`` steps, the order flipping every round: the full
  RunMonitor (phases for the hang watchdog with its 2 s heartbeat thread, the straggler window's
  all-gather every 10 steps, the Prometheus exporter with a client scraping /metrics every second, 15x
  Prometheus' default rate) and ``RunMonitor.off``. Per round: monitored block time / unmonitored block
  time; ``ratio`` is the median over rounds with a bootstrap 95% interval (round 0 warms up, untimed).
- ``flight_recorder``: the Flight Recorder is switched when the process group is created, so it cannot
  take turns inside one process: ``--pairs`` pairs of launches (recorder on, recorder off, order flipping),
  each timing ``--steps`` x 4 steps of the unmonitored loop after a warm-up; ``ratio`` is the median over
  pairs of (median step time on / off); ``min_ratio`` compares the fastest steps instead (robust when
  other processes share the machine). Unpaired within a launch, so noisier than ``monitor``.

``combined_ratio`` = monitor ratio x flight-recorder ratio: dtrain's defaults against no monitoring.
Every timed step's seconds are in the file, so each ratio can be recomputed from it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import bootstrap_median_interval  # noqa: E402

MODEL = ["model=gpt_tiny", "model.n_layer=2", "model.d_model=64", "data=stdlib", "data.seq_len=64",
         "data.max_bytes=4000000", "strategy=ddp", "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
         "trainer.eval_every=0", "trainer.log_every=1", "trainer.sample_tokens=0", "logging.progress=off",
         "logging.level=WARNING", "trainer.max_steps=1000000", "checkpoint.interval_steps=0"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the JSON result")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds of the monitor part")
    parser.add_argument("--steps", type=int, default=50, help="steps per arm per round")
    parser.add_argument("--pairs", type=int, default=3, help="launch pairs of the flight-recorder part (0: skip)")
    parser.add_argument("--worker", choices=["monitor", "fr_on", "fr_off"], help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _torchrun(args: argparse.Namespace, part: str, out: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", __file__,
               "--out", args.out, "--rounds", str(args.rounds), "--steps", str(args.steps), "--worker", part,
               "--json", out]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS",
                                                                                              "1")})


def launch(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _torchrun(args, "monitor", f"{tmp}/monitor.json")
        monitor = json.loads(Path(f"{tmp}/monitor.json").read_text())
        pairs = []
        for index in range(args.pairs):
            order = ["fr_on", "fr_off"] if index % 2 == 0 else ["fr_off", "fr_on"]
            times = {}
            for part in order:
                _torchrun(args, part, f"{tmp}/{part}.json")
                times[part] = json.loads(Path(f"{tmp}/{part}.json").read_text())["step_s"]
            pairs.append({"on_step_s": times["fr_on"], "off_step_s": times["fr_off"],
                          "ratio": statistics.median(times["fr_on"]) / statistics.median(times["fr_off"]),
                          # other processes only ever add time: the fastest steps compare the work itself
                          "min_ratio": min(times["fr_on"]) / min(times["fr_off"])})
    result = {"benchmark": "monitoring_overhead", "world_size": 2, "backend": "gloo", "cpu_count": os.cpu_count(),
              "goal": "<= 1.01", "monitor": monitor}
    if pairs:
        ratios = [p["ratio"] for p in pairs]
        result["flight_recorder"] = {"ratio": statistics.median(ratios), "pair_ratios": ratios,
                                     "min_ratio": statistics.median(p["min_ratio"] for p in pairs), "pairs": pairs}
        result["combined_ratio"] = monitor["ratio"] * result["flight_recorder"]["ratio"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    summary = {k: v for k, v in result.items() if k not in ("monitor", "flight_recorder")}
    summary["monitor_ratio"], summary["monitor_ratio_95ci"] = monitor["ratio"], monitor["ratio_95ci"]
    summary["flight_recorder_ratio"] = result.get("flight_recorder", {}).get("ratio")
    print(json.dumps(summary, indent=2))


def _scraper(port: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        except OSError:
            pass


def worker(args: argparse.Namespace) -> None:
    import torch

    from dtrain.config.validate import load_config
    from dtrain.distributed import collectives
    from dtrain.distributed.env import discover_env
    from dtrain.distributed.process_group import destroy_process_group, init_process_group
    from dtrain.metrics.hang import enable_flight_recorder
    from dtrain.metrics.monitor import RunMonitor
    from dtrain.trainer import Trainer
    env = discover_env()
    device = torch.device("cpu")
    overrides = [*MODEL, "monitor.flight_recorder_entries=" + ("0" if args.worker == "fr_off" else "2000")]
    if args.worker == "fr_off":
        os.environ["TORCH_FR_BUFFER_SIZE"] = os.environ["TORCH_NCCL_TRACE_BUFFER_SIZE"] = "0"
    else:
        enable_flight_recorder(tempfile.gettempdir(), 2000)
    init_process_group(env, "gloo", device, 300)
    try:  # every rank must resolve the same config: rank 0 picks the run folder and the port
        run_dir, port = collectives.broadcast_object((tempfile.mkdtemp(prefix="dtrain-monbench-"), _free_port())
                                                     if env.is_rank_zero else None)
        cfg = load_config([*overrides, f"run.dir={run_dir}", "run.name=monbench",
                           f"logging.prometheus.port={port if args.worker == 'monitor' else 0}"], env.world_size)
        trainer = Trainer.build(cfg, env, device)
        full, off = trainer.monitor, RunMonitor.off(env, device)
        if args.worker == "monitor":
            full.start()
            stop = threading.Event()
            if env.is_rank_zero:
                threading.Thread(target=_scraper, args=(port, stop), daemon=True).start()
            record = _paired(trainer, {"monitor": full, "off": off}, args.rounds, args.steps)
            stop.set()
        else:
            trainer.monitor = off
            for _ in range(args.steps):  # warm-up
                trainer.advance()
            record = {"step_s": [_timed(trainer.advance) for _ in range(4 * args.steps)]}
        full.close()
        trainer.checkpoints.close()
        trainer.preemption.close()
        collectives.barrier()
        if env.is_rank_zero:
            Path(args.json).write_text(json.dumps(record))
            shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _paired(trainer, monitors: dict, rounds: int, steps: int) -> dict:
    """Blocks of ``steps`` steps per monitor, order flipping per round; round 0 untimed."""
    names, timed_rounds = list(monitors), []
    for index in range(rounds + 1):
        block = {}
        for name in (names if index % 2 == 0 else names[::-1]):
            trainer.monitor = monitors[name]
            block[name] = [_timed(trainer.advance) for _ in range(steps)]
        if index:
            timed_rounds.append(block)
    ratios = [sum(b["monitor"]) / sum(b["off"]) for b in timed_rounds]
    on = [s for b in timed_rounds for s in b["monitor"]]
    off = [s for b in timed_rounds for s in b["off"]]
    return {"ratio": statistics.median(ratios), "ratio_95ci": bootstrap_median_interval(ratios),
            "round_ratios": ratios, "monitor_step_s": statistics.median(on), "off_step_s": statistics.median(off),
            "overhead_ms_per_step": statistics.median((sum(b["monitor"]) - sum(b["off"])) / steps * 1e3
                                                      for b in timed_rounds),
            "rounds": timed_rounds}


def main() -> None:
    args = parse_args()
    if args.worker is None:
        launch(args)
    else:
        worker(args)


if __name__ == "__main__":
    main()
