"""Checkpoint save/load speed, each against a baseline measured in the same run.

    python benchmarks/checkpoint.py --out checkpoint.json [--skip-s3]

(a) local: dtrain's committed save (DCP shards, CRC32C while writing, fsync, manifest) against writing
    the same bytes raw to one file with fsync on the same disk: ``ratio`` = dtrain throughput / raw
    throughput (goal >= 0.7).
(b) async: the time the training loop is blocked by an async (thread) save against a synchronous save
    of the same state: ``ratio`` = blocked / sync (goal <= 0.10).
(c) S3: save and load through s3fs to a real S3 API server (moto) on 127.0.0.1.
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
import time
from pathlib import Path

import torch

from dtrain.checkpoint.manager import CheckpointManager
from dtrain.config.validate import load_config
from dtrain.distributed.env import discover_env


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


def tensor_bytes(state) -> list[torch.Tensor]:
    out = []
    if isinstance(state, dict):
        for value in state.values():
            out += tensor_bytes(value)
    elif isinstance(state, (list, tuple)):
        for value in state:
            out += tensor_bytes(value)
    elif isinstance(state, torch.Tensor):
        out.append(state)
    return out


def raw_write(tensors: list[torch.Tensor], path: Path) -> float:
    start = time.perf_counter()
    with open(path, "wb") as f:
        for t in tensors:
            f.write(t.contiguous().view(torch.uint8).numpy().tobytes() if t.dim() else t.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def manager_for(uri: str, async_mode: str, extra: list[str] = ()) -> CheckpointManager:
    cfg = load_config(["run.name=bench", f"checkpoint.uri={uri}", f"checkpoint.async_mode={async_mode}",
                       "checkpoint.keep_last=1", *extra], 1)
    return CheckpointManager(cfg, discover_env({}), "bench", "single")


def bench_local(state: dict, folder: Path, repeats: int) -> dict:
    tensors = tensor_bytes(state)
    total = sum(t.numel() * t.element_size() for t in tensors)
    raw, ours = [], []
    manager = manager_for(str(folder / "ckpt"), "off")
    for step in range(1, repeats + 1):
        raw.append(raw_write(tensors, folder / "raw.bin"))
        start = time.perf_counter()
        manager.save(step, state, {"step": step}, blocking=True)  # returns once committed
        ours.append(time.perf_counter() - start)
        manager.finalize()  # old steps are deleted in the background: let that finish before the next timing
    raw_s, ours_s = statistics.median(raw), statistics.median(ours)
    return {"state_bytes": total, "raw_write_s": raw_s, "dtrain_save_s": ours_s,
            "raw_MBps": total / raw_s / 1e6, "dtrain_MBps": total / ours_s / 1e6, "ratio": raw_s / ours_s,
            "goal": "ratio >= 0.7", "samples_raw_s": raw, "samples_dtrain_s": ours}


def bench_async(state: dict, folder: Path, repeats: int) -> dict:
    sync_times, blocked = [], []
    sync_manager = manager_for(str(folder / "sync"), "off")
    async_manager = manager_for(str(folder / "async"), "thread")
    for step in range(1, repeats + 1):
        start = time.perf_counter()
        sync_manager.save(step, state, {"step": step}, blocking=True)
        sync_times.append(time.perf_counter() - start)
        sync_manager.finalize()
        blocked.append(async_manager.save(step, state, {"step": step}))
        async_manager.finalize()  # not counted: the loop would be training meanwhile
    async_manager.close()
    sync_s, blocked_s = statistics.median(sync_times), statistics.median(blocked)
    return {"sync_save_s": sync_s, "async_blocked_s": blocked_s, "ratio": blocked_s / sync_s,
            "first_save_blocked_s": blocked[0], "goal": "ratio <= 0.10",
            "note": "the first async save also allocates the reusable host copy; later saves only copy into it",
            "samples_sync_s": sync_times, "samples_blocked_s": blocked}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


def bench_s3(state: dict) -> dict:
    import s3fs

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    proc, endpoint = start_moto()
    try:
        s3fs.S3FileSystem(endpoint_url=endpoint).mkdir("bench")
        manager = manager_for("s3://bench/ckpt", "off", [f"+checkpoint.storage_options.endpoint_url={endpoint}"])
        total = sum(t.numel() * t.element_size() for t in tensor_bytes(state))
        start = time.perf_counter()
        manager.save(1, state, {"step": 1, "loader": {}, "scheduler": {}}, blocking=True)
        save_s = time.perf_counter() - start
        template = {"model": {k: torch.empty_like(v) for k, v in state["model"].items()},
                    "optim": {k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v
                              for k, v in state["optim"].items()}}
        start = time.perf_counter()
        restored = manager.restore(template)
        load_s = time.perf_counter() - start
        assert restored is not None and all(torch.equal(template["model"][k], v) for k, v in state["model"].items())
        return {"endpoint": "moto_server on 127.0.0.1", "state_bytes": total, "save_s": save_s, "load_s": load_s,
                "save_MBps": total / save_s / 1e6, "load_MBps": total / load_s / 1e6,
                "load_includes": "manifest + CRC32C verification of every file, then DCP load"}
    finally:
        proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument("--dir", default=None, help="disk to measure (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    state = build_state(args.d_model, args.layers)
    folder = Path(tempfile.mkdtemp(prefix="dtrain-ckpt-bench-", dir=args.dir))
    try:
        result = {"benchmark": "checkpoint", "torch": torch.__version__,
                  "local": bench_local(state, folder, args.repeats),
                  "async": bench_async(state, folder, args.repeats)}
        if not args.skip_s3:
            result["s3"] = bench_s3(state)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if not kk.startswith("samples")} if isinstance(v, dict)
                      else v for k, v in result.items()}, indent=2))


if __name__ == "__main__":
    main()
