"""Exposed communication: how long the training thread waits on collectives per step, by mesh dimension.

What is measured. Communication that compute hides costs nothing; what costs is the time the training
thread cannot compute because it waits for a collective. On CPU/gloo that is host time spent inside a
collective call (issuing it; a synchronous call runs to completion) plus time blocked waiting for an
asynchronous one. Both are timed where they happen, for every caller alike:

- every ``c10d`` collective op (DDP's reducer, FSDP2, pipeline sends and receives, dtrain's own
  reductions) gets a thin Python kernel at the autograd dispatch key that times the call, notes the
  group, and passes the call on below autograd;
- ``Work.wait`` (the waits of FSDP2, the pipeline schedules and ``dist.*`` calls) and the functional
  collectives' ``wait_tensor`` (DTensor, i.e. tensor parallelism) are timed;
- DDP waits for its gradient buckets inside C++ at the end of backward, where Python cannot see; a
  bucket issued during backward therefore gets an end-of-backward callback (queued before DDP's own)
  that waits for it first, timed. Nothing moves: DDP would block on the same bucket a moment later.

Attribution: a collective's group names its mesh dimension (DeviceMesh groups are described
``mesh_<dim>``): ``dp`` (dp_replicate, dp_shard), ``tp``, ``pp``, ``cp``. The default (world) group
belongs to the run's only parallel dimension when there is one (DDP: ``dp``; a DeviceMesh dimension
as large as the world reuses the default group), else to ``other`` (dtrain's loss and gradient-norm
reductions over every rank). A pipeline rank blocked on a send or a receive waits for its neighbour
(a gloo send completes when the peer has posted the matching receive): those waits are the
``bubble`` (fill, drain and stage imbalance, plus the transfer itself), kept apart from
``exposed_comm_s``; issuing the sends and receives counts as ``pp``.
DTensor's collectives are timed at their wait only and counted as ``tp`` (dtrain uses DTensor
collectives only for tensor parallelism; issuing one costs microseconds on gloo, and a Python kernel
on each of the hundreds a tensor-parallel step issues would cost more than it measures).

Cost: nothing runs outside the trainer's step window; inside, tens of microseconds of Python per
collective (benchmarks/exposed_comm_overhead.py: the step-time ratio on vs off, and the cost per
collective times the collectives of a step).

On GPUs the host returns from an NCCL call or wait at once while the device stream waits, so host
time is not what the device lost: the meter is off on CUDA (it logs so once). The GPU design, not
built yet (no GPU to test it on), is in docs/scaling.md: the same interception points with CUDA event
pairs on the compute stream around each wait, and a reference step of the same per-rank work on
torch's ``fake`` process group.

Fault injection: ``DTRAIN_INJECT_COMM_DELAY_MS=X`` blocks the issuing thread X ms in every collective
of the training step (before a c10d collective starts; at the wait of a DTensor collective), like a
collective that takes X ms longer on the critical path. Used to validate the
meter (tests/distributed/test_exposed_comm.py); never set it in production.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from dtrain.metrics.comm import COLLECTIVES, nbytes
from dtrain.torch_private import below_autograd, functional_collectives, in_backward, queue_backward_callback, raw_op

log = logging.getLogger(__name__)

INJECT_ENV = "DTRAIN_INJECT_COMM_DELAY_MS"
DIMS = ("dp", "tp", "pp", "cp", "other")
_MESH_DIMS = {"mesh_dp_replicate": "dp", "mesh_dp_shard": "dp", "mesh_tp": "tp", "mesh_pp": "pp", "mesh_cp": "cp",
              "default_pg": "world"}
# c10d ops (without the namespace) -> the argument whose bytes are counted (-1: none)
_C10D_OPS: dict[str, int] = {name.split(".", 1)[1]: index for name, (_, index) in COLLECTIVES.items()
                             if name.startswith("c10d.")} | {"barrier": -1, "monitored_barrier_": -1}


def injected_delay_s() -> float:
    """The fault-injection delay per collective, in seconds (0 when unset)."""
    value = os.environ.get(INJECT_ENV, "").strip()
    if not value:
        return 0.0
    try:
        delay = float(value)
    except ValueError:
        raise ValueError(f"{INJECT_ENV}={value!r} must be a number of milliseconds") from None
    if delay < 0:
        raise ValueError(f"{INJECT_ENV}={value!r} must not be negative")
    return delay / 1000.0


def world_dimension(degrees: dict[str, int] | None) -> str:
    """The dimension the default group stands for: the one parallel degree above 1 (dp for none known)."""
    if degrees is None:
        return "dp"
    used = {"dp" if name.startswith("dp") else name for name, size in degrees.items() if size > 1}
    return used.pop() if len(used) == 1 else ("dp" if not used else "other")


def _dim_of_group(group: dist.ProcessGroup) -> str:
    dim = _MESH_DIMS.get(getattr(group, "group_desc", ""), "other")
    return _STATE.world_dim if dim == "world" else dim


def _dim_of_boxed(args: tuple) -> str:
    for arg in args:
        if isinstance(arg, torch.ScriptObject):
            try:
                group = dist.ProcessGroup.unbox(arg)
            except (RuntimeError, TypeError):
                continue
            dim = _STATE.dims.get(id(group))
            if dim is None:
                dim = _STATE.dims[id(group)] = _dim_of_group(group)
                _STATE.groups.append(group)  # keeps the id valid
            return dim
    return "other"


@dataclass
class StepComm:
    """One step's blocked seconds by dimension (``bubble``: pipeline send and receive waits), calls and
    payload bytes."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: int = 0
    bytes: int = 0

    def metrics(self, step_time: float) -> dict[str, float]:
        by_dim = {d: self.seconds.get(d, 0.0) for d in DIMS}
        exposed = sum(by_dim.values())
        bubble = self.seconds.get("bubble", 0.0)
        out = {"exposed_comm_s": exposed, "exposed_comm_fraction": exposed / step_time if step_time > 0 else 0.0}
        out.update({f"exposed_comm_{d}_s": by_dim[d] for d in DIMS})
        out.update({"bubble_s": bubble, "bubble_fraction": bubble / step_time if step_time > 0 else 0.0,
                    "comm_calls": self.calls, "comm_bytes": self.bytes})
        return out


