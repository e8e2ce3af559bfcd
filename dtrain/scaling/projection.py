"""One training step of a dense decoder-only transformer on a GPU cluster, from first principles.

Pure arithmetic on a :class:`~dtrain.scaling.case.Case` (no torch). The step is built bottom-up:

1. **Kernels.** One layer's forward on one GPU is a list of kernels (GEMMs, attention, element-wise
   ops), each with its FLOPs and HBM bytes at the layer's real shapes (tokens ``T = b s / cp``, matrices
   split ``1/tp``, element-wise work outside the tensor-parallel region split ``1/tp`` only with sequence
   parallelism). A kernel takes ``max(FLOPs / (peak x matmul_efficiency), bytes / (HBM x
   memory_efficiency), kernel_overhead)``: a roofline, so small or thin GEMMs fall to the memory bound
   and tiny kernels to the launch floor. Backward runs two GEMMs per forward GEMM (input and weight
   gradients), 2.5x FlashAttention's forward FLOPs, and 1.5x an element-wise op's bytes (reads the
   saved input and the incoming gradient, writes one gradient). Recomputation replays the forward of
   every layer (``full``) or of attention's core (``selective``).
   ``attention: unfused`` is the Megatron-LM 2021-22 layer: Q K^T and softmax(.) V as batched GEMMs, a
   fused scale-mask-softmax kernel, attention dropout and dropout masks in the bias-dropout-add
   kernels; ``flash`` is FlashAttention-2 (causal: half the score FLOPs run) without dropout.
2. **Collectives.** Ring costs ``(n-1)/n x bytes / bandwidth`` per all-gather or reduce-scatter (twice
   that for an all-reduce) plus a latency per step, over the links the group actually uses. Ranks are
   laid out tp innermost, then cp, dp, pp (Megatron's and dtrain's order). A group with ``k`` members per
   node that spans nodes runs ``k`` rings, one per NIC (rail-optimized): its bus bandwidth is
   ``min(NVLink, k x NIC)``; inside a node it is NVLink. Latency: ring steps inside the node plus a tree
   across nodes (``latency_steps: log2``: one step per doubling inside the node, gloo on a host), times a
   per-kind factor for all-gathers and reduce-scatters (1 on NCCL; measured on gloo).
3. **Overlap.** Tensor-parallel collectives sit on the critical path (2 all-reduces forward, 2
   backward, 2 more in a full recompute; with sequence parallelism each becomes an all-gather plus a
   reduce-scatter of the same total bytes). Data-parallel gradient reduction overlaps the last
   micro-batch's backward when ``dp_overlap`` (DDP buckets; the last bucket never hides), else follows
   it. ZeRO-1/2 gather parameters after the optimizer (overlapped with the next forward when
   ``dp_overlap``); ZeRO-2 reduce-scatters every micro-batch. ZeRO-3/FSDP gathers each layer's
   parameters in forward and again in backward, prefetched one layer ahead (only what a layer's compute
   cannot cover is exposed), and reduce-scatters gradients on the last micro-batch. Context parallelism
   exchanges K/V chunks in a ring that overlaps attention. On hardware whose communication shares the
   compute cores (``async_device: false``, a CPU), nothing hides: there the kernels' dispatch overhead
   adds to their run time instead of bounding it from below, and communication slows with the cores
   it shares when there are more ranks than cores.
4. **Pipeline.** 1F1B runs ``m + (p-1)/v`` micro-batch slots of the slowest stage (the last one also
   computes the logits and the loss): the bubble is ``(p-1)/v`` slots. Stage-to-stage sends (one
   activation forward, one gradient backward per micro-batch and virtual stage, each ``1/tp`` of it per
   GPU) are on the critical path.
5. **Optimizer.** AdamW with FP32 master weights streams ~40 bytes per local parameter (master, two
   moments, gradient, the 16-bit copy, norm and clipping): memory-bound.
6. **Stragglers.** Every rank's compute varies from step to step (``step_jitter_cv``, its coefficient of
   variation); a synchronous step ends with its slowest rank: ``E[max of n normals] x cv`` of the
   compute on top (counted in ``compute``; 0 on the GPU presets, measured on a CPU).

Reported FLOPs follow the papers: model FLOPs count forward + backward of every matmul, attention
scores over the full ``s x s`` (Megatron, PaLM); hardware FLOPs add what recomputation replays.
Memory per GPU: 16 bytes per parameter (16-bit weights and gradients, FP32 master and two moments;
ZeRO paper), sharded by the ZeRO stage, plus activations (Korthikanti et al. 2022, eq. 1-5: 34 s b h +
5 a s^2 b bytes per layer without recomputation, 2 s b h with full recomputation, attention's s^2 terms
gone with selective recomputation or FlashAttention), for the micro-batches a pipeline stage keeps in
flight (``min(m, p)`` on the first stage, more with interleaving).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dtrain.scaling.case import Case, Model, Parallel
from dtrain.scaling.hardware import Hardware

OPTIMIZER_BYTES_PER_PARAM = 40  # AdamW + FP32 master + grad norm/clip, per local parameter and step
FLASH_BACKWARD_FLOPS = 2.5  # FlashAttention-2 backward recomputes the scores: 5 matmuls to forward's 2
ELEMENTWISE_BACKWARD_BYTES = 1.5  # reads input and gradient, writes a gradient: 3 tensors to forward's 2


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float = 0.0
    bytes: float = 0.0
    launches: int = 1


def _gemm(name: str, m: float, k: float, n: float, element: int, batch: float = 1.0) -> Kernel:
    return Kernel(name, 2.0 * m * k * n * batch, element * (m * k + k * n + m * n) * batch)


def _elementwise(name: str, nbytes: float) -> Kernel:
    return Kernel(name, 0.0, nbytes)


class Timer:
    """Kernel and collective times on one preset."""

    def __init__(self, hw: Hardware, precision: str, ranks_per_node: int):
        self.hw, self.precision = hw, precision
        slots = hw.compute_slots_per_node or hw.gpus_per_node
        # more ranks than a node can run at full speed (CPU cores) share them; ranks that compute at the
        # same time also share caches and memory bandwidth (corun_slowdown: all slots busy; linear between)
        busy = min(ranks_per_node, slots)  # may be fractional: ranks busy on average
        corun = 1.0 + (hw.corun_slowdown - 1.0) * ((busy - 1) / (slots - 1) if slots > 1 else 0.0)
        self.compute_slowdown = corun * max(1.0, ranks_per_node / slots)
        self.slowdown = max(1.0, ranks_per_node / slots)

    def kernel(self, k: Kernel) -> float:
        hw = self.hw
        efficiency = hw.flash_attention_efficiency if k.name.startswith("flash_attention") else hw.matmul_efficiency
        compute = k.flops / (hw.peak_flops(self.precision) * efficiency)
        memory = k.bytes / (hw.hbm_gbps * 1e9 * hw.memory_efficiency)
        overhead = k.launches * hw.kernel_overhead_us * 1e-6
        if not hw.async_device:  # the host dispatches, then runs the kernel
            return (max(compute, memory) + overhead) * self.compute_slowdown
        return max(compute, memory, overhead) * self.compute_slowdown

    def kernels(self, ks: list[Kernel]) -> float:
        return sum(self.kernel(k) for k in ks)

    def collective(self, kind: str, nbytes: float, size: int, stride: int) -> float:
        """Seconds of one collective over a group of ``size`` ranks spaced ``stride`` apart (ring
        bandwidth term, latency per ring step in the node plus a tree across nodes)."""
        if size <= 1 or nbytes <= 0:
            return 0.0
        hw = self.hw
        per_node = max(1, min(size, hw.gpus_per_node // stride)) if stride < hw.gpus_per_node else 1
        nodes = math.ceil(size / per_node)
        nvlink = hw.nvlink_gbps_per_gpu * 1e9 * hw.nvlink_efficiency
        bandwidth = nvlink if nodes == 1 else min(nvlink, per_node * hw.nic_gbps_per_gpu * 1e9 * hw.nic_efficiency)
        share = {"all_reduce": 2.0, "all_gather": 1.0, "reduce_scatter": 1.0, "send": None}[kind]
        # gloo's all-gather and reduce-scatter against its all-reduce (1, 1 on NCCL): bandwidth, latency
        efficiency, latency_factor = {
            "all_gather": (hw.all_gather_efficiency, hw.all_gather_latency_factor),
            "reduce_scatter": (hw.reduce_scatter_efficiency, hw.reduce_scatter_latency_factor)}.get(kind, (1.0, 1.0))
        bandwidth *= efficiency
        # steps inside the node: NCCL's rings, one per rank; gloo's algorithms on a host, one per doubling
        in_node = math.ceil(math.log2(per_node)) if hw.latency_steps == "log2" else per_node - 1
        if kind == "all_reduce":  # NCCL: ring steps in the node, a tree (up and down) across nodes
            latency = 2 * in_node * hw.nvlink_latency_us + 2 * math.ceil(math.log2(nodes)) * hw.nic_latency_us
        else:  # all-gather and reduce-scatter are rings: one step per rank
            latency = in_node * hw.nvlink_latency_us + (nodes - 1) * hw.nic_latency_us
        latency *= latency_factor * 1e-6
        shared = 1.0 if hw.async_device else self.slowdown  # gloo's threads share oversubscribed cores
        if share is None:  # point to point
            return (nbytes / bandwidth + (hw.nic_latency_us if nodes > 1 else hw.nvlink_latency_us) * 1e-6) * shared
        return (share * (size - 1) / size * nbytes / bandwidth + latency) * shared


@dataclass
class Layer:
    """Seconds per micro-batch of one transformer layer on one GPU."""

    forward: float
    backward: float
    recompute: float
    tp_comm: float
    cp_comm: float
    attention_core: float  # forward, for context-parallel overlap


def _bytes_per_element(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def layer_kernels(model: Model, par: Parallel, precision: str) -> tuple[list[Kernel], list[Kernel], list[Kernel]]:
    """Forward kernels, backward kernels and attention-core kernels (what selective recomputation replays)
    of one layer for one micro-batch on one GPU."""
    e = _bytes_per_element(precision)
    t, c = par.tp, par.cp
    b, s, h, f, d = par.micro_batch, model.seq_len, model.hidden, model.ffn_hidden, model.head_dim
    tokens = b * s / c
    outside = tokens / t if par.sequence_parallel else tokens  # tokens of element-wise work per GPU
    heads = model.heads / t
    kv = model.kv_heads * d
    unfused = model.attention == "unfused"
    mask = 1 if unfused else 0  # dropout masks (1 byte per element) in the Megatron stack
    gate = 2 if model.gated_mlp else 1
    norm = _elementwise("layernorm", 2 * e * h * outside)
    residual = _elementwise("bias_dropout_add", (3 * e + mask) * h * outside)
    if unfused:
        scores = b * heads * (s / c) * s
        core = [_gemm("q_kT", s / c, d, s, e, b * heads), _elementwise("softmax", 2 * e * scores),
                _elementwise("attention_dropout", (2 * e + 1) * scores), _gemm("attn_v", s / c, s, d, e, b * heads)]
    else:  # causal FlashAttention: half of the s x s scores are computed
        flops = 4.0 * b * heads * (s / c) * s * d * 0.5
        core = [Kernel("flash_attention", flops, e * tokens * (2 * h + 2 * kv) / t)]
    forward = [norm, _gemm("qkv", tokens, h, (h + 2 * kv) / t, e), *core, _gemm("out_proj", tokens, h / t, h, e),
               residual, norm, _gemm("mlp_in", tokens, h, gate * f / t, e),
               _elementwise("activation", (gate + 1) * e * f / t * tokens), _gemm("mlp_out", tokens, f / t, h, e),
               residual]
    backward = []
    for k in forward:
        if k.name == "flash_attention":
            backward.append(Kernel(k.name + "_backward", FLASH_BACKWARD_FLOPS * k.flops, 2 * k.bytes))
        elif k.flops:  # a GEMM: input gradient and weight gradient
            backward += [Kernel(k.name + "_dgrad", k.flops, k.bytes), Kernel(k.name + "_wgrad", k.flops, k.bytes)]
        else:
            backward.append(Kernel(k.name + "_backward", 0.0, ELEMENTWISE_BACKWARD_BYTES * k.bytes))
    return forward, backward, core


def layer_time(case: Case, timer: Timer) -> Layer:
    model, par = case.model, case.parallel
    forward, backward, core = layer_kernels(model, par, case.precision)
    fwd, bwd, core_time = timer.kernels(forward), timer.kernels(backward), timer.kernels(core)
    recompute = {"none": 0.0, "selective": core_time, "full": fwd}[par.recompute]
    e = _bytes_per_element(case.precision)
    activation = par.micro_batch * model.seq_len / par.cp * model.hidden * e  # one layer's output, whole
    per_ar = timer.collective("all_reduce", activation, par.tp, 1)
    if par.sequence_parallel:
        per_ar = (timer.collective("all_gather", activation, par.tp, 1)
                  + timer.collective("reduce_scatter", activation, par.tp, 1))
    # 2 forward, 2 backward, 2 more to replay a full recompute; sequence parallelism also re-gathers the
    # norm outputs in backward for the weight gradients (2 all-gathers = 1 all-reduce's bytes)
    passes = 4 + (2 if par.recompute == "full" else 0) + (1 if par.sequence_parallel and par.tp > 1 else 0)
    cp_comm = 0.0
    if par.cp > 1:  # ring attention: K and V chunks around the ring forward; K, V, dK, dV backward
        kv_chunk = 2 * par.micro_batch * model.seq_len / par.cp * model.kv_heads * model.head_dim / par.tp * e
        ring = (par.cp - 1) * timer.collective("send", kv_chunk, par.cp, par.tp)
        exposed = max(0.0, ring - core_time) + max(0.0, 2 * ring - FLASH_BACKWARD_FLOPS * core_time)
        cp_comm = exposed if case.hardware.async_device else 3 * ring
    return Layer(fwd, bwd, recompute, passes * per_ar, cp_comm, core_time)


def _head_kernels(model: Model, par: Parallel, precision: str) -> tuple[list[Kernel], list[Kernel]]:
    """Final norm, logits and the cross-entropy over this rank's vocabulary shard (last stage)."""
    e = _bytes_per_element(precision)
    tokens = par.micro_batch * model.seq_len / par.cp
    outside = tokens / par.tp if par.sequence_parallel else tokens
    logits = _gemm("logits", tokens, model.hidden, model.vocab / par.tp, e)
    forward = [_elementwise("final_norm", 2 * e * model.hidden * outside), logits,
               _elementwise("cross_entropy", (e + 4) * model.vocab / par.tp * tokens)]
    backward = [_elementwise("final_norm_backward", 3 * e * model.hidden * outside),
                Kernel("logits_dgrad", logits.flops, logits.bytes), Kernel("logits_wgrad", logits.flops, logits.bytes),
                _elementwise("cross_entropy_backward", (4 + e) * model.vocab / par.tp * tokens)]
    return forward, backward


