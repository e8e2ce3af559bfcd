"""Per-rank memory: parameters, gradients, optimizer state and activations, estimated before training.

Parameters are counted from the rank's real shards (the optimizer's parameters after the plans ran, or
the same plans applied to a meta-device model by ``dtrain plan``); gradients and AdamW's two moments
follow from them. Activations are an arithmetic model of what autograd saves for backward in the
built-in GPT, per micro-batch (in elements, ``b`` sequences of ``s`` tokens, width ``h``, tp degree
``t``; SDPA's fused kernel keeps no ``s x s`` score matrix):

  - per block, no checkpointing: 12/t h (q, k, v, attention output, MLP hidden twice) plus the layer
    norm inputs and outputs: 4 h without sequence parallelism; with it 2/t h (inputs) + 2 h (outputs,
    all-gathered before the projections, which save them); plus small per-token statistics;
  - ``full`` checkpointing: the block input only, plus one block recomputed during backward;
  - ``selective``: the matmul and attention outputs, not the element-wise ones (estimate only: the
    selective cache is invisible to autograd's saved-tensor hooks, so it is not measured);
  - the head: final norm input and output, and the log-softmax over this rank's share of the vocabulary
    (the logits stay vocabulary-sharded under tensor parallelism: ``loss_parallel``);
  - micro-batches alive at once: 1 without pipelining (backward follows each forward), all of a round
    under GPipe, ``pp - r`` on pipeline rank ``r`` under 1F1B, the warm-up depth for the others
    (:func:`pipeline_in_flight`).

Transients (logits and their gradient, FSDP's gathered block parameters, communication buffers,
allocator caching) are not included; the test checks the saved activations against autograd's own
record and the parameter/gradient/optimizer bytes against the storages actually allocated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor

from dtrain.distributed.parallel_dims import ParallelDims

log = logging.getLogger(__name__)

ADAM_STATES = 2  # exp_avg and exp_avg_sq, each the size of the parameter shard


@dataclass(frozen=True)
class ActivationShape:
    micro_batch: int
    seq_len: int
    d_model: int
    n_head: int
    mlp_ratio: int
    vocab_size: int
    layers: int  # blocks this rank runs
    has_embedding: bool
    has_head: bool
    tp: int = 1
    sequence_parallel: bool = False
    checkpointing: str = "none"
    in_flight: float = 1.0  # micro-batches whose activations are alive at the same time
    element_bytes: int = 4


def _sharded_width(a: ActivationShape) -> float:
    """Per token, in units of h: q, k, v, the attention output, the MLP hidden before and after GELU."""
    return (4 + 2 * a.mlp_ratio) / a.tp


def _block_elements(a: ActivationShape) -> float:
    """Saved elements of one block without checkpointing, one micro-batch."""
    tokens, h, t = a.micro_batch * a.seq_len, a.d_model, a.tp
    sp = a.sequence_parallel and t > 1
    norms = (2 / t + 2) if sp else 4  # layer-norm inputs (sharded under SP) and gathered outputs
    stats = a.n_head / t + (4 / t if sp else 4)  # attention log-sum-exp, layer-norm mean and rstd
    return tokens * (h * (_sharded_width(a) + norms) + stats)


def activation_bytes(a: ActivationShape, include_recompute: bool = True) -> int:
    """Bytes autograd holds for backward on one rank at the peak of a step (see module docstring);
    ``include_recompute=False`` leaves out the block rebuilt during backward under full checkpointing
    (what is held at the end of forward)."""
    tokens, h, t = a.micro_batch * a.seq_len, a.d_model, a.tp
    sp = a.sequence_parallel and t > 1
    residual = h / t if sp else h  # the residual stream is sequence-sharded under SP
    recompute = 0.0
    if a.checkpointing == "full":
        per_micro = a.layers * tokens * residual
        if include_recompute and a.layers:
            recompute = _block_elements(a)  # one block rebuilt during backward
    elif a.checkpointing == "selective":
        # block input, q/k/v/attention/fc_in outputs, and the two row-parallel outputs (before reduction)
        per_micro = a.layers * tokens * (residual + (4 + a.mlp_ratio) / t * h + 2 * h)
    else:
        per_micro = a.layers * _block_elements(a)
    if a.has_head:
        # final norm input and gathered output, its statistics, the log-softmax over V / t
        per_micro += tokens * (residual + h + a.vocab_size / t + (2 / t if sp else 2))
    elements = per_micro * a.in_flight + recompute
    ids = tokens * 8 * a.in_flight if a.has_embedding else 0.0  # int64 token ids kept by the embedding
    return int(elements * a.element_bytes + ids)


@dataclass(frozen=True)
class RankMemory:
    params: int
    grads: int
    optimizer: int
    activations: int | None

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + (self.activations or 0)

    def line(self) -> str:
        act = gib(self.activations) if self.activations is not None else "n/a"
        return (f"params {gib(self.params)} | grads {gib(self.grads)} | optimizer {gib(self.optimizer)} | "
                f"activations {act} | total {gib(self.total)}")


def gib(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def local_numel_and_bytes(params: Iterable[torch.Tensor]) -> tuple[int, int]:
    """Elements and bytes of this rank's shards (a DTensor counts its local piece only)."""
    numel = nbytes = 0
    seen: set[int] = set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        local = p.to_local() if isinstance(p, DTensor) else p
        numel += local.numel()
        nbytes += local.numel() * local.element_size()
    return numel, nbytes


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def element_bytes(cfg: DictConfig) -> int:
    """Activation element size: FSDP mixed precision computes blocks in ``param_dtype``; autocast bf16
    keeps matmul outputs in bf16 but norms in fp32, counted here at the larger size to stay an upper
    estimate."""
    if cfg.strategy.get("param_dtype") in ("bf16", "fp16"):
        return 2
    return 4


