"""The private torch APIs dtrain uses (all in dtrain/torch_private.py) still have the shape it relies on.

When a torch upgrade moves or changes one, this fails by name instead of a run failing mid-save."""

from __future__ import annotations

import inspect

import torch

from dtrain import torch_private


def test_dcp_fsspec_writer_and_reader_keep_the_hooks_dtrain_overrides():
    writer = inspect.signature(torch_private.FsspecWriter.__init__).parameters
    assert {"path", "thread_count", "sync_files", "overwrite"} <= set(writer), list(writer)
    for method in ("create_stream", "rename", "mkdir", "exists"):
        assert callable(getattr(torch_private.FsspecFileSystem, method)), method
    assert callable(torch_private.FsspecReader.read_metadata)


def test_dcp_process_executor_keeps_its_module_level_process_handle():
    from torch.distributed.checkpoint import _async_process_executor as executor

    assert hasattr(executor, "_CHECKPOINT_PROCESS")
    torch_private.stop_checkpoint_process()  # a no-op when none runs


def test_dispatch_mode_sees_a_collective_by_its_packet_name():
    seen = []

    class Spy(torch_private.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Spy():
        torch.ones(2) + 1
    assert "aten.add" in seen, seen


def test_group_size_by_name_resolves_a_functional_collective_group():
    import torch.distributed as dist

    dist.init_process_group("fake", rank=0, world_size=3)
    try:
        assert torch_private.group_size_by_name(dist.group.WORLD.group_name) == 3
    finally:
        dist.destroy_process_group()


def test_default_store_and_flight_recorder_dump_are_reachable():
    import json

    import torch.distributed as dist

    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        assert torch_private.default_store() is not None
        dumped = json.loads(torch_private.flight_recorder_json(nccl=False))
        assert "entries" in dumped or "version" in dumped, sorted(dumped)
    finally:
        dist.destroy_process_group()
    assert torch_private.default_store() is None


def test_exposed_comm_hooks_exist():
    """What the exposed-communication meter relies on: a backend-only dispatch context, backward
    detection and end-of-backward callbacks, and the functional collectives' module-level wait."""
    x = torch.ones(2, requires_grad=True)
    order = []

    def hook(grad):
        order.append(torch_private.in_backward())
        torch_private.queue_backward_callback(lambda: order.append("after"))
        return grad

    x.register_hook(hook)
    (x * 2).sum().backward()
    assert order == [True, "after"] and not torch_private.in_backward()
    with torch_private.below_autograd():
        assert (torch.ones(2) + 1).sum() == 4
    assert callable(torch_private.functional_collectives().wait_tensor)
