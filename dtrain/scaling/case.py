"""The CASE a projection answers: a dense decoder-only transformer, its parallel layout, precision, hardware.

YAML or JSON with three blocks and two scalars (the format of issue 11, which checks rely on)::

    model: {layers: 24, hidden: 2304, heads: 24, kv_heads: 24, ffn_hidden: 9216, gated_mlp: false,
            vocab: 51200, seq_len: 2048}
    parallel: {gpus: 32, tp: 1, pp: 1, vpp: 1, cp: 1, micro_batch: 16, global_batch: 512, zero: 0,
               sequence_parallel: false, recompute: full, dp_overlap: true}
    precision: fp16
    hardware: a100_80gb        # a preset name or a block of hardware fields

``kv_heads`` defaults to ``heads``, ``ffn_hidden`` to 4 x hidden; ``model.attention`` (flash | unfused)
defaults to the hardware preset's stack; ``parallel.grad_dtype`` (what gradients are reduced in)
defaults to the precision, as in Megatron-LM (PyTorch autocast keeps FP32 gradients: set fp32).
``parallel.stage_layers`` (one count per pipeline stage, vpp 1) describes an uneven split: the largest
stage sets the pipeline's pace; by default the layers split evenly.
``dp = gpus / (tp x pp x cp)`` is derived. Every problem is
collected and reported at once, one line each, before any arithmetic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from dtrain.config.errors import ConfigError
from dtrain.scaling.hardware import Hardware, resolve

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
RECOMPUTE = ("none", "selective", "full")
ZERO_STAGES = (0, 1, 2, 3)
MODEL_KEYS = {"layers", "hidden", "heads", "kv_heads", "ffn_hidden", "gated_mlp", "vocab", "seq_len", "attention"}
PARALLEL_KEYS = {"gpus", "tp", "pp", "vpp", "cp", "micro_batch", "global_batch", "zero", "sequence_parallel",
                 "recompute", "dp_overlap", "grad_dtype", "stage_layers"}


@dataclass(frozen=True)
class Model:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn_hidden: int
    gated_mlp: bool
    vocab: int
    seq_len: int
    attention: str  # flash | unfused

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def params_per_layer(self) -> int:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        attention = h * (h + 2 * kv) + h * h  # q, k, v and the output projection
        mlp = h * self.ffn_hidden * (3 if self.gated_mlp else 2)
        return attention + mlp + 4 * h  # two norms (weights and biases)

    @property
    def params(self) -> int:
        """Weights: blocks, input embedding and an untied output head (Megatron's pipeline layout)."""
        return self.layers * self.params_per_layer + 2 * self.vocab * self.hidden + 2 * self.hidden


@dataclass(frozen=True)
class Parallel:
    gpus: int
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    micro_batch: int = 1
    global_batch: int = 1
    zero: int = 0
    sequence_parallel: bool = False
    recompute: str = "none"
    dp_overlap: bool = True
    grad_dtype: str = ""  # what gradients are reduced in: "" = the precision (Megatron); fp32 = PyTorch autocast
    stage_layers: tuple[int, ...] = ()  # an uneven pipeline split, one count per stage; () = even

    def largest_stage(self, layers: int) -> int:
        """Layers of the largest pipeline stage (per virtual stage with interleaving)."""
        return max(self.stage_layers) if self.stage_layers else layers // (self.pp * self.vpp)

    def stage_balance(self, layers: int) -> float:
        """The mean stage's layers over the largest's: 1 for an even split."""
        return layers / (self.pp * self.vpp) / self.largest_stage(layers)

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp * self.cp)

    @property
    def microbatches(self) -> int:
        """Micro-batches per pipeline (per data-parallel replica) in one step."""
        return self.global_batch // (self.micro_batch * self.dp)


@dataclass(frozen=True)
class Case:
    model: Model
    parallel: Parallel
    precision: str
    hardware: Hardware

    def with_gpus(self, gpus: int, keep_global_batch: bool = False) -> "Case":
        """The same model and layout on ``gpus`` GPUs: per-replica batch kept (weak scaling), or the
        global batch kept (strong scaling). Check the result with :func:`problems`."""
        p = self.parallel
        batch = p.global_batch
        if not keep_global_batch:
            batch = p.global_batch * gpus // p.gpus if (p.global_batch * gpus) % p.gpus == 0 else -1
        return replace(self, parallel=replace(p, gpus=gpus, global_batch=batch))


