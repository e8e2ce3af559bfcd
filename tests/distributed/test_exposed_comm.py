"""The exposed-communication meter on real gloo groups of 2 ranks, validated two ways.

Fault injection: steps with ``DTRAIN_INJECT_COMM_DELAY_MS`` must show exposed communication risen by
the injected amount (X ms x the collectives of the step). A slow peer: rank 1 sleeps in its forward
(compute, not communication); rank 0 must find that time waiting in a collective (DDP's bucket wait at
the end of backward, FSDP's gathers, the pipeline's receives), while rank 1's own exposed time stays.
In both, compute did not change on the rank that waits, so the rise of its step time must be found in
exposed communication plus the pipeline bubble. Steps alternate (plain, injected, slow peer) in the
same processes, so the load of a shared machine hits all three alike; medians over the rounds, within
15%, for ddp, fsdp and pp.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from tests.helpers import spawn_workers

DELAY_MS = 100.0  # large against the waits a loaded machine adds (a sleeping rank lends its core)
SLOW_S = 0.1  # rank 1's extra compute per forward of its first block
ROUNDS = 5
TOLERANCE = 0.15
BASE = ["model=gpt_tiny", "model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.tie_embeddings=false",
        "data=synthetic", "data.seq_len=32", "data.vocab_size=64", "run.name=t", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=2", "optim.warmup_steps=0"]
STRATEGIES = {"ddp": ["strategy=ddp"], "fsdp": ["strategy=fsdp"], "pp": ["strategy=pp"]}
VARIANTS = ("plain", "injected", "slow_peer")


def _first_block(strategy):
    model = strategy.parts[0] if hasattr(strategy, "parts") else strategy.model
    model = getattr(model, "module", model)  # DDP wraps the model
    return next(iter(model.blocks.values()))


def _worker(rank: int, world: int, out_dir: str) -> None:
    import time

    import torch

    from dtrain.config.validate import load_config
    from dtrain.distributed.env import discover_env
    from dtrain.metrics.exposed_comm import CommMeter, injected_delay_s, world_dimension
    from dtrain.models import build_model
    from dtrain.optim import build_optimizer
    from dtrain.strategies import StepSpec, build_strategy
    from dtrain.strategies.layout import parallel_dims

    torch.set_num_threads(1)
    delay = injected_delay_s()  # the switch under test, read from the environment
    assert delay == DELAY_MS / 1000
    slow = {"on": False}
    results = {}
    for name, overrides in STRATEGIES.items():
        cfg = load_config([*BASE, *overrides], world)
        strategy = build_strategy(cfg, StepSpec(8, 2, 1.0, "fp32", 0), discover_env(), torch.device("cpu"))
        strategy.setup(build_model(cfg.model, 0), lambda named: build_optimizer(named, cfg.optim))
        if rank == 1:
            _first_block(strategy).register_forward_pre_hook(lambda *_: time.sleep(SLOW_S) if slow["on"] else None)
        batch = torch.randint(0, 64, (8, 33), generator=torch.Generator().manual_seed(0))
        local = batch.chunk(strategy.dp_size)[strategy.dp_rank]
        meter = CommMeter(0.0, world_dimension(parallel_dims(cfg.strategy.name, cfg.strategy, world).degrees))
        steps = {variant: [] for variant in VARIANTS}
        for round_ in range(ROUNDS + 1):  # the first round warms up
            for variant in VARIANTS:
                meter.set_delay(delay if variant == "injected" else 0.0)
                slow["on"] = variant == "slow_peer"
                meter.begin_step()
                start = time.perf_counter()
                strategy.train_step(local).loss.item()
                step_time = time.perf_counter() - start
                if round_:
                    steps[variant].append({"step_time_s": step_time, **meter.end_step(step_time)})
                else:
                    meter.end_step(step_time)
        meter.close()
        strategy.teardown()
        results[name] = steps
    Path(out_dir, f"{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    import os

    out = tmp_path_factory.mktemp("exposed")
    os.environ["DTRAIN_INJECT_COMM_DELAY_MS"] = str(DELAY_MS)  # inherited by the spawned ranks
    try:
        spawn_workers(_worker, 2, str(out), timeout=400)
    finally:
        del os.environ["DTRAIN_INJECT_COMM_DELAY_MS"]
    return [json.loads((out / f"{rank}.json").read_text()) for rank in range(2)]


def _rise(base: list[dict], changed: list[dict], key) -> float:
    """Median over rounds of the paired change of ``key(step)``."""
    return statistics.median(key(b) - key(a) for a, b in zip(base, changed))


def _waited(step: dict) -> float:
    return step["exposed_comm_s"] + step["bubble_s"]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_injected_delay_is_measured_as_exposed_communication(measured, name):
    for rank, results in enumerate(measured):
        plain, injected = results[name]["plain"], results[name]["injected"]
        calls = {s["comm_calls"] for s in plain + injected}
        assert len(calls) == 1 and min(calls) >= 3, calls  # every collective seen, none twice
        expected = DELAY_MS / 1000 * calls.pop()
        ratio = _rise(plain, injected, lambda s: s["exposed_comm_s"]) / expected
        assert abs(ratio - 1) <= TOLERANCE, f"rank {rank}: exposed rose {ratio:.2f}x the injected delay"
        ratio = _rise(plain, injected, _waited) / _rise(plain, injected, lambda s: s["step_time_s"])
        assert abs(ratio - 1) <= TOLERANCE, f"rank {rank}: waits grew {ratio:.2f}x the step time"
        dim = {"ddp": "dp", "fsdp": "dp", "pp": "pp"}[name]
        assert statistics.median(s[f"exposed_comm_{dim}_s"] / s["exposed_comm_s"] for s in injected) > 0.9


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_waiting_for_a_slow_peer_is_measured(measured, name):
    waiting, sleeping = measured[0][name], measured[1][name]
    grown = _rise(waiting["plain"], waiting["slow_peer"], lambda s: s["step_time_s"])
    assert grown > SLOW_S, f"rank 0's step grew {grown:.3f}s only"
    ratio = _rise(waiting["plain"], waiting["slow_peer"], _waited) / grown
    assert abs(ratio - 1) <= TOLERANCE, f"rank 0: waits grew {ratio:.2f}x its step time"
    # the sleeping rank computed longer; that is not communication
    own = _rise(sleeping["plain"], sleeping["slow_peer"], lambda s: s["exposed_comm_s"])
    assert own < TOLERANCE * _rise(sleeping["plain"], sleeping["slow_peer"], lambda s: s["step_time_s"])
