"""How gloo's small collectives slow with more ranks on one host: the basis of ``latency_steps: log2``.

    python benchmarks/gloo_latency_steps.py --out benchmarks/results/gloo_latency_steps.json

Every rank loops ``--calls`` times over a fixed burst of compute (3 GEMMs of 256 x 256, ~1 ms: the
compute between two tensor-parallel collectives of the studied models) followed by one collective
(all-reduce, all-gather, reduce-scatter of a 4 KiB and a 128 KiB tensor), and the same loop without the
collective; all ranks at once, one thread each. A collective's cost is the difference per call: what it
adds to a step, waits, wake-ups and the cycles gloo's threads take from the computing rank included.
Run at 2 and at 4 ranks (on a 2-core machine, 4 ranks also share the cores).

The ratio 4-rank / 2-rank cost tells the latency model apart: NCCL's rings take one latency per rank
(all-reduce 2 (n - 1) steps, all-gather and reduce-scatter n - 1: 3x the steps at 4 ranks as at 2),
gloo's algorithms on a host one per doubling (2x). On shared cores both double again. Also reported:
each kind's 2-rank cost against the all-reduce's (the ring model has the all-gather and the
reduce-scatter at half: gloo's small reduce-scatter is not). Headline: ``ratio_4_over_2`` per kind and
size, against 6 (ring) and 4 (log2) on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SIZES = [4 << 10, 128 << 10]
KINDS = ("all_reduce", "all_gather", "reduce_scatter")


def _worker(rank: int, world: int, port: int, calls: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def loop(collective: Any) -> float:
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            for _ in range(3):
                a @ b
            if collective is not None:
                collective()
        return time.perf_counter() - start

    costs: dict[str, float] = {}
    for nbytes in SIZES:
        full, part = torch.ones(nbytes // 4), torch.ones(nbytes // 4 // world)
        ops = {"all_reduce": lambda: dist.all_reduce(full),
               "all_gather": lambda: dist.all_gather_into_tensor(full, part),
               "reduce_scatter": lambda: dist.reduce_scatter_tensor(part, full)}
        for kind in KINDS:
            loop(ops[kind])  # warm-up
            without = statistics.median(loop(None) for _ in range(3))
            with_ = statistics.median(loop(ops[kind]) for _ in range(3))
            costs[f"{kind}_{nbytes}"] = (with_ - without) / calls
    if rank == 0:
        Path(out).write_text(json.dumps(costs))
    dist.destroy_process_group()


def measure(world: int, calls: int) -> dict[str, float]:
    import tempfile

    import torch.multiprocessing as mp

    from dtrain.scaling.study import free_port

    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        mp.start_processes(_worker, args=(world, free_port(), calls, out.name), nprocs=world, start_method="spawn")
        return json.loads(Path(out.name).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200, help="collectives per timed loop")
    parser.add_argument("--out", default="benchmarks/results/gloo_latency_steps.json")
    args = parser.parse_args()
    two, four = measure(2, args.calls), measure(4, args.calls)
    rows = {key: {"cost_2_ranks_ms": two[key] * 1e3, "cost_4_ranks_ms": four[key] * 1e3,
                  "ratio_4_over_2": four[key] / two[key]} for key in two}
    for nbytes in SIZES:
        for kind in KINDS[1:]:
            rows[f"{kind}_{nbytes}"]["vs_all_reduce_at_2"] = two[f"{kind}_{nbytes}"] / two[f"all_reduce_{nbytes}"]
    result = {"benchmark": "gloo_latency_steps", "cpus": os.cpu_count(), "calls": args.calls,
              "expected_ratio_on_shared_cores": {"ring": 6.0, "log2": 4.0}, "rows": rows,
              "median_ratio_4_over_2": statistics.median(r["ratio_4_over_2"] for r in rows.values())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for key, row in rows.items():
        print(f"{key:>22}: 2 ranks {row['cost_2_ranks_ms']:6.2f} ms, 4 ranks {row['cost_4_ranks_ms']:6.2f} ms, "
              f"x{row['ratio_4_over_2']:.2f}" + (f", vs all-reduce at 2: {row['vs_all_reduce_at_2']:.2f}"
                                                 if "vs_all_reduce_at_2" in row else ""))
    print(f"median 4/2 ratio {result['median_ratio_4_over_2']:.2f} (ring model 6, log2 4) -> {args.out}")


if __name__ == "__main__":
    main()
