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
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as FsspecFileSystem
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["FsspecFileSystem", "FsspecReader", "FsspecWriter", "TorchDispatchMode", "group_size_by_name",
           "stop_checkpoint_process"]


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