def _embedding_kernels(model: Model, par: Parallel, precision: str) -> list[Kernel]:
    e = _bytes_per_element(precision)
    tokens = par.micro_batch * model.seq_len / par.cp
    return [_elementwise("embedding", 2 * e * model.hidden * tokens),
            _elementwise("embedding_backward", 3 * e * model.hidden * tokens)]


def model_flops_per_token(model: Model) -> float:
    """Training FLOPs per token, forward + backward of every matmul, attention over the full s x s."""
    h, kv = model.hidden, model.kv_heads * model.head_dim
    per_layer = 2 * h * (h + 2 * kv) + 2 * h * h + 2 * h * model.ffn_hidden * (3 if model.gated_mlp else 2)
    attention = 4 * model.seq_len * h
    return 3.0 * (model.layers * (per_layer + attention) + 2 * h * model.vocab)


def recompute_flops_per_token(model: Model, recompute: str) -> float:
    h, kv = model.hidden, model.kv_heads * model.head_dim
    attention = 4 * model.seq_len * h
    if recompute == "full":
        per_layer = 2 * h * (h + 2 * kv) + 2 * h * h + 2 * h * model.ffn_hidden * (3 if model.gated_mlp else 2)
        return model.layers * (per_layer + attention)
    return model.layers * attention if recompute == "selective" else 0.0


