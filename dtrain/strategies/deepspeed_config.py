"""The DeepSpeed strategies' layout and the DeepSpeed config dtrain generates, checked before any process
group exists. Nothing here imports DeepSpeed: ``dtrain validate`` must work (and say what to install)
without it.

One config word picks the family, dtrain's own settings fill the DeepSpeed config, so a run's
hyperparameters mean the same under every strategy:

- batch: ``train_micro_batch_size_per_gpu`` = trainer.micro_batch_size, ``gradient_accumulation_steps`` =
  global / (micro x data-parallel size), ``train_batch_size`` = trainer.global_batch_size (left out for
  ``ds_tp``: AutoTP counts tensor-parallel peers as data-parallel ranks in one of its two batch checks and
  not in the other, so only micro x accumulation is consistent with both);
- ``gradient_clipping`` = trainer.grad_clip (0 disables clipping in both);
- precision: DeepSpeed's own fp16/bf16 modes stay off. trainer.precision=bf16 means what it means for
  every other strategy, autocast around the forward with fp32 weights and optimizer state, and dtrain
  applies it itself;
- optimizer and LR schedule: dtrain's own (optim.*), passed to DeepSpeed as a client optimizer (no
  ``optimizer``/``scheduler`` block), so there is no second implementation of AdamW or of the schedule, and
  DeepSpeed compiles no FusedAdam/CPUAdam op (~100 s / ~175 s on a 2-core CPU); with offload,
  ``zero_force_ds_cpu_optimizer: false`` lets the client AdamW run on the offloaded fp32 partitions;
- ``zero_optimization``: the stage and the offload devices from strategy.*; ``tensor_parallel`` for
  ``ds_tp``: ``autotp_size`` and the built-in GPT's partition specs.

``strategy.ds_config`` is merged over that (nested dicts key by key). A raw key that dtrain sets itself
must agree with it, or it is an error that names both: DeepSpeed would otherwise train with another
batch, precision, clipping or optimizer than the run's config says.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

DEEPSPEED_STRATEGIES: tuple[str, ...] = ("zero1", "zero2", "zero3", "ds_pp", "ds_tp")
INSTALL_HINT = "pip install 'dtrain[deepspeed]'"
OFFLOAD_DEVICES = ("none", "cpu")
PIPELINE_REFUSES_ZERO = ("{what}: DeepSpeed refuses ZeRO stage 2 and 3 with pipeline parallelism; use "
                         "strategy=ds_pp (ZeRO-1 across the data-parallel ranks of each stage) or the native "
                         "strategy=pp_fsdp (pipeline stages sharded with FSDP2)")
# the degree each name splits, besides data parallelism over the rest
_SPLIT = {"ds_pp": "pp", "ds_tp": "tp"}
# native-only knobs and the value that means "not used"
_NATIVE_KNOBS = {"activation_checkpointing": "none", "compile": False, "param_dtype": None, "reduce_dtype": None,
                 "pp_layers_per_stage": None, "pp_stages_per_rank": -1}
# DeepSpeed keys dtrain owns -> the setting they come from (a raw key under one must agree with it)
OWNED_KEYS: dict[str, str] = {
    "train_batch_size": "trainer.global_batch_size",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_size / (trainer.micro_batch_size x data-parallel size)",
    "gradient_clipping": "trainer.grad_clip",
    "zero_optimization.stage": "strategy.zero_stage",
    "zero_optimization.offload_optimizer.device": "strategy.offload_optimizer",
    "zero_optimization.offload_param.device": "strategy.offload_param",
    "tensor_parallel.autotp_size": "strategy.tp",
    "fp16": "trainer.precision",
    "bf16": "trainer.precision",
    "torch_autocast": "trainer.precision",
    "amp": "trainer.precision",
    "optimizer": "optim.* (dtrain passes its own AdamW)",
    "scheduler": "optim.* (dtrain's LR schedule drives the optimizer)",
    "zero_allow_untested_optimizer": "optim.* (dtrain passes its own AdamW)",
    "zero_force_ds_cpu_optimizer": "optim.* (dtrain passes its own AdamW)",
}


@dataclass(frozen=True)
class DeepSpeedLayout:
    """Degrees of a DeepSpeed run. Rank order is DeepSpeed's: pipeline stages outermost (its
    ``PipeDataParallelTopology``), tensor-parallel peers innermost (AutoTP's (data, tensor) mesh)."""

    pp: int = 1
    tp: int = 1
    dp: int = 1

    def dp_rank(self, rank: int) -> int:
        return (rank // self.tp) % self.dp

    def stage(self, rank: int) -> int:
        return rank // (self.dp * self.tp)


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def zero_stage(name: str, cfg: DictConfig) -> int:
    """The ZeRO stage a strategy runs: strategy.zero_stage, else the one its name implies."""
    if cfg.get("zero_stage") is not None:
        return int(cfg.zero_stage)
    return int(name[-1]) if name.startswith("zero") else 1


def resolve_layout(name: str, cfg: DictConfig, world_size: int) -> tuple[DeepSpeedLayout | None, list[str]]:
    """The degrees of ``name`` at ``world_size``, or why there are none (one line each)."""
    split = _SPLIT.get(name)
    problems = []
    for key in ("pp", "tp", "dp_replicate", "dp_shard"):
        if key == "pp" and name in ("zero2", "zero3") and cfg.pp != 1:
            problems.append(PIPELINE_REFUSES_ZERO.format(what=f"strategy={name} with strategy.pp={cfg.pp}"))
        elif key != split and cfg[key] != 1:
            hint = {"pp": "use strategy=ds_pp for pipeline stages", "tp": "use strategy=ds_tp for tensor parallelism"
                    }.get(key, "DeepSpeed's data parallelism spans every rank that tp or pp do not use")
            problems.append(f"strategy={name} does not use strategy.{key}={cfg[key]}; set it to 1 ({hint})")
    if problems or split is None:
        return (None, problems) if problems else (DeepSpeedLayout(dp=world_size), [])
    degree = int(cfg[split])
    if degree == -1:
        degree = world_size
    if degree < 1:
        return None, [f"strategy.{split}={cfg[split]} must be a positive integer or -1 (the whole world size)"]
    if world_size % degree:
        return None, [f"strategy={name}: world size {world_size} is not divisible by strategy.{split}={degree}; "
                      f"launch a multiple of {degree} ranks or change strategy.{split}"]
    return DeepSpeedLayout(**{split: degree, "dp": world_size // degree}), []


def config_problems(name: str, cfg: DictConfig, world_size: int) -> list[str]:
    """Everything wrong with ``cfg`` (the strategy node) that needs no model or batch, one line each."""
    if not deepspeed_installed():
        return [f"strategy={name} needs DeepSpeed, which is not installed; install it with: {INSTALL_HINT}"]
    problems = resolve_layout(name, cfg, world_size)[1]
    stage = zero_stage(name, cfg)
    if name.startswith("zero") and stage != int(name[-1]):
        problems.append(f"strategy={name} is ZeRO stage {name[-1]} but strategy.zero_stage={stage}; use "
                        f"strategy=zero{stage} (stage 0-3 under tensor parallelism: strategy=ds_tp)")
    elif not 0 <= stage <= 3:
        problems.append(f"strategy.zero_stage={stage} must be 0, 1, 2 or 3")
    elif name == "ds_pp" and stage > 1:
        problems.append(PIPELINE_REFUSES_ZERO.format(what=f"strategy=ds_pp with strategy.zero_stage={stage}"))
    elif name == "ds_pp" and stage == 0:
        problems.append("strategy=ds_pp runs ZeRO-1 across the data-parallel ranks of each stage; "
                        "strategy.zero_stage=0 is not offered (without ZeRO, DeepSpeed's pipeline engine clips "
                        "but reports no gradient norm)")
    for key, value in (("offload_optimizer", cfg.offload_optimizer), ("offload_param", cfg.offload_param)):
        if value not in OFFLOAD_DEVICES:
            problems.append(f"strategy.{key}={value} is not one of: {', '.join(OFFLOAD_DEVICES)}")
    if cfg.offload_optimizer != "none" and stage < 1:
        problems.append(f"strategy.offload_optimizer={cfg.offload_optimizer} needs ZeRO stage 1 or more, but "
                        f"strategy.zero_stage={stage}")
    if cfg.offload_param != "none" and stage != 3:
        problems.append(f"strategy.offload_param={cfg.offload_param} needs ZeRO stage 3 (parameters are only "
                        f"partitioned there), but this is stage {stage}; use strategy=zero3")
    if name == "ds_pp" and cfg.pp_schedule != "1F1B":
        problems.append(f"strategy=ds_pp runs DeepSpeed's own 1F1B schedule; strategy.pp_schedule="
                        f"{cfg.pp_schedule} is for the native strategy=pp")
    for key, unused in _NATIVE_KNOBS.items():
        value = cfg.get(key)
        if value != unused:
            problems.append(f"strategy.{key}={value} is a native-strategy setting that strategy={name} does "
                            f"not use; remove it (DeepSpeed's own keys go into strategy.ds_config)")
    if not isinstance(cfg.get("ds_config"), DictConfig):
        problems.append("strategy.ds_config must be a mapping of DeepSpeed config keys")
    return problems


def generate_config(name: str, strategy: DictConfig, global_batch: int, micro_batch: int, grad_clip: float,
                    layout: DeepSpeedLayout, autotp_partition: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed config dtrain's settings imply (see the module docstring)."""
    stage = zero_stage(name, strategy)
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero["offload_optimizer"] = {"device": strategy.offload_optimizer}
    if stage == 3:
        zero["offload_param"] = {"device": strategy.offload_param}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": global_batch // (micro_batch * layout.dp),
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero,
        "fp16": {"enabled": False},
        "bf16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": None,  # dtrain logs its own metrics
        "wall_clock_breakdown": False,
    }
    if name != "ds_tp":
        config["train_batch_size"] = global_batch
    else:
        config["tensor_parallel"] = {"autotp_size": layout.tp, "partition_config": autotp_partition or {}}
    return config


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_leaves(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): node}


def _owner(path: str) -> str | None:
    for key in OWNED_KEYS:
        if path == key or path.startswith(key + "."):
            return key
    return None


def _lookup(config: dict[str, Any], path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


_MISSING = object()


def conflicts(raw: dict[str, Any], generated: dict[str, Any], settings: dict[str, str]) -> list[str]:
    """Raw keys that contradict what dtrain generated; ``settings`` shows each owner's current value
    (e.g. ``{"trainer.global_batch_size": "trainer.global_batch_size=16"}``)."""
    problems = []
    for path, value in _leaves(raw).items():
        owner = _owner(path)
        if owner is None:
            continue
        wanted = _lookup(generated, path)
        if wanted is not _MISSING and wanted == value:
            continue
        source = OWNED_KEYS[owner]
        shown = settings.get(source, source)
        generated_text = "" if wanted is _MISSING else f", which dtrain sets to {wanted}"
        problems.append(f"strategy.ds_config.{path}={value} contradicts {shown}{generated_text}; remove it from "
                        f"strategy.ds_config and change {source.split(' ')[0]} instead")
    return problems


def merge(generated: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` over ``generated``, nested dicts key by key (neither is modified)."""
    out = dict(generated)
    for key, value in raw.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def raw_config(strategy: DictConfig) -> dict[str, Any]:
    value = strategy.get("ds_config")
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else {}


def build_config(name: str, strategy: DictConfig, global_batch: int, micro_batch: int, grad_clip: float,
                 precision: str, layout: DeepSpeedLayout) -> tuple[dict[str, Any], list[str]]:
    """The final DeepSpeed config (generated, then ``strategy.ds_config`` merged over it) and the raw keys
    that contradict it, one line each."""
    from dtrain.models.gpt_deepspeed import AUTOTP_PARTITION

    accumulation = global_batch // (micro_batch * layout.dp)
    generated = generate_config(name, strategy, global_batch, micro_batch, grad_clip, layout, AUTOTP_PARTITION)
    settings = {
        "trainer.global_batch_size": f"trainer.global_batch_size={global_batch}",
        "trainer.micro_batch_size": f"trainer.micro_batch_size={micro_batch}",
        OWNED_KEYS["gradient_accumulation_steps"]: f"the gradient accumulation global {global_batch} / (micro "
                                                   f"{micro_batch} x data-parallel {layout.dp}) = {accumulation}",
        "trainer.grad_clip": f"trainer.grad_clip={grad_clip}",
        "strategy.zero_stage": f"strategy={name} (ZeRO stage {zero_stage(name, strategy)})",
        "strategy.offload_optimizer": f"strategy.offload_optimizer={strategy.offload_optimizer}",
        "strategy.offload_param": f"strategy.offload_param={strategy.offload_param}",
        "strategy.tp": f"strategy.tp={layout.tp}",
        "trainer.precision": f"trainer.precision={precision} (autocast with fp32 weights; DeepSpeed's fp16/bf16 "
                             "modes stay off)",
    }
    raw = raw_config(strategy)
    return merge(generated, raw), conflicts(raw, generated, settings)