def _int(block: dict, key: str, where: str, problems: list[str], default: Any = None) -> Any:
    value = block.get(key, default)
    if value is None:
        problems.append(f"{where}.{key} is required")
    elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{where}.{key}={value!r} must be a positive integer")
    return value


def _bool(block: dict, key: str, where: str, problems: list[str], default: bool) -> bool:
    value = block.get(key, default)
    if not isinstance(value, bool):
        problems.append(f"{where}.{key}={value!r} must be true or false")
        return default
    return value


def parse(data: Any) -> Case:
    """A Case from a parsed CASE document; ConfigError with every problem otherwise."""
    if not isinstance(data, dict):
        raise ConfigError("a CASE is a mapping with model, parallel, precision and hardware")
    problems: list[str] = []
    unknown = sorted(set(data) - {"model", "parallel", "precision", "hardware", "name"})
    problems += [f"{k} is not a CASE field (model, parallel, precision, hardware)" for k in unknown]
    m, p = data.get("model"), data.get("parallel")
    if not isinstance(m, dict) or not isinstance(p, dict):
        raise ConfigError(problems + [f"CASE needs a 'model' block and a 'parallel' block (got {sorted(data)})"])
    problems += [f"model.{k} is not a model field ({', '.join(sorted(MODEL_KEYS))})"
                 for k in sorted(set(m) - MODEL_KEYS)]
    problems += [f"parallel.{k} is not a parallel field ({', '.join(sorted(PARALLEL_KEYS))})"
                 for k in sorted(set(p) - PARALLEL_KEYS)]
    hardware = None
    try:
        hardware = resolve(data.get("hardware", "a100_80gb"))
    except ConfigError as e:
        problems += e.problems
    precision = data.get("precision", "bf16")
    if precision not in PRECISIONS:
        problems.append(f"precision={precision!r} must be one of: {', '.join(PRECISIONS)}")
    heads = _int(m, "heads", "model", problems)
    hidden = _int(m, "hidden", "model", problems)
    attention = m.get("attention", hardware.attention if hardware else "flash")
    if attention not in ("flash", "unfused"):
        problems.append(f"model.attention={attention!r} must be flash or unfused")
    model_values = dict(layers=_int(m, "layers", "model", problems), hidden=hidden, heads=heads,
                        kv_heads=_int(m, "kv_heads", "model", problems, heads),
                        ffn_hidden=_int(m, "ffn_hidden", "model", problems,
                                        4 * hidden if isinstance(hidden, int) else None),
                        gated_mlp=_bool(m, "gated_mlp", "model", problems, False),
                        vocab=_int(m, "vocab", "model", problems), seq_len=_int(m, "seq_len", "model", problems),
                        attention=attention)
    recompute = p.get("recompute", "none")
    if recompute not in RECOMPUTE:
        problems.append(f"parallel.recompute={recompute!r} must be one of: {', '.join(RECOMPUTE)}")
    grad_dtype = p.get("grad_dtype", "")
    if grad_dtype not in ("", "fp32", "bf16", "fp16"):
        problems.append(f"parallel.grad_dtype={grad_dtype!r} must be fp32, bf16 or fp16 (default: the precision)")
    zero = p.get("zero", 0)
    if zero not in ZERO_STAGES:
        problems.append(f"parallel.zero={zero!r} must be one of 0, 1, 2, 3 (3 = FSDP full sharding)")
    parallel_values = dict(gpus=_int(p, "gpus", "parallel", problems), tp=_int(p, "tp", "parallel", problems, 1),
                           pp=_int(p, "pp", "parallel", problems, 1), vpp=_int(p, "vpp", "parallel", problems, 1),
                           cp=_int(p, "cp", "parallel", problems, 1),
                           micro_batch=_int(p, "micro_batch", "parallel", problems, 1),
                           global_batch=_int(p, "global_batch", "parallel", problems), zero=zero,
                           sequence_parallel=_bool(p, "sequence_parallel", "parallel", problems, False),
                           recompute=recompute, dp_overlap=_bool(p, "dp_overlap", "parallel", problems, True),
                           grad_dtype=grad_dtype, stage_layers=p.get("stage_layers") or ())
    stage_layers = parallel_values["stage_layers"]
    if not isinstance(stage_layers, (list, tuple)) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in stage_layers):
        problems.append(f"parallel.stage_layers={stage_layers!r} must be a list of positive layer counts, "
                        f"one per stage")
    else:
        parallel_values["stage_layers"] = tuple(stage_layers)
    if problems:
        raise ConfigError(problems)
    case = Case(Model(**model_values), Parallel(**parallel_values), precision, hardware)
    layout = problems_of(case)
    if layout:
        raise ConfigError(layout)
    return case


