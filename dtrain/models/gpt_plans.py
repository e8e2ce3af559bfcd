"""Parallel plans for the built-in GPT: tensor-parallel layouts and the pipeline split, by module name.

The model stays plain PyTorch; these functions act on its module tree before it is materialized.

Tensor parallel (Megatron layout on DTensor):
  - ``wte`` vocab-parallel (rows sharded), ``lm_head`` column-parallel with the same row sharding, so a
    tied embedding stays one shared ``Shard(0)`` parameter and the math is unchanged; the logits stay a
    vocabulary-sharded DTensor (the strategies compute the loss under ``loss_parallel``);
  - q/k/v and ``fc_in`` column-parallel, ``out_proj`` and ``fc_out`` row-parallel: one all-reduce (or a
    reduce-scatter under sequence parallelism) per attention and per MLP;
  - sequence parallelism: layer norms and the residual stream hold ``T/tp`` positions per rank; the
    attention and MLP inputs are all-gathered once per module, and in backward the module's summed input
    gradient is reduce-scattered once (not an all-reduce per projection). ``wpe`` stays replicated: the input
    embedding is all-reduced, added to the positions and then split (a local slice, no communication).

Pipeline split: a stage is a copy of the model with the blocks of other stages deleted and, off the
first stage, no embeddings; off the last stage, no final norm and head. Parameter names never change.
A tied model's last stage keeps the head's weight as its own copy of the embedding (initialized to the
same values: ``GPT.init_tensor``); ``dtrain/parallel/tied.py`` keeps the copies equal.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from dtrain.models.gpt import GPT


def tp_problems(n_head: int, d_model: int, mlp_ratio: int, vocab_size: int, seq_len: int, tp: int,
                sequence_parallel: bool, dropout: float) -> list[str]:
    """Why ``tp`` cannot split this model, one line each (empty when it can)."""
    if tp <= 1:
        return []
    problems = []
    for key, value in (("model.n_head", n_head), ("model.d_model", d_model),
                       ("model.d_model x model.mlp_ratio", d_model * mlp_ratio), ("model.vocab_size", vocab_size)):
        if value % tp:
            problems.append(f"strategy.tp={tp} does not divide {key}={value}; pick a tp degree that divides it")
    if sequence_parallel and seq_len % tp:
        problems.append(f"strategy.sequence_parallel=true splits the sequence, but data.seq_len={seq_len} is not "
                        f"divisible by strategy.tp={tp}; change seq_len or set strategy.sequence_parallel=false")
    if dropout > 0:
        problems.append(f"model.dropout={dropout} under strategy.tp={tp}: replicated activations would get "
                        "different dropout masks on each tensor-parallel rank; set model.dropout=0")
    return problems


class ReplicatedParams(ParallelStyle):
    """The module computes on replicated activations as before; only its parameters become ``Replicate``
    DTensors on the tensor-parallel mesh. Then every parameter of the model is a DTensor, which the
    optimizer's foreach kernels and FSDP2's 2-D sharding need (they refuse a mix of plain tensors and
    DTensors)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, device_mesh, None, input_fn=self._inputs, output_fn=self._outputs)

    @staticmethod
    def _inputs(module: nn.Module, inputs: tuple[Any, ...], mesh: DeviceMesh) -> tuple[Any, ...]:
        return tuple(DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
                     if isinstance(x, torch.Tensor) and not isinstance(x, DTensor) else x for x in inputs)

    @staticmethod
    def _outputs(module: nn.Module, output: Any, mesh: DeviceMesh) -> Any:
        return output.to_local() if isinstance(output, DTensor) else output


