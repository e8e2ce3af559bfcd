"""Model + optimizer state in one torch.distributed.checkpoint layout shared by every native strategy.

Keys are the full model's parameter names whatever the sharding; tensors are DTensors where sharded.
The optimizer state is *flattened* to one entry per parameter (``state.<fqn>.exp_avg``,
``param_groups.<fqn>.lr``): a pipeline stage then saves and loads exactly the entries of the
parameters it holds, so a checkpoint written by any strategy at any world size loads into any other
(DCP reshards tensors on load). The nested form (param groups as lists of names) cannot do that:
each pipeline stage would write a different list under the same key.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def get_model_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    return {"model": model_state, "optim": optim_state}


def set_model_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=OPTIONS)


def missing_checkpoint_keys(wanted: dict[str, Any], saved_keys: Iterable[str]) -> list[str]:
    """Keys this strategy needs that a checkpoint lacks (flattened as DCP stores them: ``model.wte.weight``,
    ``optim.state.wte.weight.exp_avg``)."""
    saved = set(saved_keys)
    return sorted(key for key in _flat_keys(wanted) if key not in saved)


def checkpoint_mismatch(wanted: dict[str, Any], saved_keys: Iterable[str]) -> str | None:
    """One line explaining why a checkpoint cannot load into this strategy's model, or None if it can.

    The only layout differences DCP cannot reshard are different parameter sets: another model shape,
    or tied vs untied embeddings (a tied model has no separate head weight or head optimizer state)."""
    missing = missing_checkpoint_keys(wanted, saved_keys)
    if not missing:
        return None
    hint = ""
    if any("lm_head.weight" in key for key in missing):
        hint = ("; the checkpoint was probably saved with model.tie_embeddings=true (one embedding/head weight), "
                "this run unties them")
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return f"the checkpoint lacks {len(missing)} entries this model needs ({shown}){hint}"


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        keys: list[str] = []
        for key, value in node.items():
            keys += _flat_keys(value, f"{prefix}{key}.")
        return keys
    return [prefix.rstrip(".")]
