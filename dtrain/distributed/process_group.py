"""Process-group start and stop, decided once from the environment and the config.

Backend: nccl when the device is CUDA, gloo otherwise. The default group gets ``device_id`` on CUDA so
NCCL can bind eagerly. Teardown is defensive: a gloo worker can abort in its destructor at exit, so
we barrier with a timeout first and never let teardown hide the real error of a failed run.

Device rule: NCCL has no backend for CPU tensors. Rather than a device-mapped group
(``cpu:gloo,cuda:nccl``), every collective dtrain issues itself (preemption vote, loss and target-count
reductions, grad norm, pipeline headers) keeps its tensors on the training device, and object
collectives (config hash, checkpoint coordination) go through torch's device-aware object path. Why:
it works with any group a user or DeepSpeed created (DeepSpeed's is NCCL-only), it adds no second
communicator to every mesh subgroup (a gloo full mesh of TCP connections per group, at 1024 ranks),
and the vote is one more tiny collective on a stream that runs anyway. The one gloo group dtrain
creates is the checkpoint's own, for background saves. tests/distributed/test_nccl_device_rule.py
checks the rule on CPU.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from dtrain.distributed.env import DistEnv

log = logging.getLogger(__name__)


def pick_device(requested: str, env: DistEnv) -> torch.device:
    """``auto`` means the local GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("trainer.device=cuda but no CUDA device is visible; use trainer.device=cpu")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(requested)


def pick_backend(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(env: DistEnv, backend: str, device: torch.device, timeout_s: float) -> None:
    """Join the job's default group. Works for torchrun (env://) and for plain Slurm tasks (tcp://)."""
    if dist.is_initialized():
        return
    init_method = None
    if env.source != "torchrun":
        init_method = f"tcp://{env.master_addr}:{env.master_port}"
    kwargs = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, init_method=init_method, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    log.debug("rank %d/%d joined the %s group at %s:%s", env.rank, env.world_size, backend,
              env.master_addr, env.master_port)


def destroy_process_group(timeout_s: float = 30.0) -> None:
    """Leave the group; a barrier with a short timeout first keeps fast ranks from tearing down peers."""
    if not dist.is_initialized():
        return
    try:
        if dist.get_world_size() > 1 and dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
    except Exception as e:  # a peer died: nothing left to synchronise with
        log.warning("rank %d: barrier before teardown failed: %s", dist.get_rank(), e)
    dist.destroy_process_group()
