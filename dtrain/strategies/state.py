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
    """Not read-only: on an optimizer that has not stepped yet, torch's get_state_dict creates its state
    with a zero-gradient step (its step counters are set back to 0 below, the moments stay zero). Call it
    on every rank or on none, and only when the state is really needed (a save, or a resume that found a
    step)."""
    fresh = not optimizer.state
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    if fresh:
        # torch creates missing optimizer state by one step with zero gradients at lr 0, which counts as a
        # step: AdamW's bias correction would then treat the first real step as its second. The trainer
        # asks for a template before every run, resumed or not, so set the counters back.
        for values in optimizer.state.values():
            if torch.is_tensor(values.get("step")):
                values["step"].zero_()
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
    """One line explaining why a checkpoint cannot load into this strategy's state, or None if it can:
    DCP reshards any layout of the same parameters, but cannot invent parameters the checkpoint lacks
    (another depth or width). Pass ``dcp.FileSystemReader(path).read_metadata().state_dict_metadata``'s
    keys. Run it on every rank: a pipeline rank only needs its own stages' entries."""
    missing = missing_checkpoint_keys(wanted, saved_keys)
    if not missing:
        return None
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (f"the checkpoint lacks {len(missing)} entries this run needs ({shown}): it was written for a "
            "different model; resume with the model config it was saved with")


# model settings that may change on resume: they do not change which parameters exist or what they mean
_RESUMABLE_MODEL_CHANGES = ("dropout",)


def model_change_problems(saved_model: Any, model: Any) -> list[str]:
    """Why a checkpoint of model config ``saved_model`` cannot resume ``model`` (both ``cfg.model``).

    Strategies and world sizes may change freely; the model may not. Some changes would even load
    without an error and be wrong: an untied checkpoint loaded into a tied model writes the embedding
    and the head into one shared weight, and only one of them survives. So any architecture change is
    refused before training."""
    keys = sorted(set(saved_model.keys()) | set(model.keys()))
    changed = [f"model.{k}={saved_model.get(k)} (now {model.get(k)})" for k in keys
               if k not in _RESUMABLE_MODEL_CHANGES and saved_model.get(k) != model.get(k)]
    if not changed:
        return []
    return [f"the checkpoint was written for another model: {', '.join(changed)}; a checkpoint resumes under "
            "any strategy and world size, but only with the model settings it was saved with"]


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        keys: list[str] = []
        for key, value in node.items():
            keys += _flat_keys(value, f"{prefix}{key}.")
        return keys
    return [prefix.rstrip(".")]
