"""How long a preempted job needs between the signal and SIGKILL: the launcher's grace period.

A preemption save starts at the next step boundary after the ranks agree (up to two steps), writes
the whole training state, commits, and the processes exit. The state is measured when the user gives
``launcher.save_time_s`` (dtrain logs ``committed ... in X s`` after every save), else estimated:
parameters x 12 bytes (fp32 weights and AdamW's two moments), spread over the nodes (DCP writes each
replicated tensor once and every shard once, balanced over ranks), at ``launcher.write_mb_s`` per node.
Grace = margin x save time + stop overhead, at least 30 s (Kubernetes' default and Slurm's default
KillWait: asking for less buys nothing). At start-up the trainer checks the same budget again with a
measured write bandwidth (``checkpoint.grace_period_s``, which the launcher sets to this value).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import DictConfig

MIN_GRACE_S = 30.0
STATE_BYTES_PER_PARAM = 12  # fp32 weights + AdamW exp_avg + exp_avg_sq


@dataclass(frozen=True)
class GraceEstimate:
    grace_s: float
    needed_s: float | None  # margin x save + overhead; None when the state size is unknown
    save_s: float | None
    how: str  # where save_s comes from, with the numbers
    explanation: str  # how grace_s was chosen, for the rendered file's comments
    warnings: list[str] = field(default_factory=list)


def count_parameters(model_cfg: DictConfig) -> int | None:
    """Parameters of the configured model, built on the meta device (no memory, no weights); None when
    the model cannot be built that way."""
    try:
        import torch
        from hydra.utils import instantiate

        with torch.device("meta"):
            model = instantiate(model_cfg)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def estimate_save_seconds(cfg: DictConfig) -> tuple[float | None, str]:
    lc = cfg.launcher
    if lc.save_time_s is not None:
        return float(lc.save_time_s), f"launcher.save_time_s={lc.save_time_s:g} (measured)"
    params = count_parameters(cfg.model)
    if params is None:
        return None, "the model cannot be built on the meta device to count its parameters"
    state = params * STATE_BYTES_PER_PARAM
    per_node = state / lc.nodes
    seconds = per_node / (lc.write_mb_s * 1e6)
    return seconds, (f"{params / 1e6:.1f}M parameters -> {state / 1e9:.2f} GB of state, {per_node / 1e9:.2f} GB "
                     f"per node at launcher.write_mb_s={lc.write_mb_s:g}")


def estimate_grace(cfg: DictConfig, requested: float | None) -> GraceEstimate:
    """The grace to give the job: ``requested`` when set (with a warning if it cannot hold a save), else
    derived from the save estimate."""
    lc = cfg.launcher
    save_s, how = estimate_save_seconds(cfg)
    needed = None if save_s is None else lc.grace_margin * save_s + lc.stop_overhead_s
    warnings = []
    if requested is not None:
        grace = float(requested)
        explanation = f"requested; a save needs ~{needed:.0f} s" if needed is not None else "requested"
        if needed is not None and grace < needed:
            warnings.append(f"grace period {grace:g} s may not hold a preemption save: ~{save_s:.1f} s to save "
                            f"({how}) x margin {lc.grace_margin:g} + {lc.stop_overhead_s:g} s to stop = "
                            f"{needed:.0f} s; raise launcher.grace_period_s (the platform must allow it) or use "
                            "faster storage")
    elif needed is None:
        grace = max(MIN_GRACE_S, float(cfg.checkpoint.grace_period_s))
        explanation = "no save estimate"
        warnings.append(f"cannot estimate the checkpoint save time ({how}); using a grace period of {grace:g} s. "
                        "Set launcher.save_time_s to a measured save time")
    else:
        grace = max(MIN_GRACE_S, needed)
        explanation = (f"{lc.grace_margin:g} x ~{save_s:.1f} s save + {lc.stop_overhead_s:g} s to stop, at least "
                       f"{MIN_GRACE_S:g} s; save estimated from {how}")
    return GraceEstimate(grace, needed, save_s, how, explanation, warnings)