@dataclass
class Memory:
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def stage_params(model: Model, par: Parallel) -> tuple[float, float]:
    """Parameters on one GPU of the first and of the last pipeline stage (tensor-parallel shard)."""
    layers = par.largest_stage(model.layers) * par.vpp * model.params_per_layer / par.tp
    embedding = model.vocab * model.hidden / par.tp
    if par.pp == 1:  # one stage holds the (tied) embedding and the head
        return layers + embedding, layers + embedding
    return layers + embedding, layers + embedding + model.hidden * 2


def activation_bytes_per_token_layer(model: Model, par: Parallel, precision: str) -> float:
    """Bytes one layer keeps for backward per token of a micro-batch on one GPU (Korthikanti eq. 2-5)."""
    e = _bytes_per_element(precision)
    t, h, f, d = par.tp, model.hidden, model.ffn_hidden, model.head_dim
    kv = model.kv_heads * d
    split = t if par.sequence_parallel else 1
    if par.recompute == "full":
        return e * h / split
    unfused = model.attention == "unfused"
    gate = 2 if model.gated_mlp else 1
    inside = e * ((h + 2 * kv) + h + gate * f + f) / t  # q, k, v, attention output, MLP hidden before/after
    outside = (4 * e * h + (2 * h if unfused else 0)) / split  # norm inputs/outputs, dropout masks
    attention = 4.0 * model.heads / t  # FlashAttention's log-sum-exp
    if unfused and par.recompute == "none":
        attention = (2 * e + 1) * model.heads * model.seq_len / par.cp / t  # softmax, mask, dropout output
    return inside + outside + attention


