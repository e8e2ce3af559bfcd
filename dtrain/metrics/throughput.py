"""Per-step numbers derived from a measured step time: tokens/s, model FLOP/s, MFU, peak memory."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated device memory on CUDA; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


def step_throughput(tokens_per_step: int, step_time_s: float, flops_per_token: float | None, world_size: int,
                    peak_flops_per_device: float | None) -> dict[str, float]:
    """Global tokens/s; model FLOP/s per device (6N+attention, no recompute counted); MFU when a peak is known."""
    out = {"tokens_per_s": tokens_per_step / step_time_s}
    if flops_per_token:
        per_device = flops_per_token * out["tokens_per_s"] / world_size
        out["model_flops_per_s_per_device"] = per_device
        if peak_flops_per_device:
            out["mfu"] = per_device / peak_flops_per_device
    return out
