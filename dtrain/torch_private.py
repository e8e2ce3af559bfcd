"""Every private torch API dtrain uses, in one place, each with the reason no public one serves.

tests/unit/test_torch_private.py imports each of these and checks the attributes dtrain relies on, so
a torch upgrade that moves or changes one fails there, by name, rather than deep inside a run.

- DCP's fsspec storage writer and reader (``torch.distributed.checkpoint._fsspec_filesystem``): the
  public ``FileSystemWriter`` only writes local paths; checkpoints go to any fsspec store.
- DCP's background-process executor (``_async_process_executor``): ``async_mode=process`` must stop
  the child at close; torch only stops it at garbage collection, which never comes under ``os._exit``.
- ``TorchDispatchMode`` (``torch.utils._python_dispatch``): the only way to see every collective
  (eager c10d and DTensor's functional ones) as it is dispatched; torch's ``CommDebugMode`` breaks on
  FSDP2's hooks.
- ``_resolve_process_group``: functional collectives name their group by a string; it is the only way
  to get the group (and its size) back from that name.
- ``_get_default_store``: the hang detector's heartbeats go through the job's own TCPStore (every rank
  already reaches it, across nodes; a file in the run directory would need a shared file system).
- Flight Recorder dumps (``_dump_fr_trace_json``, and ``_dump_nccl_trace_json`` in CUDA builds): the
  only way to read a rank's own last collectives while it runs; torch documents the recorder and its
  environment variables but exposes the dump only privately.
- For the exposed-communication meter (dtrain/metrics/exposed_comm.py), which must time collectives
  whatever issued them: ``_ExcludeDispatchKeyGuard`` (a Python kernel at the autograd key passes the
  call on to the backend kernel), ``_current_graph_task_id`` and the autograd engine's
  ``queue_callback`` (a DDP bucket is waited inside C++ at the end of backward; an end-of-backward
  callback waits for it first, from Python), and ``torch.distributed._functional_collectives``
  (DTensor waits for its collectives through that module's ``wait_tensor``), and ``OpOverload._op`` (the
  meter calls the collective it wraps without torch's per-call Python checks).
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as FsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["FsspecFileSystem", "FsspecReader", "FsspecWriter", "TorchDispatchMode", "below_autograd",
           "default_store", "flight_recorder_json", "functional_collectives", "group_by_name", "group_size_by_name",
           "in_backward", "queue_backward_callback", "raw_op", "stop_checkpoint_process"]


def group_by_name(name: str) -> dist.ProcessGroup:
    """The process group a functional collective names."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name)


def group_size_by_name(name: str) -> int:
    """Size of the process group a functional collective names."""
    return group_by_name(name).size()


def below_autograd():
    """Context in which ops dispatch past the CPU and CUDA autograd keys (to the backend kernel). An
    exclude guard on just those keys: ``_AutoDispatchBelowAutograd`` does the same but costs ~5x more
    per call (measured around a gloo all-reduce)."""
    import torch

    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.AutogradCPU) | torch._C.DispatchKeySet(
        torch._C.DispatchKey.AutogradCUDA)
    return torch._C._ExcludeDispatchKeyGuard(keys)


def in_backward() -> bool:
    """Whether the calling code runs inside an autograd backward pass."""
    import torch

    return torch._C._current_graph_task_id() != -1


def queue_backward_callback(callback) -> None:
    """Run ``callback`` when the current backward pass has finished (callbacks run in queue order)."""
    import torch

    torch.autograd.Variable._execution_engine.queue_callback(callback)


def raw_op(overload):
    """An op overload's C++ entry (``OpOverload._op``): calling it skips the Python checks torch runs on
    ops with TorchBind arguments (every c10d collective), ~10 us per call."""
    return getattr(overload, "_op", overload)


def functional_collectives():
    """torch's functional-collectives module (its ``wait_tensor`` is how DTensor waits)."""
    import torch.distributed._functional_collectives as funcol

    return funcol


def stop_checkpoint_process() -> None:
    """Stop DCP's background save process (``async_mode=process``) now, instead of at garbage collection,
    which never comes when the launcher exits with ``os._exit``; the child would then die on a closed pipe."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    process = getattr(executor, "_CHECKPOINT_PROCESS", None)
    if process is not None:
        executor._CHECKPOINT_PROCESS = None
        del process  # its __del__ sends TERMINATE and joins the child


def unbox_group(script_object) -> dist.ProcessGroup:
    """The ProcessGroup behind a boxed group argument of a c10d op."""
    return dist.ProcessGroup.unbox(script_object)


def default_store() -> dist.Store | None:
    """The default process group's store (torchrun's TCPStore), or None without a group."""
    if not dist.is_initialized():
        return None
    from torch.distributed.distributed_c10d import _get_default_store

    return _get_default_store()


def flight_recorder_json(nccl: bool) -> bytes | str | None:
    """This rank's Flight Recorder ring as JSON (collectives only, no stacks), or None when unavailable."""
    import torch._C._distributed_c10d as c10d

    dump = getattr(c10d, "_dump_nccl_trace_json", None) if nccl else None
    dump = dump or getattr(c10d, "_dump_fr_trace_json", None)
    return dump(True, False) if dump is not None else None
