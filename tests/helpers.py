"""Test helpers: free ports, subprocess and torchrun runners that never hang and clean up after themselves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "GROUP_RANK", "ROLE_RANK")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str | None) -> dict[str, str]:
    """This process's environment minus launcher variables, plus ``extra`` (a None value removes a variable)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants: torchrun puts each worker in a session of its own,
    so killing the agent's process group would leave the workers running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    todo, found = [pid], []
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    for victim in found:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_cmd(args: list[str], timeout: float = 240, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout kill the whole group (workers too) and fail."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or subprocess_env(), cwd=cwd or REPO, start_new_session=True)
    return finish(proc, timeout)


def torchrun(nproc: int, overrides: list[str], timeout: float = 240, **env: str | None) -> subprocess.CompletedProcess:
    return run_cmd(torchrun_args(nproc, overrides), timeout=timeout, env=subprocess_env(**env))


def dtrain_single(overrides: list[str], timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    return run_cmd([sys.executable, "-m", "dtrain", *overrides], timeout=timeout, env=subprocess_env(**env))


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Small, fast settings shared by the end-to-end tests.
TINY_TRAIN = ["model=gpt_tiny", "model.n_layer=2", "model.d_model=64", "trainer.global_batch_size=8",
              "trainer.micro_batch_size=2", "trainer.eval_every=0", "trainer.sample_tokens=0", "trainer.log_every=1",
              "logging.progress=lines"]
TINY_DATA = ["data.seq_len=32", "data.max_bytes=400000"]
TINY = TINY_TRAIN + TINY_DATA


def _worker_entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1"})
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn_workers(fn, world_size: int, *args, timeout: float = 180) -> None:
    """Run ``fn(rank, world_size, *args)`` in fresh processes inside a gloo group; raise if any rank fails."""
    import time

    import torch.multiprocessing as mp

    context = mp.start_processes(_worker_entry, args=(fn, world_size, free_port(), args), nprocs=world_size,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__} did not finish on {world_size} ranks within {timeout}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()


def torchrun_args(nproc: int, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=test", "-m", "dtrain", *overrides]


def start(args: list[str], **env: str | None) -> subprocess.Popen:
    """Start a command in its own session (so the test can signal or kill the whole tree)."""
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=subprocess_env(**env), cwd=REPO, start_new_session=True)


def wait_for_rows(run_dir: Path, rows: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until ``metrics.jsonl`` has ``rows`` lines; fail if the process ends first."""
    import time

    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while not (path.exists() and len(path.read_text().splitlines()) >= rows):
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process ended (rc={proc.returncode}) before {rows} metric rows:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            kill_tree(proc.pid)
            pytest.fail(f"no {rows} metric rows within {timeout}s")
        time.sleep(0.05)


def finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"did not exit within {timeout}s\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def worker_pids(agent_pid: int) -> list[int]:
    """The torchrun agent's worker processes, in start order."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    return sorted(int(pid) for pid in children)


_NCCL_RULE = None


def _called_from_dtrain() -> bool:
    """Whether the code that called a tensor factory (the first frame outside this file) is dtrain's."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame is not None and frame.f_code.co_filename.startswith(str(REPO / "dtrain") + os.sep)


def nccl_device_rule() -> None:
    """Make this process obey NCCL's device rule on a CPU-only machine.

    On a GPU run the training device is ``cuda`` while a tensor dtrain creates without an explicit
    device lands on the CPU, and NCCL refuses it in a collective ("No backend type associated with
    device type cpu"). Here the training device is the CPU, so ``meta`` stands in for "not the training
    device": a factory call made by dtrain's code without a device creates a meta tensor, and every
    c10d collective on a meta tensor raises NCCL's error (c10d normally accepts meta tensors silently).
    torch's own code keeps the CPU default, as it does on a GPU run.
    """
    import torch
    from torch.overrides import TorchFunctionMode

    global _NCCL_RULE
    if _NCCL_RULE is not None:
        return

    def no_backend(*args, **kwargs):
        raise RuntimeError("No backend type associated with device type meta (dtrain test: a collective tensor "
                           "is not on the training device; NCCL refuses a CPU tensor the same way)")

    library = torch.library.Library("c10d", "IMPL")
    ops = sorted({name.split("::")[1].split(".")[0] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("c10d::")})
    for op in ops:
        if op != "check_for_nan":
            library.impl(op, no_backend, "Meta")
    factories = {torch.empty, torch.zeros, torch.ones, torch.full, torch.tensor, torch.as_tensor, torch.arange,
                 torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace,
                 torch.scalar_tensor, torch.empty_strided}

    class DtrainDefaultDevice(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func in factories and kwargs.get("device") is None and _called_from_dtrain():
                kwargs["device"] = "meta"
            return func(*args, **kwargs)

    mode = DtrainDefaultDevice()
    mode.__enter__()
    _NCCL_RULE = (library, mode)


def script_env(**extra: str | None) -> dict[str, str]:
    """Environment for rendered launcher scripts, which call plain `python`: this interpreter's folder first on
    PATH and this checkout importable, as a user's activated virtualenv would have it."""
    venv_bin = str(Path(sys.executable).parent)
    return subprocess_env(PYTHONPATH=str(REPO), PATH=f"{venv_bin}{os.pathsep}{os.environ['PATH']}", **extra)
