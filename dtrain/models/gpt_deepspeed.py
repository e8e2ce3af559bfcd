"""DeepSpeed plans for the built-in GPT: AutoTP's partition specs, and the model as a layer sequence for
DeepSpeed's ``PipelineModule``. Plain functions of the model's structure; nothing here knows ranks.

AutoTP (``strategy=ds_tp``), Megatron's layout by parameter name: q/k/v and ``fc_in`` column-parallel,
``out_proj`` and ``fc_out`` row-parallel (their biases stay whole: they are added after the all-reduce).
Embeddings, norms and the head stay replicated, so a tied embedding stays one weight.

Pipeline (``strategy=ds_pp``): token embedding, positions (+ dropout), one layer per block, the final
norm, the head. With ``tie_embeddings`` the first and the last layer are one ``TiedLayerSpec``: the
stages holding them keep a copy each, DeepSpeed sums their gradients across those stages every step
and both apply the same update, so they stay one weight (Megatron's and DeepSpeed's way). DeepSpeed
builds only the layers of the rank's own stage; each layer materializes its GPT part from the model's
``init_tensor`` under the part's full-model name, so every strategy starts from the same weights.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from dtrain.models.gpt import GPT
from dtrain.parallel.materialize import materialize

_COLUMN = r".*\.(q_proj|k_proj|v_proj|fc_in)\.weight$"
_ROW = r".*\.(out_proj|fc_out)\.weight$"
AUTOTP_PARTITION: dict[str, Any] = {
    "use_default_specs": False,
    "layer_specs": [{"patterns": [_COLUMN], "partition_type": "column"},
                    {"patterns": [_ROW], "partition_type": "row"}],
}
PIPELINE_BLOCK = "PipeBlock"  # the layer type DeepSpeed balances stages by ("type:PipeBlock")


def autotp_shard_dim(name: str) -> int | None:
    """The dimension AutoTP splits parameter ``name`` along, or None when every rank holds it whole."""
    weight = name.rsplit(".", 1)[0] + ".weight"
    if re.match(_COLUMN, weight):
        return 0  # column-parallel: output rows, weight and bias alike
    if re.match(_ROW, name):
        return 1  # row-parallel weight: input columns (the bias is added after the all-reduce)
    return None


def autotp_problems(n_head: int, d_model: int, mlp_ratio: int, dropout: float, tp: int) -> list[str]:
    """Why AutoTP cannot split this GPT ``tp`` ways (one line each)."""
    problems = [f"strategy.tp={tp} does not divide {key}={value}; pick a tp degree that divides it"
                for key, value in (("model.n_head", n_head), ("model.d_model", d_model),
                                   ("model.d_model x model.mlp_ratio", d_model * mlp_ratio)) if value % tp]
    if dropout > 0 and tp > 1:
        problems.append(f"model.dropout={dropout} under strategy.tp={tp}: replicated activations would get "
                        "different dropout masks on each tensor-parallel rank; set model.dropout=0")
    return problems


class PipePart(nn.Module):
    """One pipeline layer: a materialized copy of a part of the meta GPT, ``prefix`` its full-model name."""

    def __init__(self, part: nn.Module, prefix: str, init_tensor: Callable, seed: int, device: torch.device):
        super().__init__()
        self.prefix, self._init = prefix, init_tensor
        self.inner = copy.deepcopy(part)
        materialize(self, device, seed)

    def init_tensor(self, name: str, shape: torch.Size, seed: int) -> torch.Tensor:
        return self._init(self.prefix + name.removeprefix("inner."), shape, seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class PipeBlock(PipePart):
    """A transformer block (its own type, so DeepSpeed can balance the stages by blocks)."""


class PipePositions(PipePart):
    """Adds the position embeddings to the token embeddings, then dropout."""

    def __init__(self, wpe: nn.Module, drop: nn.Module, init_tensor: Callable, seed: int, device: torch.device):
        super().__init__(wpe, "wpe.", init_tensor, seed, device)
        self.drop = copy.deepcopy(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x + self.inner(torch.arange(x.shape[1], device=x.device)))


def tied_head(embedding: PipePart, hidden: torch.Tensor) -> torch.Tensor:
    """The last stage's use of the tied token embedding: logits = hidden @ wte.weight^T."""
    return F.linear(hidden, embedding.inner.weight)


def pipeline_layers(model: GPT, seed: int, device: torch.device) -> list[Any]:
    """``model`` (meta) as DeepSpeed layer specs, for ``PipelineModule(layers, num_stages, ...)``."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    init = model.init_tensor
    if model.tie_embeddings:
        embedding = TiedLayerSpec("wte", PipePart, model.wte, "wte.", init, seed, device,
                                  tied_weight_attr="inner.weight")
        head = TiedLayerSpec("wte", PipePart, model.wte, "wte.", init, seed, device, forward_fn=tied_head,
                             tied_weight_attr="inner.weight")
    else:
        embedding = LayerSpec(PipePart, model.wte, "wte.", init, seed, device)
        head = LayerSpec(PipePart, model.lm_head, "lm_head.", init, seed, device)
    blocks = [LayerSpec(PipeBlock, block, f"blocks.{name}.", init, seed, device)
              for name, block in model.blocks.items()]
    return [embedding, LayerSpec(PipePositions, model.wpe, model.drop, init, seed, device), *blocks,
            LayerSpec(PipePart, model.ln_f, "ln_f.", init, seed, device), head]


def pipeline_parameters(pipe: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """This stage's parameters under their full-model names (a tied weight once, as ``wte.weight``)."""
    seen: set[int] = set()
    for part in pipe.modules():
        if isinstance(part, PipePart):
            for name, param in part.inner.named_parameters():
                if id(param) not in seen:
                    seen.add(id(param))
                    yield part.prefix + name, param