def apply_tp(model: GPT, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Shard ``model`` (full or one pipeline stage, on the meta device) over ``tp_mesh`` in place."""
    seq = Shard(1)
    hidden_layout = seq if sequence_parallel else Replicate()
    plan: dict[str, nn.Module] = {}
    if model.wte is not None:
        plan["wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
        plan["wpe"] = ReplicatedParams()
        if sequence_parallel:
            # split the summed embeddings along the sequence: a local slice of a replicated tensor
            plan["drop"] = PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=seq)
    if model.lm_head is not None:
        # logits stay sharded over the vocabulary (a DTensor): the loss runs under loss_parallel
        plan["lm_head"] = ColwiseParallel(input_layouts=hidden_layout, output_layouts=Shard(-1),
                                          use_local_output=False)
        plan["ln_f"] = SequenceParallel() if sequence_parallel else ReplicatedParams()
    parallelize_module(model, tp_mesh, plan)
    for block in model.blocks.values():
        block_plan = {
            "attn.q_proj": ColwiseParallel(),
            "attn.k_proj": ColwiseParallel(),
            "attn.v_proj": ColwiseParallel(),
            "attn.out_proj": RowwiseParallel(output_layouts=hidden_layout),
            "mlp.fc_in": ColwiseParallel(),
            "mlp.fc_out": RowwiseParallel(output_layouts=hidden_layout),
        }
        if not sequence_parallel:
            block_plan.update({"ln_1": ReplicatedParams(), "ln_2": ReplicatedParams()})
        else:
            block_plan.update({
                "ln_1": SequenceParallel(),
                "ln_2": SequenceParallel(),
                # one all-gather of the normed input per module, not one per projection; the gathered
                # input stays a DTensor so that backward sums the projections' input gradients (Partial)
                # and reduce-scatters them once per module (Megatron-SP), not one all-reduce per projection
                "attn": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
                "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, block_plan)
    # parallelize_module replaced wte.weight and lm_head.weight by two DTensors with the same Shard(0)
    # layout; make the head use the embedding's again
    model.tie_weights()


def stage_layer_counts(n_layer: int, n_stages: int, layers_per_stage: list[int] | None = None) -> list[int]:
    """Blocks per pipeline stage: the explicit split if given, else as even as possible (earlier stages
    get the extra block, because the last stage also runs the head and the loss)."""
    if layers_per_stage:
        return list(layers_per_stage)
    base, extra = divmod(n_layer, n_stages)
    return [base + (1 if stage < extra else 0) for stage in range(n_stages)]


def split_problems(n_layer: int, n_stages: int, layers_per_stage: list[int] | None) -> list[str]:
    if layers_per_stage:
        problems = []
        if len(layers_per_stage) != n_stages:
            problems.append(f"strategy.pp_layers_per_stage has {len(layers_per_stage)} entries but there are "
                            f"{n_stages} pipeline stages (pp x stages per rank); give one count per stage")
        if sum(layers_per_stage) != n_layer or min(layers_per_stage) < 1:
            problems.append(f"strategy.pp_layers_per_stage={list(layers_per_stage)} must be positive and sum to "
                            f"model.n_layer={n_layer}")
        return problems
    if n_stages > n_layer:
        return [f"{n_stages} pipeline stages (pp x stages per rank) but model.n_layer={n_layer}: every stage "
                f"needs at least one block; lower strategy.pp or strategy.pp_stages_per_rank, or add layers"]
    return []


def split_stage(model: GPT, stage: int, layer_counts: list[int]) -> GPT:
    """A copy of ``model`` (meta) that holds only pipeline stage ``stage``; names stay those of the full model."""
    first = sum(layer_counts[:stage])
    keep = {str(i) for i in range(first, first + layer_counts[stage])}
    part = copy.deepcopy(model)
    for name in list(part.blocks.keys()):
        if name not in keep:
            del part.blocks[name]
    if stage != 0:
        part.wte = None
        part.wpe = None
    if stage != len(layer_counts) - 1:
        part.ln_f = None
        part.lm_head = None
    return part


def tied_copies(parts: list[GPT]) -> list[nn.Parameter]:
    """A tied model's embedding weights among a rank's stages: the first stage's ``wte.weight`` and the last
    stage's ``lm_head.weight``, each once (empty when untied or when the rank holds neither stage). Every
    stage is its own copy of the model, so the two are distinct Parameters until :func:`share_tied_weight`."""
    if not parts or not getattr(parts[0], "tie_embeddings", False):
        return []
    found = [part.wte.weight for part in parts if part.wte is not None]
    found += [part.lm_head.weight for part in parts if part.lm_head is not None]
    return list({id(p): p for p in found}.values())


def share_tied_weight(parts: list[GPT]) -> None:
    """Where one rank holds both the first and the last stage of a tied model (V schedules), the head uses
    the embedding's Parameter, as in the whole model: one weight, and autograd sums both uses. Call it
    after the plans (and materialization). Not under FSDP2, which shards each stage's parameters on its
    own: the two copies stay (see dtrain/parallel/tied.py)."""
    first = next((part for part in parts if part.wte is not None), None)
    last = next((part for part in parts if part.lm_head is not None), None)
    if first is None or last is None or not first.tie_embeddings or isinstance(last, FSDPModule):
        return
    last.lm_head.weight = first.wte.weight


class _EmbeddingCopy(nn.Module):
    """``wte`` in the view of a rank whose only copy of a tied embedding is the head's weight."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight


def stages_view(parts: list[GPT]) -> nn.Module:
    """One module over the stages a rank holds, with the full model's parameter names (the same module
    objects, not copies): what the optimizer and the checkpoint see of a pipeline rank.

    A tied head's weight is also registered as ``wte.weight``, ahead of ``lm_head``, exactly as in the whole
    tied model: the optimizer names it ``wte.weight`` and the state dict holds both names, so a pipeline
    checkpoint has the layout of every other strategy's and loads into any of them."""
    view = nn.Module()
    blocks = {name: block for part in parts for name, block in part.blocks.items()}
    view.blocks = nn.ModuleDict({name: blocks[name] for name in sorted(blocks, key=int)})
    outer = {attr: next((getattr(part, attr) for part in parts if getattr(part, attr) is not None), None)
             for attr in ("wte", "wpe", "ln_f", "lm_head")}  # in this order: wte before lm_head
    if outer["wte"] is None and outer["lm_head"] is not None and parts[0].tie_embeddings:
        outer["wte"] = _EmbeddingCopy(outer["lm_head"].weight)
    for attr, module in outer.items():
        if module is not None:
            setattr(view, attr, module)
    return view