def memory(case: Case, microbatches: int) -> Memory:
    model, par = case.model, case.parallel
    e = _bytes_per_element(case.precision)
    first, last = stage_params(model, par)
    params = max(first, last)
    dp = par.dp * par.cp  # context-parallel ranks hold the same weights
    grad_element = 4 if par.grad_dtype == "fp32" else (2 if par.grad_dtype else e)
    weights, grads, optimizer = e * params, grad_element * params, (12 if e == 2 else 8) * params
    if par.zero >= 1:
        optimizer /= dp
    if par.zero >= 2:
        grads /= dp
    if par.zero >= 3:
        # sharded weights plus two gathered layers (the one computing and the one prefetched)
        weights = weights / dp + 2 * e * model.params_per_layer / par.tp
    tokens = par.micro_batch * model.seq_len / par.cp
    per_layer = activation_bytes_per_token_layer(model, par, case.precision) * tokens
    layers = par.largest_stage(model.layers) * par.vpp
    in_flight = 1.0
    if par.pp > 1:
        in_flight = min(microbatches, par.pp) * ((1 + (par.pp - 1) / (par.pp * par.vpp)) if par.vpp > 1 else 1)
    activations = layers * per_layer * in_flight
    if par.recompute == "full":  # one layer rebuilt in backward
        activations += tokens * activation_bytes_per_token_layer(
            model, Parallel(**{**asdict(par), "recompute": "none"}), case.precision)
    if par.pp == 1:  # logits and their gradient in FP32 on the (only) stage
        activations += 2 * 4 * tokens * model.vocab / par.tp
    return Memory(weights, grads, optimizer, activations)


