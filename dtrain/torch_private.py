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
  to get the group's size back from that name.
- ``_get_default_store``: the hang detector's heartbeats go through the job's own TCPStore (every rank
  already reaches it, across nodes; a file in the run directory would need a shared file system).
- Flight Recorder dumps (``_dump_fr_trace_json``, and ``_dump_nccl_trace_json`` in CUDA builds): the
  only way to read a rank's own last collectives while it runs; torch documents the recorder and its
  environment variables but exposes the dump only privately.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as FsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["FsspecFileSystem", "FsspecReader", "FsspecWriter", "TorchDispatchMode", "default_store",
           "flight_recorder_json", "group_size_by_name", "stop_checkpoint_process"]


def group_size_by_name(name: str) -> int:
    """Size of the process group a functional collective names."""
    from torch.distributed.distributed_c10d import _resolve_process_group

    return _resolve_process_group(name).size()


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
