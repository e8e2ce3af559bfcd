"""Checkpoint save/load speed against the best this machine does for the same bytes, measured in the same run.

    python benchmarks/checkpoint.py --out benchmarks/results/checkpoint.json [--skip-s3]

The state is a GPT's model + AdamW state in the layout every strategy hands the checkpoint (345 MB at
the defaults). Every figure is a median over ``--repeats`` (all samples are in the JSON, ``samples_*``);
the measurements of one repeat run back to back, in an order that flips every repeat.

(a) ``local``: dtrain's committed save (DCP shards written by ``checkpoint.write_threads`` threads with
    CRC32C while writing and fsync, RNG/trainer-state/config files, directory fsyncs, manifest) against
    raw writes of the same tensors straight from their memory (no copy), fsynced:
      ``raw.threads``: the same per-file split DCP makes, one writer thread per file (same thread count);
      ``raw.one_file``: everything into one file from one thread.
    ``best_raw_MBps`` is the faster of the two; ``ratio`` = dtrain MB/s / best raw MB/s (goal >= 0.7).
    ``disk``: the disk's own sequential write bandwidth, ``--disk-probe-mib`` written in 8 MiB blocks and
    fsynced, from 1 thread and from ``write_threads`` threads (one file each); ``ratio_vs_disk`` puts
    dtrain against it. The probe rewrites one cache-hot block, so it is the disk's ceiling, which
    writing a fresh state from memory need not reach. ``dtrain_shard_bytes`` (DCP's files: the tensors
    plus torch.save framing and the optimizer's scalars) and ``committed`` (the newest step's manifest
    verified: sizes and CRC32C) show that the save was real; ``raw.*.bytes_written`` that the raw arms
    wrote every byte. Throughput is always ``state_bytes`` (the tensors) / seconds.
(b) ``async``: ``ratio`` = time the loop is blocked by an async (thread) save / a synchronous save of the
    same state (goal <= 0.10). ``overlap_slowdown`` = median step time of a fixed training workload (a
    small GPT's forward, backward and AdamW step, one torch thread) while a background save runs / its
    step time with no save in flight, per repeat; the median over repeats is reported, with every step
    time. Its baseline, ``overlap_slowdown_raw_write``: the same steps while the raw baseline writes the
    same bytes from background threads. On a 2-core machine writers and training share the cores.
(c) ``s3``: a real S3 API (moto's server on 127.0.0.1) through s3fs. Save: dtrain's committed save
    against raw PUTs of the same bytes (the same per-file split, ``write_threads`` concurrent
    ``pipe_file`` calls; payloads assembled before the clock starts). Load: dtrain's restore (rank 0 reads
    the manifest, every file's CRC32C is verified, then DCP loads) with and without checksum
    verification, against raw concurrent GETs of the raw files. ``ratio`` = dtrain MB/s / raw MB/s.
    Note: moto keeps objects in memory in one Python process; it measures the client path, not AWS.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from dtrain.checkpoint.manager import CheckpointManager
from dtrain.config.validate import load_config
from dtrain.distributed.env import discover_env
from jobs import start_moto

MiB = 2**20
BLOCK = 8 * MiB


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="samples per local and async figure")
    parser.add_argument("--write-threads", type=int, default=None,
                        help="checkpoint.write_threads for dtrain and the raw baseline (default: dtrain's default)")
    parser.add_argument("--disk-probe-mib", type=int, default=1024, help="size of the disk bandwidth probe")
    parser.add_argument("--overlap-d-model", type=int, default=128, help="width of the overlap workload's GPT")
    parser.add_argument("--overlap-layers", type=int, default=2)
    parser.add_argument("--overlap-idle-steps", type=int, default=10, help="steps timed with no save in flight")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--s3-repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="disk to measure (default: a temp folder)")
    return parser.parse_args(argv)


# -- state and its bytes ----------------------------------------------------------------------------------
def build_state(d_model: int, n_layer: int) -> dict:
    """Model + AdamW state of a GPT, as the strategy would hand it to the checkpoint."""
    from dtrain.models.gpt import GPT
    from dtrain.optim import build_optimizer
    from dtrain.parallel.materialize import materialize
    from dtrain.strategies.state import get_model_optim_state

    with torch.device("meta"):
        model = GPT(vocab_size=256, seq_len=128, n_layer=n_layer, n_head=8, d_model=d_model)
    materialize(model, torch.device("cpu"), seed=0)
    cfg = load_config(["run.name=bench"], 1)
    optimizer = build_optimizer(model.named_parameters(), cfg.optim)
    model(torch.zeros(1, 8, dtype=torch.long)).sum().backward()
    optimizer.step()  # creates the Adam moments
    return get_model_optim_state(model, optimizer)  # the layout every strategy hands the checkpoint


def flat_tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, dict):
        return [t for value in state.values() for t in flat_tensors(value)]
    if isinstance(state, (list, tuple)):
        return [t for value in state for t in flat_tensors(value)]
    return [state] if isinstance(state, torch.Tensor) else []


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def raw_view(t: torch.Tensor) -> memoryview:
    """The tensor's own bytes, no copy (the tensors of a state dict are contiguous)."""
    assert t.is_contiguous(), "a state tensor is not contiguous; a raw write would need a copy"
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def split_like_dcp(tensors: list[torch.Tensor], bins: int) -> list[list[torch.Tensor]]:
    """DCP's per-file split for ``thread_count=bins``: largest first, each into the least-filled file."""
    files: list[list[torch.Tensor]] = [[] for _ in range(bins)]
    sizes = [0] * bins
    for t in sorted(tensors, key=nbytes, reverse=True):
        index = sizes.index(min(sizes))
        files[index].append(t)
        sizes[index] += nbytes(t)
    return [f for f in files if f]