def problems_of(case: Case) -> list[str]:
    """Layout problems: degrees that do not divide, heads or layers that do not split, batches that do not divide."""
    m, p = case.model, case.parallel
    problems = []
    if m.hidden % m.heads:
        problems.append(f"model.hidden={m.hidden} is not divisible by model.heads={m.heads}")
    if m.heads % m.kv_heads:
        problems.append(f"model.heads={m.heads} is not divisible by model.kv_heads={m.kv_heads}")
    model_parallel = p.tp * p.pp * p.cp
    if p.gpus % model_parallel:
        problems.append(f"parallel.gpus={p.gpus} is not divisible by tp x pp x cp = {p.tp} x {p.pp} x {p.cp} = "
                        f"{model_parallel}")
        return problems
    if m.heads % p.tp:
        problems.append(f"model.heads={m.heads} is not divisible by parallel.tp={p.tp}")
    if m.kv_heads != m.heads and m.kv_heads % p.tp and p.tp % m.kv_heads:
        problems.append(f"model.kv_heads={m.kv_heads} and parallel.tp={p.tp}: neither divides the other")
    if m.ffn_hidden % p.tp:
        problems.append(f"model.ffn_hidden={m.ffn_hidden} is not divisible by parallel.tp={p.tp}")
    stages = p.pp * p.vpp
    if p.stage_layers:
        if p.vpp != 1 or len(p.stage_layers) != p.pp or sum(p.stage_layers) != m.layers:
            problems.append(f"parallel.stage_layers={list(p.stage_layers)} must give one count per pipeline stage "
                            f"(pp={p.pp}, vpp 1) summing to model.layers={m.layers}")
    elif m.layers % stages:
        problems.append(f"model.layers={m.layers} does not split into pp x vpp = {p.pp} x {p.vpp} = {stages} "
                        f"equal stages")
    if p.vpp > 1 and p.pp == 1:
        problems.append(f"parallel.vpp={p.vpp} interleaves pipeline stages, but parallel.pp=1")
    if m.seq_len % p.cp or (p.cp > 1 and (m.seq_len // p.cp) % 2):
        problems.append(f"model.seq_len={m.seq_len} does not split into 2 x cp = {2 * p.cp} equal chunks "
                        f"(context parallelism balances causal attention with two chunks per rank)")
    if p.sequence_parallel and p.tp > 1 and m.seq_len // p.cp % p.tp:
        problems.append(f"parallel.sequence_parallel splits the sequence of {m.seq_len // p.cp} tokens over "
                        f"tp={p.tp}, which does not divide it")
    if p.global_batch < 1:
        problems.append(f"the global batch does not scale to {p.gpus} GPUs with dp={p.dp}")
    elif p.global_batch % (p.micro_batch * p.dp):
        problems.append(f"parallel.global_batch={p.global_batch} is not divisible by micro_batch x dp = "
                        f"{p.micro_batch} x {p.dp} = {p.micro_batch * p.dp}")
    if case.precision == "fp8" and case.hardware.peak_tflops_fp8 is None:
        problems.append(f"precision=fp8 but hardware {case.hardware.name} has no FP8 peak (peak_tflops_fp8)")
    return problems


def read_document(path: str | Path, what: str) -> Any:
    """A YAML or JSON file's content; a missing or unreadable file is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        text = path.read_text()
        return json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read {what} {path}: {str(e).splitlines()[0]}") from None


def load(path: str | Path) -> Case:
    """Read a CASE file (YAML or JSON)."""
    return parse(read_document(path, "CASE file"))
