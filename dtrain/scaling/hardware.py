"""Hardware for the projection: named presets in ``configs/hardware/`` or a block of the same fields.

A preset is a Hydra config of the ``hardware`` group (so ``hardware=h100_sxm`` also sets the peak for
MFU in a training run) with the datasheet numbers the projection needs. Every number has its source
in the YAML file. A block may give only the fields it knows (the published-cases file gives peak,
memory, GPUs per node, NVLink and NIC bandwidth); the rest comes from :data:`DEFAULTS`, which are an
A100 80GB SXM (HBM bandwidth scaled with the peak when the peak differs) and the model's constants.

The model's constants (efficiencies, latencies, a kernel floor) are the same for every GPU preset;
``dtrain scale validate`` checks them on two published tables. Two of them are TUNED (on those tables,
by a grid search over round values; each table alone would pick a slightly different pair, see
scaling_studies/README.md), the others come from public measurements:

- ``matmul_efficiency`` 0.73 (tuned): the share of the tensor-core peak a GEMM sustains when it is
  compute-bound, applied to every GEMM through a roofline (small or thin GEMMs fall to the memory
  bound). Large FP16 GEMMs on A100 reach ~0.75-0.85 of 312 TFLOP/s in cuBLAS benchmarks; training
  kernels run hotter and throttle, so a little less is expected.
- ``memory_efficiency`` 0.65 (tuned): the share of HBM bandwidth a memory-bound kernel reaches.
  A pure copy reaches ~0.8-0.9 (STREAM on A100 80GB: ~1.7 of 2.04 TB/s); layer norm, softmax with its
  reductions and dropout with its random numbers stay below that.
- ``nvlink_efficiency`` 0.80 and ``nic_efficiency`` 0.90: NCCL bus bandwidth over the link rate for
  large messages (nccl-tests on DGX A100: ~230-240 GB/s all-reduce bus bandwidth of 300 GB/s NVLink;
  ~22-24 GB/s of a 25 GB/s HDR NIC).
- ``nvlink_latency_us`` 5 and ``nic_latency_us`` 10: the latency of one ring step inside a node and of
  one tree level across nodes (nccl-tests small-message times: ~10-20 us for an 8-GPU all-reduce,
  ~20-40 us across nodes).
- ``kernel_overhead_us`` 4: the shortest time any kernel takes (launch and tail; CUDA launch latency is
  ~2-5 us); it only matters for small models.
- ``flash_attention_efficiency``: FlashAttention's share of the peak, a property of the kernel on that
  GPU, set per preset from the FlashAttention-2/-3 papers (A100: FA2 reaches 0.50-0.73 of peak forward
  and backward; H100: FA2 0.35-0.45, FA3 0.60-0.75; the presets assume FA2 as in PyTorch's SDPA).

A CPU preset (``cpu_local``) sets its own values: they come from ``dtrain scale calibrate``, which
measures them on the machine.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dtrain.config.errors import ConfigError

# the names a preset (or a custom block) may set, with the defaults a custom block gets
DEFAULTS: dict[str, Any] = {
    "peak_tflops": 312.0,  # dense FP16/BF16 tensor-core peak per device
    "peak_tflops_fp32": 19.5,  # FP32 without TF32 (what precision=fp32 runs at)
    "peak_tflops_fp8": None,  # dense FP8 peak; None: no FP8 support
    "hbm_gib": 80.0,
    "hbm_gbps": 2039.0,  # GB/s
    "gpus_per_node": 8,
    "nvlink_gbps_per_gpu": 300.0,  # GB/s per direction per GPU
    "nic_gbps_per_gpu": 25.0,  # GB/s per GPU across nodes
    "compute_slots_per_node": None,  # ranks a node can run at full speed; None: gpus_per_node
    # how much slower each rank computes when every slot of the node computes at once (shared caches,
    # memory bandwidth, clock): 1 for GPUs (each has its own), measured on a CPU by `dtrain scale calibrate`
    "corun_slowdown": 1.0,
    # the spread of one rank's step (coefficient of variation of its compute from step to step: OS
    # interrupts, a shared machine's other tenants, clock changes); a synchronous step ends when its
    # slowest rank does, so n ranks pay cv x E[max of n standard normals] on top of the mean. 0 for GPU
    # presets (their published runs already include it); measured on a CPU by `dtrain scale calibrate`
    "step_jitter_cv": 0.0,
    # an accelerator the host feeds asynchronously: launch costs hide behind running kernels (down to a
    # floor per kernel) and communication has its own engines. False for a CPU: the host runs kernels,
    # dispatch overhead and gloo's threads on the same cores, one after another, and nothing hides
    "async_device": True,
    "matmul_efficiency": 0.73,
    "memory_efficiency": 0.65,
    "nvlink_efficiency": 0.80,
    "nic_efficiency": 0.90,
    # an all-gather's and a reduce-scatter's bus bandwidth against an all-reduce's on the same link: 1 for
    # NCCL's rings; measured by `dtrain scale calibrate` on gloo, whose two are much slower per byte
    "all_gather_efficiency": 1.0,
    "reduce_scatter_efficiency": 1.0,
    # their latency against the ring model's (one latency per ring step): 1 for NCCL; measured on gloo,
    # whose reduce-scatter of a small message takes as long as an all-reduce (two steps' worth)
    "all_gather_latency_factor": 1.0,
    "reduce_scatter_latency_factor": 1.0,
    "nvlink_latency_us": 5.0,
    # how a collective's latency grows with the ranks of a node: "ring", one latency per ring step (NCCL
    # inside a node: n - 1 per all-gather, 2 (n - 1) per all-reduce); "log2", one per doubling (gloo on a
    # host: its small all-reduces, all-gathers and reduce-scatters at 4 ranks take 2x the steps of 2,
    # measured, not the ring's 3x)
    "latency_steps": "ring",
    "nic_latency_us": 10.0,
    "kernel_overhead_us": 4.0,
    "flash_attention_efficiency": 0.60,  # FlashAttention-2 on A100: 0.50-0.73 of peak (paper, fwd/bwd)
    "attention": "unfused",  # the attention kernel of the software stack: flash | unfused (see a100_80gb.yaml)
}
# fields of the training-run hardware config that the projection ignores
_RUN_ONLY = {"name", "peak_flops_per_device", "defaults"}
_ATTENTION = ("flash", "unfused")
_LATENCY_STEPS = ("ring", "log2")


@dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float
    peak_tflops_fp32: float
    peak_tflops_fp8: float | None
    hbm_gib: float
    hbm_gbps: float
    gpus_per_node: int
    nvlink_gbps_per_gpu: float
    nic_gbps_per_gpu: float
    compute_slots_per_node: int | None
    corun_slowdown: float
    step_jitter_cv: float
    async_device: bool
    matmul_efficiency: float
    memory_efficiency: float
    nvlink_efficiency: float
    nic_efficiency: float
    all_gather_efficiency: float
    reduce_scatter_efficiency: float
    all_gather_latency_factor: float
    reduce_scatter_latency_factor: float
    nvlink_latency_us: float
    latency_steps: str
    nic_latency_us: float
    kernel_overhead_us: float
    flash_attention_efficiency: float
    attention: str

    def peak_flops(self, precision: str) -> float:
        """Dense matmul peak in FLOP/s for a precision (fp16 and bf16 share the tensor cores)."""
        if precision == "fp32":
            return self.peak_tflops_fp32 * 1e12
        if precision == "fp8":
            return (self.peak_tflops_fp8 or self.peak_tflops) * 1e12
        return self.peak_tflops * 1e12

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hardware_dir() -> Path:
    from dtrain.config.compose import config_dir

    return config_dir() / "hardware"


def preset_names() -> list[str]:
    """Presets the projection can use: hardware configs that state a tensor-core peak."""
    names = []
    for path in sorted(hardware_dir().glob("*.yaml")):
        data = yaml.safe_load(path.read_text()) or {}
        if data.get("peak_tflops") is not None:
            names.append(path.stem)
    return names


def from_block(block: dict[str, Any], name: str = "custom") -> Hardware:
    """A Hardware from a preset's fields or a user's block; unknown fields and bad values are errors."""
    known = {f.name for f in fields(Hardware)} - {"name"}
    unknown = sorted(set(block) - known - _RUN_ONLY)
    problems = [f"hardware.{k} is not a hardware field; known: {', '.join(sorted(known))}" for k in unknown]
    values = dict(DEFAULTS)
    given = {k: v for k, v in block.items() if k in known and v is not None}
    peak = given.get("peak_tflops")
    if isinstance(peak, (int, float)) and peak > 0 and "hbm_gbps" not in given:
        # keep the default's balance of compute and memory when only the peak is known
        values["hbm_gbps"] = DEFAULTS["hbm_gbps"] * float(peak) / DEFAULTS["peak_tflops"]
    values.update(given)
    for key in ("peak_tflops", "peak_tflops_fp32", "hbm_gib", "hbm_gbps", "nvlink_gbps_per_gpu", "nic_gbps_per_gpu"):
        if not isinstance(values[key], (int, float)) or isinstance(values[key], bool) or values[key] <= 0:
            problems.append(f"hardware.{key}={values[key]!r} must be a positive number")
    if not isinstance(values["corun_slowdown"], (int, float)) or values["corun_slowdown"] < 1:
        problems.append(f"hardware.corun_slowdown={values['corun_slowdown']!r} must be a number >= 1")
    jitter = values["step_jitter_cv"]
    if not isinstance(jitter, (int, float)) or isinstance(jitter, bool) or not 0 <= jitter < 1:
        problems.append(f"hardware.step_jitter_cv={jitter!r} must be a number in [0, 1) (e.g. 0.05)")
    for key in ("matmul_efficiency", "memory_efficiency", "nvlink_efficiency", "nic_efficiency",
                "flash_attention_efficiency", "all_gather_efficiency", "reduce_scatter_efficiency"):
        if not isinstance(values[key], (int, float)) or not 0 < values[key] <= 1:
            problems.append(f"hardware.{key}={values[key]!r} must be in (0, 1]")
    for key in ("all_gather_latency_factor", "reduce_scatter_latency_factor"):
        if not isinstance(values[key], (int, float)) or isinstance(values[key], bool) or values[key] <= 0:
            problems.append(f"hardware.{key}={values[key]!r} must be a positive number")
    if not isinstance(values["gpus_per_node"], int) or values["gpus_per_node"] < 1:
        problems.append(f"hardware.gpus_per_node={values['gpus_per_node']!r} must be a positive integer")
    if values["latency_steps"] not in _LATENCY_STEPS:
        problems.append(f"hardware.latency_steps={values['latency_steps']!r} must be one of: "
                        f"{', '.join(_LATENCY_STEPS)}")
    if values["attention"] not in _ATTENTION:
        problems.append(f"hardware.attention={values['attention']!r} must be one of: {', '.join(_ATTENTION)}")
    if problems:
        raise ConfigError(problems)
    return Hardware(name=name, **{k: values[k] for k in known})


def load_preset(name: str) -> Hardware:
    path = hardware_dir() / f"{name}.yaml"
    names = preset_names()
    if name not in names:
        raise ConfigError(f"unknown hardware preset {name!r}; choose one of: {', '.join(names)} "
                          "(or give a block of hardware fields)")
    return from_block(yaml.safe_load(path.read_text()) or {}, name)


def resolve(spec: str | dict[str, Any]) -> Hardware:
    """A preset name, or a block (which may name a ``preset`` to start from and override its fields)."""
    if isinstance(spec, str):
        return load_preset(spec)
    if not isinstance(spec, dict):
        raise ConfigError(f"hardware must be a preset name or a block of fields, not {spec!r}")
    block = dict(spec)
    base = block.pop("preset", None)
    if base is None:
        return from_block(block, str(block.pop("name", "custom")))
    start = load_preset(str(base))
    merged = {k: v for k, v in start.to_dict().items() if k != "name"}
    merged.update(block)
    return from_block(merged, f"{base}+custom")


def with_overrides(hw: Hardware, **changes: Any) -> Hardware:
    return replace(hw, **changes)
