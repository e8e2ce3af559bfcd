"""A DeepSpeed engine's model and optimizer state in the checkpoint layout every strategy shares.

The layout is the one in ``state.py``: full parameter names, tensors as DTensors where sharded, the
optimizer flattened per parameter (``state.<fqn>.exp_avg``, ``state.<fqn>.step``,
``param_groups.<fqn>.lr``...). DeepSpeed keeps none of that: ZeRO holds flat fp32 partitions that cut
through parameters, AutoTP splits some matrices, a pipeline stage names its layers by index. So a save
walks the parameters one at a time: DeepSpeed's public helpers (``safe_get_full_fp32_param``,
``safe_get_full_optimizer_state``) assemble one parameter's fp32 master weight or one Adam moment over
the data-parallel group, and the rank keeps only its even dim-0 slice, as a DTensor ``Shard(0)`` over
the data-parallel ranks (FSDP2's layout; an AutoTP-split matrix is additionally ``Shard(dim)`` over the
tensor-parallel ranks). The existing checkpoint manager then saves and loads it unchanged, and DCP
reshards it for any other strategy and world size: no offline conversion, no DeepSpeed checkpoint.

Memory: a save never holds more than one full parameter (or moment) besides the slices it keeps, the
slices themselves being 1/dp of the fp32 model and of each moment (what a native sharded strategy's
state dict holds too). Loading is the reverse: each slice is all-gathered over the data-parallel ranks
one parameter at a time and written back with the ``safe_set_*`` helpers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from dtrain.parallel.deepspeed_private import fp32_partitions, link_optimizer_state
from dtrain.strategies.deepspeed_config import DeepSpeedLayout


@dataclass(frozen=True)
class Entry:
    fqn: str  # the full model's parameter name
    param: nn.Parameter  # the engine's parameter
    group: int  # its optimizer param group
    tp_dim: int | None = None  # the dimension AutoTP splits it along; None: whole on every tensor-parallel rank


def state_mesh(layout: DeepSpeedLayout, device_type: str) -> DeviceMesh:
    """The ranks that hold one slice of a parameter each (the data-parallel ranks of a stage), as the last
    mesh dimension ``dp``; ``tp`` before it for AutoTP. Built from DeepSpeed's rank order, not torch's."""
    world = layout.pp * layout.tp * layout.dp
    ranks = torch.arange(world)
    if layout.tp > 1:  # AutoTP's (data, tensor) grid, transposed so a tensor-parallel split comes first
        return DeviceMesh(device_type, ranks.view(layout.dp, layout.tp).T, mesh_dim_names=("tp", "dp"))
    if layout.pp > 1:
        return DeviceMesh(device_type, ranks.view(layout.pp, layout.dp), mesh_dim_names=("pp", "dp"))["dp"]
    return DeviceMesh(device_type, ranks, mesh_dim_names=("dp",))


def _slice(full: torch.Tensor, index: int, count: int) -> torch.Tensor:
    """Rank ``index``'s dim-0 piece of ``full`` cut ``count`` ways, as DTensor's ``Shard(0)`` cuts it."""
    chunks = torch.chunk(full, count, dim=0)
    if index < len(chunks):
        return chunks[index].clone()
    return full.new_empty((0, *full.shape[1:]))


class EngineState:
    """Reads and writes one engine's state in the shared layout. Every rank of a data-parallel group walks
    the same parameters in the same order (each step is a collective over that group)."""

    def __init__(self, entries: list[Entry], aliases: dict[str, str], buffers: dict[str, torch.Tensor],
                 optimizer: torch.optim.Optimizer, zero_optimizer: Any | None, stage: int, mesh: DeviceMesh,
                 tp_size: int):
        self.entries, self.aliases, self.buffers = entries, aliases, buffers
        self.optimizer, self.zero_optimizer, self.stage = optimizer, zero_optimizer, stage
        self.mesh, self.tp_size = mesh, tp_size
        self.dp_index = mesh.get_local_rank("dp")
        self.dp_size = mesh.size(mesh.mesh_dim_names.index("dp"))
        # what the base optimizer keeps per tensor, besides its step (AdamW: exp_avg, exp_avg_sq)
        self.moments = sorted(k for k, v in self.optimizer.state[self._state_tensors()[0]].items()
                              if k != "step" and torch.is_tensor(v) and v.dim() > 0)

    # -- the optimizer's own tensors -------------------------------------------------------------
    def _state_tensors(self) -> list[torch.Tensor]:
        """The tensors the base optimizer keys its state by: ZeRO's flat fp32 partitions, else the params."""
        if self.zero_optimizer is None:
            return [e.param for e in self.entries]
        return [flat for _, flat in fp32_partitions(self.zero_optimizer)]

    def _placements(self, entry: Entry, sharded: bool) -> tuple:
        dp = Shard(0) if sharded else Replicate()
        if "tp" not in self.mesh.mesh_dim_names:
            return (dp,)
        return (Replicate() if entry.tp_dim is None else Shard(entry.tp_dim), dp)

    def _global_shape(self, entry: Entry, local_full: torch.Tensor) -> torch.Size:
        shape = list(local_full.shape)
        if entry.tp_dim is not None:
            shape[entry.tp_dim] *= self.tp_size
        return torch.Size(shape)

    def _shard(self, entry: Entry, full: torch.Tensor) -> DTensor:
        """This rank's piece of ``full`` (the parameter as the data-parallel group holds it) as a DTensor."""
        sharded = full.dim() > 0
        local = _slice(full, self.dp_index, self.dp_size) if sharded else full.clone()
        shape = self._global_shape(entry, full)
        return DTensor.from_local(local, self.mesh, self._placements(entry, sharded), run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())

    def _unshard(self, entry: Entry, value: DTensor) -> torch.Tensor:
        """The parameter as the data-parallel group holds it, from this rank's piece (all-gathers over dp)."""
        return value.redistribute(self.mesh, self._placements(entry, sharded=False)).to_local()

    # -- full values of one parameter ---------------------------------------------------------------
    def _get(self, entry: Entry, key: str | None = None) -> torch.Tensor:
        if self.stage == 0:
            return entry.param.detach() if key is None else self.optimizer.state[entry.param][key]
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        if key is None:
            return safe_get_full_fp32_param(entry.param)
        return safe_get_full_optimizer_state(entry.param, key)

    def _set(self, entry: Entry, value: torch.Tensor, key: str | None = None) -> None:
        if self.stage == 0:
            target = entry.param.data if key is None else self.optimizer.state[entry.param][key]
            target.copy_(value)
            return
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if key is not None:
            safe_set_full_optimizer_state(entry.param, value, key)
            return
        safe_set_full_fp32_param(entry.param, value)  # the fp32 master partition
        self._set_model_weight(entry.param, value)  # and the weight forward uses

    def _set_model_weight(self, param: nn.Parameter, value: torch.Tensor) -> None:
        if self.stage < 3:  # stages 1-2 keep whole parameters on every rank
            param.data.copy_(value)
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            param.data.copy_(value)  # re-partitioned on exit

    def _step(self) -> torch.Tensor:
        return self.optimizer.state[self._state_tensors()[0]]["step"]

    # -- the layout -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        model: dict[str, Any] = {}
        optim: dict[str, Any] = {}
        step = self._step()
        for entry in self.entries:
            model[entry.fqn] = self._shard(entry, self._get(entry))
            for key in self.moments:
                optim[f"state.{entry.fqn}.{key}"] = self._shard(entry, self._get(entry, key))
            optim[f"state.{entry.fqn}.step"] = step.detach().clone()
            for key, value in self.optimizer.param_groups[entry.group].items():
                if key != "params":
                    optim[f"param_groups.{entry.fqn}.{key}"] = value
        for key, fqn in self.aliases.items():
            model[key] = model[fqn]
        model.update({name: buffer.detach().clone() for name, buffer in self.buffers.items()})
        return {"model": model, "optim": optim}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        model, optim = state["model"], state["optim"]
        for entry in self.entries:
            self._set(entry, self._unshard(entry, model[entry.fqn]))
            for key in self.moments:
                self._set(entry, self._unshard(entry, optim[f"state.{entry.fqn}.{key}"]), key)
            for key in self.optimizer.param_groups[entry.group]:
                if key != "params":
                    self.optimizer.param_groups[entry.group][key] = optim[f"param_groups.{entry.fqn}.{key}"]
        if self.entries:
            step = optim[f"state.{self.entries[0].fqn}.step"]
            for tensor in self._state_tensors():
                self.optimizer.state[tensor]["step"].copy_(step)
        for name, buffer in self.buffers.items():
            buffer.copy_(model[name])