class _State:
    """Process-wide interception state (collectives are process-wide; so is what times them)."""

    def __init__(self) -> None:
        self.installed = False
        self.armed = False
        self.delay = 0.0
        self.world_dim = "dp"
        self.step = StepComm()
        self.works: dict[int, tuple[Any, str, bool]] = {}  # id(Work) -> (work, dim, is point to point)
        self.dims: dict[int, str] = {}  # id(ProcessGroup) -> dim
        self.groups: list[Any] = []
        self.libraries: list[torch.library.Library] = []
        self.original_wait = None
        self.original_wait_tensor = None
        self.lock = threading.Lock()

    def add(self, dim: str, seconds: float) -> None:
        with self.lock:
            self.step.seconds[dim] += seconds


_STATE = _State()


def _c10d_kernel(name: str, packet, payload: int):
    def kernel(*args, **kwargs):
        state = _STATE
        if not state.armed:
            with below_autograd():
                return packet(*args, **kwargs)
        dim = _dim_of_boxed(args)
        start = time.perf_counter()
        if state.delay:
            time.sleep(state.delay)
        with below_autograd():
            out = packet(*args, **kwargs)
        point_to_point = name in ("send", "recv_", "recv_any_source_")
        state.add(dim, time.perf_counter() - start)
        with state.lock:
            state.step.calls += 1
            state.step.bytes += nbytes(args[payload]) if 0 <= payload < len(args) else 0
        work = out[1] if isinstance(out, tuple) and len(out) == 2 else out
        if isinstance(work, torch.ScriptObject):
            _register_work(dist.Work.unbox(work), dim, point_to_point)
        return out
    return kernel


def _register_work(work, dim: str, point_to_point: bool) -> None:
    state = _STATE
    with state.lock:
        if len(state.works) > 4096:  # works nobody waited for: drop the finished ones
            for key in [k for k, (w, _, _) in state.works.items() if w.is_completed()]:
                del state.works[key]
        state.works[id(work)] = (work, dim, point_to_point)
    if in_backward():
        # issued during backward (DDP's buckets): wait for it, timed, before DDP's own C++ wait
        queue_backward_callback(work.wait)