def payload_groups(state: dict, files: int) -> list[list[memoryview]]:
    return [[raw_view(t) for t in group] for group in split_like_dcp(flat_tensors(state), files)]


# -- raw local writes -------------------------------------------------------------------------------------
def write_file(path: Path, buffers: list[memoryview]) -> int:
    """Write the buffers back to back (unbuffered, straight from their memory) and fsync; returns bytes."""
    with open(path, "wb", buffering=0) as f:
        for buffer in buffers:
            view = buffer
            while view:  # a raw write may be partial
                view = view[f.write(view):]
        os.fsync(f.fileno())
    return sum(len(b) for b in buffers)


def parallel_write(folder: Path, groups: list[list[memoryview]]) -> tuple[float, int]:
    """One thread per file, all at once; returns (seconds, bytes on disk). The files are deleted after."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"raw_{i}.bin" for i in range(len(groups))]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(groups)) as pool:
        list(pool.map(write_file, paths, groups))
    seconds = time.perf_counter() - start
    on_disk = sum(p.stat().st_size for p in paths)
    for p in paths:
        p.unlink()
    return seconds, on_disk


def disk_probe(folder: Path, total: int, threads: int, block: memoryview) -> float:
    """Seconds to write ``total`` bytes as ``threads`` files in ``len(block)`` writes, fsynced."""
    per_file = total // threads
    groups = [[block] * (per_file // len(block)) for _ in range(threads)]
    return parallel_write(folder, groups)[0]


def median_figure(samples: list[float], payload: int) -> dict[str, Any]:
    seconds = statistics.median(samples)
    return {"s": seconds, "MBps": payload / seconds / 1e6, "samples_s": samples}


# -- dtrain -----------------------------------------------------------------------------------------------
def manager_for(uri: str, async_mode: str, threads: int, extra: list[str] = ()) -> CheckpointManager:
    cfg = load_config(["run.name=bench", f"checkpoint.uri={uri}", f"checkpoint.async_mode={async_mode}",
                       "checkpoint.keep_last=1", f"checkpoint.write_threads={threads}", *extra], 1)
    return CheckpointManager(cfg, discover_env({}), "bench", "single")


def timed_save(manager: CheckpointManager, step: int, state: dict) -> float:
    """Seconds until the step is committed; old steps are then deleted outside the clock."""
    start = time.perf_counter()
    manager.save(step, state, {"step": step}, blocking=True)
    seconds = time.perf_counter() - start
    manager.finalize()
    return seconds


def committed_report(manager: CheckpointManager) -> dict[str, Any]:
    """The newest committed step: its files, bytes, and whether sizes and CRC32C verify."""
    from dtrain.checkpoint.manager import committed_steps
    from dtrain.checkpoint.manifest import read_manifest, step_dir, verify_files

    steps = committed_steps(manager.storage)
    manifest = read_manifest(manager.storage, step_dir(steps[-1]))
    shards = [f for f in manifest.files if f["path"].endswith(".distcp")]
    return {"step": steps[-1], "verified": not verify_files(manager.storage, step_dir(steps[-1]), manifest.files,
                                                             checksums=True),
            "files": len(manifest.files), "shard_files": len(shards), "bytes": manifest.total_bytes,
            "shard_bytes": sum(int(f["size"]) for f in shards)}


# -- (a) local --------------------------------------------------------------------------------------------
def bench_local(state: dict, folder: Path, repeats: int, threads: int, probe_bytes: int) -> dict[str, Any]:
    payload = sum(nbytes(t) for t in flat_tensors(state))
    arms: dict[str, Callable[[int], tuple[float, int]]] = {
        "raw_threads": lambda _: parallel_write(folder / "raw", payload_groups(state, threads)),
        "raw_one_file": lambda _: parallel_write(folder / "raw", payload_groups(state, 1)),
    }
    manager = manager_for(str(folder / "ckpt"), "off", threads)
    arms["dtrain"] = lambda step: (timed_save(manager, step, state), 0)
    samples: dict[str, list[float]] = {name: [] for name in arms}
    raw_bytes: dict[str, int] = {}
    for step in range(1, repeats + 1):
        for name in (list(arms) if step % 2 else list(arms)[::-1]):
            seconds, written = arms[name](step)
            samples[name].append(seconds)
            raw_bytes[name] = written
    committed = committed_report(manager)
    manager.close()
    raw = {name: {**median_figure(samples[f"raw_{name}"], payload), "files": len(payload_groups(state, files)),
                  "bytes_written": raw_bytes[f"raw_{name}"]} for name, files in (("threads", threads), ("one_file", 1))}
    best = max(raw, key=lambda name: raw[name]["MBps"])
    dtrain = median_figure(samples["dtrain"], payload)
    disk = bench_disk(folder / "probe", repeats, threads, probe_bytes)
    return {"state_bytes": payload, "tensors": len(flat_tensors(state)), "write_threads": threads,
            "dtrain_save_s": dtrain["s"], "dtrain_MBps": dtrain["MBps"], "samples_dtrain_s": samples["dtrain"],
            "dtrain_bytes_written": committed["bytes"], "dtrain_shard_bytes": committed["shard_bytes"],
            "committed": committed, "raw": raw, "best_raw": best, "best_raw_MBps": raw[best]["MBps"],
            "disk": disk, "ratio": dtrain["MBps"] / raw[best]["MBps"],
            "ratio_vs_disk": dtrain["MBps"] / disk["best_MBps"], "goal": "ratio >= 0.7",
            "throughput": "state_bytes / seconds for every arm (payload, not framing)"}


def bench_disk(folder: Path, repeats: int, threads: int, total: int) -> dict[str, Any]:
    """The disk's sequential write bandwidth from 1 and from ``threads`` writers."""
    block = memoryview(torch.randint(0, 256, (min(BLOCK, total // threads),), dtype=torch.uint8).numpy())
    total -= total % (len(block) * threads)
    variants = {"one_thread": 1, "threads": threads}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(repeats):
        for name in (list(variants) if index % 2 == 0 else list(variants)[::-1]):
            samples[name].append(disk_probe(folder, total, variants[name], block))
    figures = {name: median_figure(samples[name], total) for name in variants}
    return {"probe_bytes": total, "block_bytes": len(block), **figures,
            "best_MBps": max(f["MBps"] for f in figures.values())}


# -- (b) async --------------------------------------------------------------------------------------------
def training_workload(d_model: int, n_layer: int) -> Callable[[], None]:
    """A fixed CPU training step (small GPT forward, backward, AdamW) to time with and without a save."""
    from dtrain.models.gpt import GPT

    model = GPT(vocab_size=256, seq_len=128, n_layer=n_layer, n_head=max(1, d_model // 64), d_model=d_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    tokens = torch.randint(0, 256, (8, 129), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def step_times(step: Callable[[], None], keep_going: Callable[[], bool], at_least: int = 1) -> list[float]:
    """Time steps until ``keep_going()`` is false (checked before each step), and at least ``at_least``."""
    times: list[float] = []
    while len(times) < at_least or keep_going():
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def steps_during_raw_write(workload: Callable[[], None], folder: Path, groups: list[list[memoryview]]) -> list[float]:
    """Step times while the raw baseline writes the same bytes from background threads."""
    writer = threading.Thread(target=parallel_write, args=(folder, groups))
    writer.start()
    try:
        return step_times(workload, writer.is_alive)
    finally:
        writer.join()


def steps_during_async_save(workload: Callable[[], None], manager: CheckpointManager, step: int,
                            state: dict) -> tuple[float, list[float]]:
    """(seconds the loop was blocked, step times while the save writes and commits in the background)."""
    blocked = manager.save(step, state, {"step": step})
    times = step_times(workload, lambda: manager.save_in_flight)
    manager.finalize()
    return blocked, times


def bench_async(state: dict, folder: Path, repeats: int, threads: int, workload: Callable[[], None],
                idle_steps: int) -> dict[str, Any]:
    samples: dict[str, list] = {k: [] for k in ("sync", "blocked", "idle", "during", "during_raw")}
    sync_manager = manager_for(str(folder / "sync"), "off", threads)
    async_manager = manager_for(str(folder / "async"), "thread", threads)
    groups = payload_groups(state, threads)
    step_times(workload, lambda: False, at_least=3)  # warm-up
    for step in range(1, repeats + 1):
        samples["sync"].append(timed_save(sync_manager, step, state))
        samples["idle"].append(step_times(workload, lambda: False, at_least=idle_steps))
        for kind in (["async", "raw"] if step % 2 else ["raw", "async"]):
            if kind == "raw":
                samples["during_raw"].append(steps_during_raw_write(workload, folder / "raw", groups))
            else:
                blocked, times = steps_during_async_save(workload, async_manager, step, state)
                samples["blocked"].append(blocked)
                samples["during"].append(times)
    sync_manager.close()
    async_manager.close()
    return async_result(samples)


def slowdowns(during: list[list[float]], idle: list[list[float]]) -> list[float]:
    """Per repeat: median step time under background writes / median step time with none."""
    return [statistics.median(d) / statistics.median(i) for d, i in zip(during, idle)]


def async_result(samples: dict[str, list]) -> dict[str, Any]:
    sync_s, blocked_s = statistics.median(samples["sync"]), statistics.median(samples["blocked"])
    pooled = {name: statistics.median([t for ts in samples[key] for t in ts])
              for name, key in (("idle", "idle"), ("during_save", "during"), ("during_raw_write", "during_raw"))}
    dtrain_slowdowns = slowdowns(samples["during"], samples["idle"])
    raw_slowdowns = slowdowns(samples["during_raw"], samples["idle"])
    return {"sync_save_s": sync_s, "async_blocked_s": blocked_s, "ratio": blocked_s / sync_s,
            "first_save_blocked_s": samples["blocked"][0], "goal": "ratio <= 0.10",
            "note": "the first async save also allocates the reusable host copy; later saves only copy into it",
            "overlap_slowdown": statistics.median(dtrain_slowdowns),
            "overlap_slowdown_raw_write": statistics.median(raw_slowdowns),
            "overlap_step_s": pooled,
            "steps_overlapped": [len(ts) for ts in samples["during"]],
            "overlap_workload": "small GPT forward + backward + AdamW, batch 8 x 128 tokens, 1 torch thread; "
                                "overlap_slowdown_raw_write: the same steps while the raw baseline writes the "
                                "same bytes from background threads",
            "samples_sync_s": samples["sync"], "samples_blocked_s": samples["blocked"],
            "samples_overlap_slowdown": dtrain_slowdowns, "samples_overlap_slowdown_raw_write": raw_slowdowns,
            "samples_idle_step_s": samples["idle"], "samples_during_save_step_s": samples["during"],
            "samples_during_raw_write_step_s": samples["during_raw"]}


# -- (c) S3 -----------------------------------------------------------------------------------------------
def raw_s3_put(fs, paths: list[str], payloads: list[bytes]) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(len(paths)) as pool:
        list(pool.map(fs.pipe_file, paths, payloads))
    return time.perf_counter() - start


def raw_s3_get(fs, paths: list[str], expected: int) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(len(paths)) as pool:
        got = sum(len(data) for data in pool.map(fs.cat_file, paths))
    seconds = time.perf_counter() - start
    assert got == expected, f"raw S3 read {got} bytes, wrote {expected}"
    return seconds


def timed_restore(manager: CheckpointManager, template: dict, state: dict) -> float:
    start = time.perf_counter()
    restored = manager.restore(lambda: template)
    seconds = time.perf_counter() - start
    assert restored is not None and all(torch.equal(template["model"][k], v) for k, v in state["model"].items())
    return seconds


def empty_like_state(state: dict) -> dict:
    return {"model": {k: torch.empty_like(v) for k, v in state["model"].items()},
            "optim": {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v for k, v in state["optim"].items()}}


def bench_s3(state: dict, repeats: int, threads: int) -> dict[str, Any]:
    import s3fs

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    proc, endpoint = start_moto()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=endpoint)
        fs.mkdir("bench")
        options = [f"+checkpoint.storage_options.endpoint_url={endpoint}"]
        saver = manager_for("s3://bench/ckpt", "off", threads, options)
        # readers hold no writer lease (the saver does), with and without checksum verification
        readers = {f"load_dtrain_{name}": manager_for("s3://bench/ckpt", "off", threads, [
            *options, "checkpoint.lease_ttl_s=0", f"checkpoint.verify_checksums={verify}"])
            for name, verify in (("verified", "true"), ("unverified", "false"))}
        payloads = [b"".join(group) for group in payload_groups(state, threads)]
        paths = [f"bench/raw/file_{i}.bin" for i in range(len(payloads))]
        payload = sum(nbytes(t) for t in flat_tensors(state))
        template = empty_like_state(state)
        samples: dict[str, list[float]] = {k: [] for k in ("save_dtrain", "save_raw", "load_dtrain_verified",
                                                           "load_dtrain_unverified", "load_raw")}
        for step in range(1, repeats + 1):
            flip = (lambda pair: pair) if step % 2 else (lambda pair: pair[::-1])
            for name in flip(["save_raw", "save_dtrain"]):
                samples[name].append(raw_s3_put(fs, paths, payloads) if name == "save_raw"
                                     else timed_save(saver, step, state))
            for name in flip(["load_raw", "load_dtrain_verified", "load_dtrain_unverified"]):
                samples[name].append(raw_s3_get(fs, paths, payload) if name == "load_raw" else
                                     timed_restore(readers[name], template, state))
        committed = committed_report(saver)
        for manager in (saver, *readers.values()):
            manager.close()
        return s3_result(samples, payload, threads, repeats, committed)
    finally:
        proc.kill()
        proc.wait()


def s3_result(samples: dict[str, list[float]], payload: int, threads: int, repeats: int,
              committed: dict[str, Any]) -> dict[str, Any]:
    fig = {name: median_figure(values, payload) for name, values in samples.items()}
    return {"endpoint": "moto_server on 127.0.0.1", "state_bytes": payload, "parallel_requests": threads,
            "repeats": repeats, "committed": committed,
            "save": {"dtrain": fig["save_dtrain"], "raw": fig["save_raw"],
                     "ratio": fig["save_dtrain"]["MBps"] / fig["save_raw"]["MBps"]},
            "load": {"dtrain_verified": fig["load_dtrain_verified"], "dtrain_unverified": fig["load_dtrain_unverified"],
                     "raw": fig["load_raw"], "ratio": fig["load_dtrain_verified"]["MBps"] / fig["load_raw"]["MBps"],
                     "ratio_unverified": fig["load_dtrain_unverified"]["MBps"] / fig["load_raw"]["MBps"]},
            "raw_baseline": "s3fs pipe_file / cat_file of the same bytes in the same per-file split, one thread "
                            "per file; payloads assembled before the clock starts",
            "load_includes": "dtrain: manifest + CRC32C of every file (verified) + DCP load; raw: GET only"}


# -- main -------------------------------------------------------------------------------------------------
def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    threads = args.write_threads or load_config(["run.name=bench"], 1).checkpoint.write_threads
    state = build_state(args.d_model, args.layers)
    workload = training_workload(args.overlap_d_model, args.overlap_layers)
    folder = Path(tempfile.mkdtemp(prefix="dtrain-ckpt-bench-", dir=args.dir))
    try:
        result = {"benchmark": "checkpoint", "torch": torch.__version__, "cpu_count": os.cpu_count(),
                  "platform": platform.platform(), "d_model": args.d_model, "layers": args.layers,
                  "repeats": args.repeats,
                  "local": bench_local(state, folder, args.repeats, threads, args.disk_probe_mib * MiB),
                  "async": bench_async(state, folder, args.repeats, threads, workload, args.overlap_idle_steps)}
        if not args.skip_s3:
            result["s3"] = bench_s3(state, args.s3_repeats, threads)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(without_samples(result), indent=2))


def without_samples(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_samples(v) for k, v in value.items() if not k.startswith("samples")}
    return value


if __name__ == "__main__":
    main()