def create_optimizer_state(optimizer: torch.optim.Optimizer, zero_optimizer: Any | None,
                           params: Iterable[nn.Parameter]) -> None:
    """Give the base optimizer its state now instead of at the first step (AdamW's is lazy), so that the
    checkpoint layout is complete from the start and a resume has state to write into. As torch's own
    ``get_state_dict`` does it: one step with zero gradients at lr 0, which changes no weight, then the
    step counters back to 0. ZeRO-3 empties its param groups between steps; they are filled for the call."""
    if zero_optimizer is None:
        tensors = [[p for p in group["params"]] for group in optimizer.param_groups]
    else:
        tensors = [[] for _ in optimizer.param_groups]
        for group, flat in fp32_partitions(zero_optimizer):
            tensors[group].append(flat)
    saved = [(group["params"], group["lr"]) for group in optimizer.param_groups]
    grads = {id(t): t.grad for ts in tensors for t in ts}
    for group, members in zip(optimizer.param_groups, tensors):
        group["params"], group["lr"] = members, 0.0
        for tensor in members:
            tensor.grad = torch.zeros_like(tensor)
    optimizer.step()
    for group, (members, lr), current in zip(optimizer.param_groups, saved, tensors):
        group["params"], group["lr"] = members, lr
        for tensor in current:
            tensor.grad = grads[id(tensor)]
    for values in optimizer.state.values():
        values["step"].zero_()
    if zero_optimizer is not None:
        link_optimizer_state(zero_optimizer)