def _timed_wait(self, *args, **kwargs):
    state = _STATE
    original = state.original_wait
    if not state.armed:
        return original(self, *args, **kwargs)
    with state.lock:
        entry = state.works.pop(id(self), None)
    start = time.perf_counter()
    result = original(self, *args, **kwargs)
    if entry is not None:
        _, dim, point_to_point = entry
        state.add("bubble" if point_to_point and dim == "pp" else dim, time.perf_counter() - start)
    return result


def _timed_wait_tensor(tensor):
    """A DTensor collective's wait (its issue is not timed: it costs microseconds on gloo, and timing
    it would put a Python kernel on every one of the hundreds of tensor-parallel collectives a step
    issues). Counted as ``tp``: dtrain uses DTensor collectives only for tensor parallelism."""
    state = _STATE
    original = state.original_wait_tensor
    if not state.armed:
        return original(tensor)
    start = time.perf_counter()
    if state.delay:
        time.sleep(state.delay)
    result = original(tensor)
    state.add("tp", time.perf_counter() - start)
    with state.lock:
        state.step.calls += 1
        state.step.bytes += nbytes(result)
    return result


def install(delay_s: float = 0.0) -> None:
    """Put the timing kernels and wait wrappers in place (idempotent); they stay inert until armed."""
    state = _STATE
    state.delay = delay_s
    if state.installed:
        return
    funcol = functional_collectives()
    c10d = torch.library.Library("c10d", "IMPL")
    for name, payload in _C10D_OPS.items():
        packet = getattr(torch.ops.c10d, name, None)
        if packet is not None:
            c10d.impl(name, _c10d_kernel(name, raw_op(packet.default), payload), "AutogradCPU")
    state.libraries = [c10d]
    state.original_wait = dist.Work.wait
    dist.Work.wait = _timed_wait
    state.original_wait_tensor = funcol.wait_tensor
    funcol.wait_tensor = _timed_wait_tensor
    state.installed = True


def uninstall() -> None:
    state = _STATE
    if not state.installed:
        return
    funcol = functional_collectives()
    state.armed = False
    for library in state.libraries:
        library._destroy()
    state.libraries = []
    dist.Work.wait = state.original_wait
    funcol.wait_tensor = state.original_wait_tensor
    state.works.clear()
    state.dims.clear()
    state.groups.clear()
    state.installed = False


class CommMeter:
    """The trainer's handle: ``begin_step()`` before a step, ``end_step(step_time)`` after it."""

    def __init__(self, delay_s: float = 0.0, world_dim: str = "dp", intercept: bool = True):
        self.intercept = intercept  # one process without a group has nothing to intercept: zeros
        if intercept:
            install(delay_s)
            if _STATE.world_dim != world_dim:
                _STATE.world_dim = world_dim
                _STATE.dims.clear()  # cached group -> dimension answers depend on it

    @classmethod
    def for_run(cls, measure: bool, device: torch.device, world_dim: str = "dp") -> "CommMeter | None":
        """A meter when measurement is on (CPU only, see module docstring) or a delay is injected."""
        delay = injected_delay_s()
        if device.type != "cpu":
            if measure:
                log.info("exposed communication is not measured on %s: host time is not device time "
                         "(docs/scaling.md)", device.type)
            return None
        if not (measure or delay):
            return None
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return cls(intercept=False)
        if delay:
            log.warning("%s: every collective of the training step is delayed %.1f ms (fault injection)",
                        INJECT_ENV, delay * 1000)
        return cls(delay, world_dim)

    def set_delay(self, delay_s: float) -> None:
        """Change the injected delay between steps (A/B validation of the meter)."""
        _STATE.delay = delay_s

    def begin_step(self) -> None:
        state = _STATE
        state.step = StepComm()
        state.armed = self.intercept

    def end_step(self, step_time: float) -> dict[str, float]:
        state = _STATE
        state.armed = False
        with state.lock:
            step, state.step = state.step, StepComm()
        return step.metrics(step_time)

    def close(self) -> None:
        if self.intercept:
            uninstall()