@dataclass
class Projection:
    gpus: int
    step_time_s: float
    tokens_per_s_per_gpu: float
    model_tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    mfu: float
    memory_gib_per_gpu: float
    exposed_comm_fraction: float
    comm_fraction_by_dim: dict[str, float]
    bubble_fraction: float
    fits_in_memory: bool
    memory_excess_gib: float
    breakdown_s: dict[str, float] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in list(out.items()):
            if isinstance(value, float):
                out[key] = round(value, 6)
        return out


@functools.lru_cache(maxsize=None)
def expected_max_of_normals(n: int) -> float:
    """E[max of n independent standard normals] (0 for one, 1/sqrt(pi) for two, 1.03 for four, 3.24 for
    1024), by integrating x n phi(x) Phi(x)^(n-1) on a grid fine enough for four digits."""
    if n <= 1:
        return 0.0
    dx, total = 0.001, 0.0
    for i in range(-8000, 8001):
        x = i * dx
        density, below = math.exp(-x * x / 2) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(x / math.sqrt(2)))
        total += x * n * density * below ** (n - 1)
    return total * dx


def project(case: Case) -> Projection:
    """Step time and its parts for one CASE (validated by :func:`dtrain.scaling.case.problems_of`)."""
    model, par, hw = case.model, case.parallel, case.hardware
    e = _bytes_per_element(case.precision)
    m, p, v, dp = par.microbatches, par.pp, par.vpp, par.dp
    ranks_per_node = min(par.gpus, hw.gpus_per_node)
    if p > 1 and not hw.async_device:
        # a pipeline rank computes m v of its m v + p - 1 slots and sleeps in a receive through the rest
        # (fill and drain), and a rank of a smaller stage also while the largest computes: on shared
        # cores only the ranks that compute compete for them
        ranks_per_node = max(1.0, ranks_per_node * m * v / (m * v + p - 1) * par.stage_balance(model.layers))
    timer = Timer(hw, case.precision, ranks_per_node)
    overlap = hw.async_device
    layer = layer_time(case, timer)
    layers_per_stage = par.largest_stage(model.layers) * v  # per rank: v virtual stages
    head_fwd, head_bwd = _head_kernels(model, par, case.precision)
    head = timer.kernels(head_fwd) + timer.kernels(head_bwd)
    embedding = timer.kernels(_embedding_kernels(model, par, case.precision))
    compute_layer = layer.forward + layer.backward + layer.recompute
    stage_compute = layers_per_stage * compute_layer
    # the slowest stage sets the pace: the last one computes the logits, the first the embedding
    stage_compute_max = stage_compute + (head + embedding if p == 1 else max(head, embedding))
    tp_mb = layers_per_stage * layer.tp_comm
    cp_mb = layers_per_stage * layer.cp_comm

    # data parallelism: gradients and (ZeRO) parameters of this GPU's stage
    first, last = stage_params(model, par)
    local_params = max(first, last)
    dp_size, dp_stride = dp * par.cp, par.tp
    grad_element = 4 if par.grad_dtype == "fp32" else (2 if par.grad_dtype else e)
    grad_bytes = local_params * grad_element
    backward_mb = layers_per_stage * (layer.backward + layer.recompute)
    forward_mb = layers_per_stage * layer.forward
    # what is reduced after backward ends: the first layer's gradients, and on the first stage the
    # embedding's (registered first, so in DDP's last buckets; 30% of GPT-2 small)
    embedding_share = model.vocab * model.hidden / par.tp / local_params
    last_bucket = max(1.0 / max(1, layers_per_stage), embedding_share if first >= last or p == 1 else 0.0)

    def overlapped(seconds: float, window: float) -> float:
        if not (par.dp_overlap and overlap):
            return seconds
        return max(seconds * last_bucket, seconds - window)

    fsdp_mb = 0.0
    dp_exposed = 0.0
    if par.zero == 3:
        layer_bytes = model.params_per_layer / par.tp * e
        gather = timer.collective("all_gather", layer_bytes, dp_size, dp_stride)
        scatter = timer.collective("reduce_scatter", layer_bytes / e * grad_element, dp_size, dp_stride)
        if overlap:  # each layer's gather hides behind the previous layer's compute
            per_layer_fwd = max(0.0, gather - layer.forward)
            per_layer_bwd = max(0.0, gather - layer.backward - layer.recompute)
            fsdp_mb = gather + layers_per_stage * (per_layer_fwd + per_layer_bwd)
            last_extra = layers_per_stage * (max(0.0, gather + scatter - layer.backward - layer.recompute)
                                             - per_layer_bwd)
        else:
            fsdp_mb = 2 * layers_per_stage * gather
            last_extra = layers_per_stage * scatter
        embed = timer.collective("all_gather", model.vocab * model.hidden / par.tp * e, dp_size, dp_stride)
        dp_exposed = last_extra + 3 * embed  # embedding/head: gathered twice, reduced once, not overlapped
    elif par.zero == 0:
        dp_exposed = overlapped(timer.collective("all_reduce", grad_bytes, dp_size, dp_stride), backward_mb)
    else:
        scatter = timer.collective("reduce_scatter", grad_bytes, dp_size, dp_stride)
        gather = timer.collective("all_gather", local_params * e, dp_size, dp_stride)
        scatters = m if par.zero == 2 else 1
        dp_exposed = scatters * overlapped(scatter, backward_mb) + overlapped(gather, forward_mb)

    slot = stage_compute_max + tp_mb + cp_mb + fsdp_mb  # one micro-batch on the slowest stage
    # the pipeline fills and drains through every stage once: the bubble is (p-1)/v slots of the average
    # stage, while the steady state runs at the pace of the slowest
    average_slot = (slot - stage_compute_max + stage_compute * par.stage_balance(model.layers)
                    + (head + embedding) / p)
    bubble = (p - 1) / v * average_slot if p > 1 else 0.0
    p2p = 0.0
    if p > 1:
        per_gpu = par.micro_batch * model.seq_len / par.cp * model.hidden * e / par.tp  # scatter-gather
        p2p = 2 * (m * v + p - 1) * timer.collective("send", per_gpu, 2, dp * par.cp * par.tp)
    optimizer_params = local_params / (dp_size if par.zero >= 1 else 1)
    optimizer = timer.kernel(Kernel("adamw", 0.0, OPTIMIZER_BYTES_PER_PARAM * optimizer_params, launches=20))
    # a synchronous step waits for its slowest rank: each rank's compute varies from step to step
    straggle = (m * stage_compute_max + optimizer) * hw.step_jitter_cv * expected_max_of_normals(par.gpus)
    step = m * slot + bubble + p2p + dp_exposed + optimizer + straggle

    tokens_step = par.global_batch * model.seq_len
    flops_token = model_flops_per_token(model)
    hw_flops_token = flops_token + recompute_flops_per_token(model, par.recompute)
    model_tflops = flops_token * tokens_step / par.gpus / step / 1e12
    hardware_tflops = hw_flops_token * tokens_step / par.gpus / step / 1e12
    mem = memory(case, m)
    capacity = hw.hbm_gib * 2**30
    by_dim = {"dp": (dp_exposed + m * fsdp_mb) / step, "tp": m * tp_mb / step, "pp": p2p / step, "cp": m * cp_mb / step}
    breakdown = {"compute": m * stage_compute_max + straggle, "optimizer": optimizer, "dp": dp_exposed + m * fsdp_mb,
                 "tp": m * tp_mb, "pp": p2p, "cp": m * cp_mb, "bubble": bubble}
    return Projection(
        gpus=par.gpus, step_time_s=step, tokens_per_s_per_gpu=tokens_step / step / par.gpus,
        model_tflops_per_gpu=model_tflops, hardware_tflops_per_gpu=hardware_tflops,
        mfu=model_tflops * 1e12 / hw.peak_flops(case.precision), memory_gib_per_gpu=mem.total / 2**30,
        exposed_comm_fraction=sum(by_dim.values()), comm_fraction_by_dim=by_dim, bubble_fraction=bubble / step,
        fits_in_memory=mem.total <= capacity, memory_excess_gib=max(0.0, (mem.total - capacity) / 2**30),
        breakdown_s=breakdown,
        layout={"dp": dp, "tp": par.tp, "pp": p, "vpp": v, "cp": par.cp, "microbatches": m,
                "global_batch": par.global_batch, "attention": model.attention, "hardware": hw.name,
                "memory_gib": {"weights": mem.weights / 2**30, "gradients": mem.gradients / 2**30,
                               "optimizer": mem.optimizer / 2**30, "activations": mem.activations / 2**30}})
