"""``dtrain scale calibrate``: a hardware preset for the machine at hand (``cpu_local``), measured.

The same projection that runs on GPU presets runs on this machine once its numbers are known:

- compute: FP32 GEMM FLOP/s of one thread (one rank = one thread, as the studies run), the median
  over GEMM shapes of the models measured here -> ``peak_tflops`` (``matmul_efficiency`` 1: measured,
  not a datasheet peak);
- memory: the bandwidth of a large copy by one thread -> ``hbm_gbps`` (``memory_efficiency`` 1);
- links: all-reduces between 2 gloo processes over loopback, 4 KiB to 16 MiB, each after a little
  compute of uneven length on both ranks (as in a step), mean times (a step pays the sum of its
  collectives, slow tail included), fitted to the ring model ``t = 2 alpha + bytes / beta`` ->
  ``nvlink_gbps_per_gpu`` = beta, ``nvlink_latency_us`` = alpha
  (all ranks share one host: one "node" of ``gpus_per_node`` = 64 ranks); all-gathers and
  reduce-scatters of the two largest sizes the same way -> ``all_gather_efficiency`` and
  ``reduce_scatter_efficiency`` (their bus bandwidth against the all-reduce's; gloo's are far below 1),
  and of the two smallest -> ``all_gather_latency_factor`` and ``reduce_scatter_latency_factor``
  (their latency against the ring model's one step at 2 ranks; gloo's small reduce-scatter takes as
  long as an all-reduce: tensor parallelism with sequence parallelism issues hundreds per step);
- the cost every kernel adds on a CPU (eager dispatch, autograd, the optimizer's per-tensor work):
  ``kernel_overhead_us``: a microbenchmark of a small op's forward and backward;
- with ``--results DIR/results.json`` (a study), the compute rate and the per-kernel overhead are
  instead fitted to the study's single-rank training steps (least squares on relative errors): the
  microbenchmarks of a shared machine swing by 2x from minute to minute, and the 1-rank steps are what
  the multi-rank points are compared with.
- ``compute_slots_per_node`` = the CPU count: more ranks than cores share them;
- ``corun_slowdown``: the same small forward and backward in one process alone and in one process per
  core at once (shared caches, memory bandwidth and clock): how much slower each rank computes when
  every core is busy.
- ``step_jitter_cv`` (with ``--results`` only; 0 without): the median step-to-step spread of the study's
  single-process runs. A synchronous step of n ranks waits for the slowest: on a shared 2-core VM a
  rank's step varies by several percent, and 2 ranks pay ~0.56x that, 4 ranks ~1.03x, on every step.

With ``async_device: false`` the projection adds dispatch overhead to each kernel and lets nothing
hide (gloo's threads share the cores). The 2- and 4-rank points of the same study are then the test:
``dtrain scale measure STUDY --out DIR --collect`` re-summarizes them with the projection beside.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from dtrain.config.errors import ConfigError

GEMM_SHAPES = [(512, 128, 384), (512, 128, 512), (512, 512, 128), (1024, 384, 1152), (1024, 384, 1536),
               (1024, 1536, 384)]
ALLREDUCE_BYTES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20]


def _best(fn, repeats: int = 5, number: int = 3) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number)
    return statistics.median(samples)


def measure_gemm_flops() -> float:
    import torch

    rates = []
    for m, k, n in GEMM_SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        rates.append(2 * m * k * n / _best(lambda: a @ b))
    return statistics.median(rates)


def measure_copy_bandwidth() -> float:
    import torch

    source, target = torch.randn(16 << 20), torch.empty(16 << 20)  # 64 MiB each
    return 2 * source.numel() * 4 / _best(lambda: target.copy_(source))


def measure_op_overhead() -> float:
    """Seconds of eager forward + backward of a tiny op, per op (dispatch and autograd, no real work)."""
    import torch

    x = torch.ones(8, requires_grad=True)

    def step():
        y = x
        for _ in range(50):
            y = y * 1.0
        y.sum().backward()

    return _best(step) / 100  # 50 forward + 50 backward ops


def _corun_worker(barrier: Any, results: Any) -> None:
    """A training step in miniature (a transformer MLP block of the studied models' width: GEMMs,
    element-wise ops, autograd, AdamW) for 3 s after every co-runner is ready; puts the rate (steps/s).
    Small ops matter: co-running ranks slow dispatch-heavy steps more than large GEMMs."""
    import torch

    torch.set_num_threads(1)
    layer = torch.nn.Sequential(torch.nn.LayerNorm(256), torch.nn.Linear(256, 1024), torch.nn.GELU(),
                                torch.nn.Linear(1024, 256))
    optimizer = torch.optim.AdamW(layer.parameters())
    x = torch.randn(256, 256)

    def step() -> None:
        layer(x).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    for _ in range(5):
        step()
    barrier.wait()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < 3.0:
        step()
        count += 1
    results.put(count / (time.perf_counter() - start))


def measure_corun_slowdown(processes: int) -> float:
    """How much slower one rank computes when ``processes`` ranks compute at once (one thread each):
    the co-runners share caches, memory bandwidth and the clock budget, and past the core count the cores
    themselves. The median rate alone over the median rate of each co-runner."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")

    def rate(count: int) -> float:
        barrier, results = context.Barrier(count), context.Queue()
        workers = [context.Process(target=_corun_worker, args=(barrier, results)) for _ in range(count)]
        for worker in workers:
            worker.start()
        rates = [results.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join()
        return statistics.median(rates)

    return statistics.median(rate(1) / rate(processes) for _ in range(3))


def _allreduce_worker(rank: int, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    generator = torch.Generator().manual_seed(rank)
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def mean_time(collective: Any, calls: int) -> float:
        for _ in range(3):
            collective()
        samples = []
        for _ in range(calls):
            # as in a training step, each rank computes a while (0-2 ms, not the same on both) before the
            # collective: the peer arrives late, gloo's threads have gone to sleep and must wake up
            for _ in range(int(torch.randint(0, 6, (1,), generator=generator))):
                a @ b
            start = time.perf_counter()
            collective()
            samples.append(time.perf_counter() - start)
        # the mean, slow tail included: a step pays the sum of its collectives (on a VM the latency of a
        # small one swings from 0.2 to several ms with how fast the peer's threads wake up)
        return statistics.fmean(samples)

    times: dict[str, Any] = {}
    for nbytes in ALLREDUCE_BYTES:
        full, half = torch.ones(nbytes // 4), torch.ones(nbytes // 8)
        calls = 100 if nbytes <= 64 << 10 else 20
        times[nbytes] = mean_time(lambda: dist.all_reduce(full), calls)
        if nbytes in (*ALLREDUCE_BYTES[:2], *ALLREDUCE_BYTES[-2:]):  # FSDP's and SP's two, by the whole tensor
            times[f"all_gather_{nbytes}"] = mean_time(lambda: dist.all_gather_into_tensor(full, half), calls)
            times[f"reduce_scatter_{nbytes}"] = mean_time(lambda: dist.reduce_scatter_tensor(half, full), calls)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def measure_gloo_link() -> tuple[float, float, dict[str, float], dict[str, float]]:
    """(alpha seconds, beta bytes/s, the all-gather's and reduce-scatter's factors, raw times) of 2-rank
    gloo collectives, t = 2 alpha + bytes / beta for the all-reduce (mean times): beta from the slope
    between the two largest messages, alpha from the two smallest. The all-gather and the reduce-scatter
    (t = f_latency alpha + bytes / (2 beta f_bandwidth) in the ring model at 2 ranks): their bandwidth
    factor (``<kind>``) from the slope between the two largest, their latency factor
    (``<kind>_latency``) from the two smallest."""
    import tempfile

    import torch.multiprocessing as mp

    from dtrain.scaling.study import free_port

    port = free_port()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        mp.start_processes(_allreduce_worker, args=(port, out.name), nprocs=2, start_method="spawn")
        raw = json.loads(Path(out.name).read_text())
    times = {int(k): v for k, v in raw.items() if k.isdigit()}
    sizes = sorted(times)
    big, bigger = sizes[-2], sizes[-1]
    beta = (bigger - big) / max(times[bigger] - times[big], 1e-9)
    alpha = max(statistics.fmean(times[s] - s / beta for s in sizes[:2]), 1e-6) / 2
    factors = {}
    for kind in ("all_gather", "reduce_scatter"):  # the ring model: (n-1)/n x bytes / bus bandwidth at n=2
        slope = (raw[f"{kind}_{bigger}"] - raw[f"{kind}_{big}"]) / (bigger - big)
        factors[kind] = min(1.0, max(0.05, 0.5 / (beta * max(slope, 1e-15))))
        latency = statistics.fmean(raw[f"{kind}_{s}"] - 0.5 * s / (beta * factors[kind]) for s in sizes[:2])
        factors[f"{kind}_latency"] = min(10.0, max(0.1, latency / alpha))
    return alpha, beta, factors, raw


def fit_kernel_overhead(preset: dict[str, Any], results: dict[str, Any]) -> tuple[float, list[dict[str, Any]]]:
    """The per-kernel overhead (microseconds) that makes the projection of every world-size-1 point match
    its measured step time (least squares on relative errors; on a CPU the projection is linear in it)."""
    from dtrain.scaling.projection import project
    from dtrain.scaling.study import case_from_overrides

    rows = []
    for point in results["points"]:
        if point["world_size"] != 1 or not point.get("step_time_s"):
            continue
        overrides = _overrides_of(point)
        cases = [project(case_from_overrides(overrides, 1, {**preset, "kernel_overhead_us": overhead})).step_time_s
                 for overhead in (0.0, 1.0)]
        rows.append({"point": f"{point['model']}/{point['strategy']}", "measured_s": point["step_time_s"],
                     "without_overhead_s": cases[0], "per_us": cases[1] - cases[0]})
    if not rows:
        raise ConfigError("the results hold no measured world-size-1 points to calibrate on")
    # minimize sum((without + overhead x per_us - measured) / measured)^2
    numerator = sum(r["per_us"] * (r["measured_s"] - r["without_overhead_s"]) / r["measured_s"] ** 2 for r in rows)
    overhead = max(0.0, numerator / sum((r["per_us"] / r["measured_s"]) ** 2 for r in rows))
    for r in rows:
        r["projected_s"] = r["without_overhead_s"] + overhead * r["per_us"]
        r["error"] = (r["projected_s"] - r["measured_s"]) / r["measured_s"]
    return overhead, rows


def fit_compute(preset: dict[str, Any], results: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The compute rate and per-kernel overhead that best explain the single-rank steps of a study:
    a log grid over the rate (a quarter to four times the microbenchmark's), the overhead by least
    squares at each rate, the pair with the smallest squared relative error. A GEMM microbenchmark
    on a machine other jobs share swings by 2x from minute to minute; the study's own 1-rank steps
    are what the 2- and 4-rank points are compared with."""
    best = None
    measured = preset["peak_tflops"]
    for step in range(41):
        rate = measured * 4 ** ((step - 20) / 20)
        trial = {**preset, "peak_tflops": rate, "peak_tflops_fp32": rate}
        overhead, rows = fit_kernel_overhead(trial, results)
        error = sum(r["error"] ** 2 for r in rows)
        if best is None or error < best[0]:
            best = (error, {**trial, "kernel_overhead_us": overhead}, rows)
    return best[1], best[2]


def single_process_jitter(results: dict[str, Any]) -> float:
    """``step_jitter_cv``: the median step-to-step spread of the study's single-process runs (its 1-rank
    points and every reference run; see :func:`dtrain.scaling.study.step_jitter_cv`): how much one rank's
    step varies on this machine when nothing waits for anything."""
    spreads = [p.get("step_jitter_cv") for p in results["points"] if p["world_size"] == 1]
    spreads += [p.get("reference_step_jitter_cv") for p in results["points"]]
    spreads = [s for s in spreads if s is not None]
    if not spreads:
        raise ConfigError("the results hold no step-to-step spreads (step_jitter_cv): they were collected by an "
                          "older dtrain; re-summarize them with `dtrain scale measure STUDY --out DIR --collect`")
    return statistics.median(spreads)


def _overrides_of(point: dict[str, Any]) -> list[str]:
    overrides_file = Path(point["run_dir"]) / "overrides.txt"
    if overrides_file.is_file():
        return [line for line in overrides_file.read_text().splitlines()
                if line and not line.startswith(("run.dir=", "run.name="))]
    raise ConfigError(f"{overrides_file} is missing: cannot tell how point {point['model']}/{point['strategy']} ran")


def calibrate(results_path: Path | None) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    torch.set_num_threads(1)
    gemm = measure_gemm_flops()
    copy = measure_copy_bandwidth()
    alpha, beta, factors, allreduce_times = measure_gloo_link()
    op = measure_op_overhead()
    cpus = os.cpu_count() or 1
    corun = max(1.0, measure_corun_slowdown(cpus)) if cpus > 1 else 1.0
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    preset: dict[str, Any] = {
        "peak_tflops": gemm / 1e12, "peak_tflops_fp32": gemm / 1e12, "hbm_gib": round(memory_gib, 1),
        "hbm_gbps": copy / 1e9, "gpus_per_node": 64, "nvlink_gbps_per_gpu": beta / 1e9, "nic_gbps_per_gpu": beta / 1e9,
        "compute_slots_per_node": cpus, "corun_slowdown": corun, "async_device": False, "matmul_efficiency": 1.0,
        "memory_efficiency": 1.0, "nvlink_efficiency": 1.0, "nic_efficiency": 1.0,
        "all_gather_efficiency": factors["all_gather"], "reduce_scatter_efficiency": factors["reduce_scatter"],
        "all_gather_latency_factor": factors["all_gather_latency"],
        "reduce_scatter_latency_factor": factors["reduce_scatter_latency"],
        "nvlink_latency_us": alpha * 1e6, "latency_steps": "log2",
        "nic_latency_us": alpha * 1e6, "kernel_overhead_us": op * 1e6, "flash_attention_efficiency": 1.0,
        "attention": "flash"}
    report: dict[str, Any] = {"gemm_flops": gemm, "copy_bytes_per_s": copy, "gloo_alpha_s": alpha,
                              "gloo_beta_bytes_per_s": beta, "gloo_allreduce_s": allreduce_times,
                              "op_overhead_s": op, "corun_slowdown": corun, "cpus": cpus}
    if results_path is not None:
        results = json.loads(results_path.read_text())
        preset, rows = fit_compute(preset, results)
        preset["step_jitter_cv"] = report["step_jitter_cv"] = single_process_jitter(results)
        report["single_rank_fit"] = rows
        report["fitted_gemm_flops"] = preset["peak_tflops"] * 1e12
    return preset, report


def write_preset(path: Path, preset: dict[str, Any], report: dict[str, Any], command: str) -> None:
    rounded = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in preset.items()}
    header = (f"# This machine, measured by `{command}` ({time.strftime('%Y-%m-%d')}; see "
              "dtrain/scaling/calibrate.py).\n"
              + (f"# Compute rate and per-kernel overhead fitted to the study's 1-rank steps: "
                 f"{report['fitted_gemm_flops'] / 1e9:.1f} GFLOP/s; step-to-step spread of its single-process "
                 f"runs {report['step_jitter_cv']:.1%}.\n" if "fitted_gemm_flops" in report else "")
              + f"# Microbenchmarks, one thread per rank: GEMM {report['gemm_flops'] / 1e9:.1f} GFLOP/s, copy "
              f"{report['copy_bytes_per_s'] / 1e9:.2f} GB/s, gloo all-reduce alpha "
              f"{report['gloo_alpha_s'] * 1e6:.0f} us beta {report['gloo_beta_bytes_per_s'] / 1e9:.2f} GB/s, "
              f"co-run slowdown {report.get('corun_slowdown', 1.0):.2f}, {report['cpus']} CPUs.\n"
              "# Timings on a shared machine are noisy: recalibrate on the machine you "
              "project for.\n")
    body = yaml.safe_dump({"defaults": ["hardware_schema"], "name": path.stem, "peak_flops_per_device": None,
                           **rounded}, sort_keys=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body)


def main(argv: Sequence[str]) -> int:
    from dtrain.scaling.cli import _Parser, write_json
    from dtrain.scaling.hardware import hardware_dir

    parser = _Parser(prog="dtrain scale calibrate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(hardware_dir() / "cpu_local.yaml"), help="preset YAML to write")
    parser.add_argument("--results", help="a study's results.json: fit the per-kernel overhead to its 1-rank points")
    parser.add_argument("--report", help="also write the raw measurements (JSON)")
    args = parser.parse_args(list(argv))
    results = Path(args.results) if args.results else None
    if results is not None and not results.is_file():
        raise ConfigError(f"--results {results} does not exist")
    preset, report = calibrate(results)
    command = "dtrain scale calibrate" + (f" --results {args.results}" if args.results else "")
    write_preset(Path(args.out), preset, report, command)
    if args.report:
        write_json(args.report, report)
    print(f"wrote {args.out}: GEMM {report['gemm_flops'] / 1e9:.1f} GFLOP/s, copy "
          f"{report['copy_bytes_per_s'] / 1e9:.2f} GB/s, gloo alpha {report['gloo_alpha_s'] * 1e6:.0f} us, beta "
          f"{report['gloo_beta_bytes_per_s'] / 1e9:.2f} GB/s (all-gather x{preset['all_gather_efficiency']:.2f}, "
          f"reduce-scatter x{preset['reduce_scatter_efficiency']:.2f}; latency all-gather "
          f"x{preset['all_gather_latency_factor']:.2f}, reduce-scatter "
          f"x{preset['reduce_scatter_latency_factor']:.2f}), kernel overhead {preset['kernel_overhead_us']:.1f} us")
    if "fitted_gemm_flops" in report:
        print(f"fitted to the study's 1-rank steps: compute {report['fitted_gemm_flops'] / 1e9:.1f} GFLOP/s, kernel "
              f"overhead {preset['kernel_overhead_us']:.1f} us")
    for row in report.get("single_rank_fit", []):
        print(f"  {row['point']:<20} measured {row['measured_s']:.4f}s projected {row['projected_s']:.4f}s "
              f"({row['error']:+.1%})")
    return 0
