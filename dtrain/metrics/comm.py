"""Count the collectives a piece of code issues and their payload, by intercepting dispatch.

Works for every kind of caller: eager c10d calls (DDP, FSDP2, pipeline sends), and the functional
collectives DTensor uses for tensor parallelism. Payload is the logical size per rank: the reduced
tensor of an all-reduce, the gathered output of an all-gather, the input of a reduce-scatter, the
tensor of a broadcast, send or receive. ``wire_bytes`` estimates what crosses each rank's link with
ring algorithms over a group of ``n``: ``2(n-1)/n`` of an all-reduce payload, ``(n-1)/n`` of an
all-gather, reduce-scatter or all-to-all, all of a send, receive or broadcast. torch's own
``CommDebugMode`` trips over FSDP2's module hooks, hence this small counter.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from dtrain.torch_private import TorchDispatchMode, group_size_by_name, unbox_group

# op name (without overload) -> (kind, which argument carries the payload); also what the
# exposed-communication meter (dtrain/metrics/exposed_comm.py) times
COLLECTIVES: dict[str, tuple[str, int]] = {
    "c10d.allreduce_": ("all_reduce", 0),
    "c10d.allreduce_coalesced_": ("all_reduce", 0),
    "_c10d_functional.all_reduce": ("all_reduce", 0),
    "_c10d_functional.all_reduce_coalesced": ("all_reduce", 0),
    "c10d._allgather_base_": ("all_gather", 0),
    "c10d.allgather_": ("all_gather", 0),
    "c10d.allgather_into_tensor_coalesced_": ("all_gather", 0),
    "_c10d_functional.all_gather_into_tensor": ("all_gather", -1),
    "_c10d_functional.all_gather_into_tensor_coalesced": ("all_gather", -1),
    "c10d._reduce_scatter_base_": ("reduce_scatter", 1),
    "c10d.reduce_scatter_": ("reduce_scatter", 1),
    "c10d.reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "_c10d_functional.reduce_scatter_tensor": ("reduce_scatter", 0),
    "_c10d_functional.reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "c10d.broadcast_": ("broadcast", 0),
    "_c10d_functional.broadcast": ("broadcast", 0),
    "c10d.send": ("send", 0),
    "c10d.recv_": ("recv", 0),
    "c10d.alltoall_base_": ("all_to_all", 1),
    "c10d.alltoall_": ("all_to_all", 1),
    "c10d.allgather_coalesced_": ("all_gather", 0),
    "c10d.recv_any_source_": ("recv", 0),
    "c10d.reduce_": ("reduce", 0),
    "c10d.gather_": ("gather", 1),
    "c10d.scatter_": ("scatter", 1),
    "_c10d_functional.all_to_all_single": ("all_to_all", 0),
}


def nbytes(value: Any) -> int:
    """Bytes of a tensor or a (nested) list of tensors."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


def _group_size(args: tuple) -> int:
    """Size of the group a collective runs on: a boxed ProcessGroup (c10d ops) or a group name
    (functional collectives, whose name is their last string argument)."""
    for arg in args:
        if isinstance(arg, torch.ScriptObject):
            try:
                return unbox_group(arg).size()
            except (RuntimeError, TypeError):
                continue
    names = [a for a in args if isinstance(a, str)]
    if names:
        try:
            return group_size_by_name(names[-1])
        except (RuntimeError, ValueError):
            pass
    return 2


_RING_SHARE = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
               "reduce_scatter": lambda n: (n - 1) / n, "all_to_all": lambda n: (n - 1) / n}


class CommCounter(TorchDispatchMode):
    """``with CommCounter() as c: ...`` then ``c.calls``, ``c.bytes`` (payload) and ``c.wire_bytes``
    (ring estimate per rank): dicts keyed by collective kind."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.wire_bytes: dict[str, float] = defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)  # "c10d.allreduce_"
        if name in COLLECTIVES:
            kind, index = COLLECTIVES[name]
            out = func(*args, **kwargs)
            payload = out if index == -1 else (args[index] if index < len(args) else None)
            size = nbytes(payload)
            self.calls[kind] += 1
            self.bytes[kind] += size
            share = _RING_SHARE.get(kind)
            self.wire_bytes[kind] += size * share(_group_size(args)) if share else size
            return out
        return func(*args, **kwargs)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def total_wire_bytes(self) -> int:
        return int(sum(self.wire_bytes.values()))

    def summary(self) -> dict[str, dict[str, int]]:
        return {kind: {"calls": self.calls[kind], "bytes": self.bytes[kind], "wire_bytes": int(self.wire_bytes[kind])}
                for kind in sorted(self.calls)}