def pipeline_in_flight(schedule: str, pp: int, per_rank: int, pp_rank: int, microbatches: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak, as a multiple of one
    micro-batch through all of the rank's stages: the depth of the schedule's warm-up."""
    if schedule == "GPipe":
        return microbatches  # every forward before any backward
    if schedule == "1F1B":
        return min(microbatches, pp - pp_rank)  # stage r starts backward after pp - r forwards
    if schedule == "LoopedBFS":
        return microbatches  # each local stage runs all its forwards first
    if schedule in ("ZBVZeroBubble", "DualPipeV"):
        return min(2 * microbatches, 2 * pp) / per_rank
    # Interleaved1F1B, InterleavedZeroBubble: (v-1) x pp + 2 x (pp-1-r) stage-forwards of warm-up
    units = min(microbatches * per_rank, (per_rank - 1) * pp + 2 * (pp - 1 - pp_rank) + 1)
    return units / per_rank


def activation_shape(cfg: DictConfig, dims: ParallelDims, rank: int) -> ActivationShape | None:
    """What this rank runs, from the config alone (None for models that do not declare their shape)."""
    from dtrain.models.gpt_plans import stage_layer_counts
    from dtrain.parallel.pipeline import canonical_schedule, stage_ids, stages_per_rank

    m, s, t = cfg.model, cfg.strategy, cfg.trainer
    if not {"n_layer", "d_model", "n_head", "vocab_size"} <= set(m.keys()):
        return None
    layers, has_embedding, has_head, in_flight = m.n_layer, True, True, 1
    if dims.pp > 1:
        schedule = canonical_schedule(s.pp_schedule)
        per_rank = stages_per_rank(schedule, s.pp_stages_per_rank)
        counts = stage_layer_counts(m.n_layer, dims.pp * per_rank, s.get("pp_layers_per_stage"))
        mine = stage_ids(dims.coordinates(rank)["pp"], dims.pp, per_rank, schedule)
        layers = sum(counts[i] for i in mine)
        has_embedding, has_head = 0 in mine, len(counts) - 1 in mine
        accumulation = t.global_batch_size // (t.micro_batch_size * dims.dp)
        per_round = accumulation if s.microbatches == -1 else s.microbatches
        in_flight = pipeline_in_flight(schedule, dims.pp, per_rank, dims.coordinates(rank)["pp"], per_round)
    return ActivationShape(micro_batch=t.micro_batch_size, seq_len=cfg.data.get("seq_len", m.get("seq_len")),
                           d_model=m.d_model, n_head=m.n_head, mlp_ratio=m.get("mlp_ratio", 4),
                           vocab_size=m.vocab_size, layers=layers, has_embedding=has_embedding, has_head=has_head,
                           tp=dims.tp, sequence_parallel=bool(s.get("sequence_parallel", False)),
                           checkpointing=s.get("activation_checkpointing", "none"), in_flight=in_flight,
                           element_bytes=element_bytes(cfg))


def estimate_rank_memory(cfg: DictConfig, dims: ParallelDims, rank: int, param_bytes: int,
                         stepped_bytes: int | None = None) -> RankMemory:
    """Parameters as given (a rank's real shards), gradients of the same size, AdamW's two moments of the
    ``stepped_bytes`` the optimizer holds (default: all of them)."""
    shape = activation_shape(cfg, dims, rank)
    stepped = param_bytes if stepped_bytes is None else stepped_bytes
    return RankMemory(params=param_bytes, grads=param_bytes, optimizer=ADAM_STATES * stepped,
                      activations=activation_bytes(shape) if shape is not None else None)


def device_memory_limit(device: torch.device, ranks_on_node: int) -> tuple[int, str]:
    """Bytes one rank may plan to use, and where the number comes from.

    GPU: the device's total memory minus a reserve (8%: the CUDA context, NCCL buffers and allocator
    fragmentation, none of which the estimate counts). CPU: the memory the kernel reports available
    (``MemAvailable``), shared by the ranks of this node."""
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        return int(total * 0.92), f"{gib(total)} on {device} minus an 8% reserve"
    available = _mem_available()
    return available // max(1, ranks_on_node), f"{gib(available)} available RAM / {ranks_on_node} ranks on this node"


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


# knobs that shrink a rank's share, named in the refusal
_FIT_KNOBS = ("a smaller trainer.micro_batch_size", "strategy.activation_checkpointing=full",
              "a sharded strategy (fsdp, fsdp_tp, pp_fsdp)", "more ranks", "a shorter data.seq_len")
NEAR_LIMIT = 0.85


def check_memory_fit(cfg: DictConfig, world_size: int, rank: int, optimizer: torch.optim.Optimizer,
                     device: torch.device, ranks_on_node: int) -> None:
    """Log the start-up estimate (rank 0, the rank that needs the most) and refuse, before the first step,
    a plan that cannot fit its device: every rank compares its own estimate with its own limit, and all
    refuse together. ``trainer.allow_memory_overcommit=true`` turns the refusal into a warning.
    Collective: every rank must call it.

    Counted from the optimizer's parameters: a parameter outside the optimizer (the second sharded copy
    of a tied embedding on a V schedule's rank 0 under FSDP2) is missing here; ``dtrain plan`` has it."""
    from dtrain.config.errors import ConfigError
    from dtrain.distributed import collectives
    from dtrain.strategies.layout import parallel_dims

    dims = parallel_dims(cfg.strategy.name, cfg.strategy, world_size)
    if dims is None:
        return
    _, nbytes = local_numel_and_bytes(optimizer_params(optimizer))
    estimate = estimate_rank_memory(cfg, dims, rank, nbytes)
    limit, source = device_memory_limit(device, ranks_on_node)
    reports = collectives.all_gather_object((estimate, limit, source))
    largest = max(range(len(reports)), key=lambda r: reports[r][0].total)
    log.info("memory estimate per rank (%s), largest on rank %d: %s", dims.describe(), largest,
             reports[largest][0].line())
    worst = max(range(len(reports)), key=lambda r: reports[r][0].total / max(1, reports[r][1]))
    need, cap, where = reports[worst][0].total, reports[worst][1], reports[worst][2]
    if need > cap:
        message = (f"rank {worst} would need about {gib(need)} ({reports[worst][0].line()}) but has {gib(cap)} "
                   f"({where}); to fit, try {', '.join(_FIT_KNOBS)}; or set trainer.allow_memory_overcommit=true "
                   "to start anyway")
        if not cfg.trainer.allow_memory_overcommit:
            raise ConfigError(message)
        if rank == 0:
            log.warning("%s (allowed by trainer.allow_memory_overcommit=true)", message.split("; to fit")[0])
    elif need > NEAR_LIMIT * cap and rank == 0:
        log.warning("rank %d is planned to use %s of its %s (%s): %.0f%%, and the estimate leaves out transients "
                    "(logits, gathered FSDP blocks, buffers); it may run out of memory", worst, gib(need), gib(cap),
                    where, 100 * need / cap)
