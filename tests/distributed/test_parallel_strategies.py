"""Every mesh strategy against one process, on real gloo groups: 10 steps of losses and gradient norms,
evaluation, gradient-sync counts, and checkpoints that move between strategies and world sizes.

Starting processes is the expensive part on a 2-core machine, so one process group per world size
runs every case one after the other and records each case's outcome; the tests below then report
them one by one. Batches are fixed arithmetic sequences (learnable, so losses move); the reference is
the ``single`` strategy run in the test process on the same global batches.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dtrain.config.validate import load_config
from dtrain.distributed.env import discover_env
from dtrain.models import build_model
from dtrain.optim import build_optimizer
from dtrain.strategies import StepSpec, build_strategy
from dtrain.strategies.state import checkpoint_mismatch, model_change_problems
from tests.helpers import spawn_workers

STEPS = 10
GLOBAL, MICRO, SEQ, VOCAB, WIDTH = 8, 2, 16, 64, 32
# fp32 on CPU: the strategies reduce in other orders than one process, nothing else differs. Observed
# over 20 steps (10 now): |loss - reference| <= 1e-6 and grad norms within 5e-6 relative; the bounds leave 10x.
LOSS_ATOL, NORM_RTOL = 1e-5, 1e-4

BASE = ["model=gpt_tiny", "model.n_layer=4", f"model.d_model={WIDTH}", "model.n_head=4", "data=synthetic",
        f"data.seq_len={SEQ}", f"data.vocab_size={VOCAB}", "run.name=t", f"trainer.global_batch_size={GLOBAL}",
        f"trainer.micro_batch_size={MICRO}", "optim.warmup_steps=0", "optim.lr=3e-3"]
UNTIED = ["model.tie_embeddings=false"]
# fewer, larger micro-batches where DTensor's per-op overhead dominates the step on CPU
BIG_MICRO = ["trainer.micro_batch_size=4"]
ONE_MICRO = ["trainer.micro_batch_size=8"]

# (overrides, reference): the default (tied) model everywhere, pipelines included (one copy of the tied
# embedding per end of the pipeline, see dtrain/parallel/tied.py); a few untied cases stay untied on purpose.
# The default suite (`make test`) runs every strategy for STEPS steps at 2 and 4 ranks, and every variant
# (activation checkpointing, every pipeline schedule, explicit splits, ...) for VARIANT_STEPS; only
# torch.compile (its first compile alone takes ~30 s on 2 cores) is marked slow: `make test-all`.
VARIANT_STEPS = 3
TWO_RANKS = [
    (["strategy=fsdp"], "tied"),
    (["strategy=tp", *BIG_MICRO], "tied"),
    (["strategy=pp", "strategy.pp_schedule=1F1B"], "tied"),
    (["strategy=pp", "strategy.pp_schedule=ZBVZeroBubble"], "tied"),
]
TWO_RANK_VARIANTS = [
    (["strategy=fsdp", "strategy.activation_checkpointing=full"], "tied"),
    (["strategy=fsdp", "strategy.activation_checkpointing=selective", "strategy.reshard_after_forward=false"], "tied"),
    (["strategy=tp", "strategy.sequence_parallel=false", *UNTIED, *ONE_MICRO], "untied"),
    *[(["strategy=pp", f"strategy.pp_schedule={s}"], "tied") for s in
      ("GPipe", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "DualPipeV")],
    (["strategy=pp", "strategy.pp_schedule=GPipe", "strategy.microbatches=2", "strategy.activation_checkpointing=full"],
     "tied"),
    (["strategy=pp", "strategy.pp_layers_per_stage=[1,3]", *UNTIED], "untied"),  # a pipeline without the tie
]
FOUR_RANKS = [
    (["strategy=fsdp"], "tied"),
    (["strategy=hsdp"], "tied"),
    (["strategy=fsdp_tp", *BIG_MICRO], "tied"),
    (["strategy=pp_fsdp", "strategy.pp_schedule=Interleaved1F1B"], "tied"),
]
FOUR_RANK_VARIANTS = [
    (["strategy=tp", *ONE_MICRO], "tied"),
    (["strategy=fsdp_tp", "strategy.dp_replicate=2", "strategy.dp_shard=1", "strategy.sequence_parallel=false",
      *BIG_MICRO], "tied"),
    (["strategy=pp", "strategy.pp_schedule=1F1B"], "tied"),  # pp=4: the tie's group is pp ranks {0, 3}
    (["strategy=pp_fsdp", "strategy.pp_schedule=ZBVZeroBubble"], "tied"),  # two sharded copies on one rank
    # pp=2 x tp=2 (20 steps of 3d, with FSDP too, run through torchrun at 8 ranks)
    (["strategy=3d", "strategy.dp_shard=1", *BIG_MICRO], "tied"),
]
# checkpoint chains: each resumes the previous one's checkpoint (also its own round trip), then saves. Tied:
# a pipeline saves the layout of the whole tied model (wte.weight, lm_head.weight, optimizer state once)
CHAIN_TWO = [["strategy=fsdp"], ["strategy=pp"], ["strategy=ddp"],
             ["strategy=pp", "strategy.pp_schedule=ZBVZeroBubble"], ["strategy=tp", *BIG_MICRO], ["strategy=fsdp"]]
CHAIN_FOUR = [["strategy=hsdp"], ["strategy=fsdp_tp", *BIG_MICRO], ["strategy=pp_fsdp"],
              ["strategy=3d", "strategy.dp_shard=1", *BIG_MICRO], ["strategy=fsdp"]]
# the fsdp@4 checkpoint at the end of CHAIN_FOUR, continued at 2 ranks
FROM_FOUR = [["strategy=fsdp"], ["strategy=tp", *BIG_MICRO], ["strategy=pp"]]
# memory estimate (the dry run's plan on a meta model) against what ranks allocate
MEMORY = [["strategy=fsdp"], ["strategy=fsdp", "strategy.activation_checkpointing=full"], ["strategy=tp"],
          ["strategy=tp", "strategy.sequence_parallel=false"], ["strategy=pp"],
          ["strategy=pp", "strategy.pp_schedule=ZBVZeroBubble"]]
STATE_RTOL, ACTIVATION_RTOL = 0.01, 0.05


def label(overrides: list[str]) -> str:
    return " ".join(o.replace("strategy.", "").replace("model.", "") for o in overrides if "micro_batch" not in o)


def batches(n: int = STEPS) -> list[torch.Tensor]:
    """Arithmetic sequences with a random start and stride: learnable, so losses move."""
    out = []
    for i in range(n):
        generator = torch.Generator().manual_seed(100 + i)
        start = torch.randint(0, VOCAB, (GLOBAL, 1), generator=generator)
        stride = torch.randint(1, 4, (GLOBAL, 1), generator=generator)
        out.append((start + stride * torch.arange(SEQ + 1)) % VOCAB)
    return out


def padded_batches(n: int = VARIANT_STEPS) -> list[torch.Tensor]:
    """``batches`` with the tail of each sample ignored (``IGNORE_INDEX``), unevenly across samples, so
    ranks and micro-batches hold different numbers of targets: only a token-weighted loss matches."""
    from dtrain.strategies.loss import IGNORE_INDEX

    out = []
    for i, batch in enumerate(batches(n)):
        lengths = torch.randint(2, SEQ + 2, (GLOBAL,), generator=torch.Generator().manual_seed(500 + i))
        keep = torch.arange(SEQ + 1) < lengths[:, None]
        out.append(torch.where(keep, batch, torch.full_like(batch, IGNORE_INDEX)))
    return out


# token-weighted loss under every family (the reference is the single process on the same padded batches)
PADDED = [["strategy=ddp", *UNTIED], ["strategy=fsdp", *UNTIED], ["strategy=tp", *UNTIED, *BIG_MICRO],
          ["strategy=pp", *UNTIED]]


def make(overrides: list[str], world: int, precision: str = "fp32"):
    cfg = load_config(BASE + overrides, world)
    spec = StepSpec(GLOBAL, cfg.trainer.micro_batch_size, 1.0, precision, 11)
    strategy = build_strategy(cfg, spec, discover_env(), torch.device("cpu"))
    strategy.setup(build_model(cfg.model, 11), lambda named: build_optimizer(named, cfg.optim))
    return strategy


def step(strategy, batch: torch.Tensor) -> tuple[float, float]:
    result = strategy.train_step(batch.chunk(strategy.dp_size)[strategy.dp_rank])
    return result.loss.item(), result.grad_norm.item()


def gathered_tied_copies(strategy) -> tuple[list[torch.Tensor], int]:
    """Every copy of the tied embedding a pipeline holds on any rank (as full tensors), and how many the design
    promises: one per rank of the first and of the last stage, but one Parameter for both where one pipeline
    rank holds both ends (V schedules), unless FSDP2 shards the two stages separately. Collective."""
    from torch.distributed.tensor import DTensor

    from dtrain.distributed import collectives
    from dtrain.parallel.pipeline import stage_owners

    tied = strategy.tied
    mine = [] if tied is None else [p.full_tensor() if isinstance(p, DTensor) else p.detach().clone()
                                    for p in (tied.param, *tied.followers)]
    copies = [copy for rank_copies in collectives.all_gather_object(mine) for copy in rank_copies]
    dims = strategy.dims
    owners = stage_owners(dims.pp, strategy.per_rank, strategy.schedule_name)
    one_parameter = owners[0] == owners[-1] and dims.dp == 1
    expected = (dims.world_size // dims.pp) * (1 if one_parameter else 2) if strategy.parts[0].tie_embeddings else 0
    return copies, expected


def assert_copies_identical(copies: list[torch.Tensor], expected: int, what: str) -> None:
    assert len(copies) == expected, f"{what}: {len(copies)} copies of the tied embedding, expected {expected}"
    for copy in copies[1:]:
        assert torch.equal(copy, copies[0]), \
            f"{what}: the tied embedding's copies differ by up to {(copy - copies[0]).abs().max().item():.3g}"


def trajectory(overrides: list[str], world: int, data: list[torch.Tensor], precision: str = "fp32") -> dict:
    strategy = make(overrides, world, precision)
    steps = [step(strategy, b) for b in data]
    val = strategy.eval_loss(data[0].chunk(strategy.dp_size)[strategy.dp_rank]).item()
    copies = gathered_tied_copies(strategy) if hasattr(strategy, "tied") else None
    strategy.teardown()
    return {"steps": steps, "val": val, "copies": copies}


def assert_matches(got: dict, ref: dict, what: str, loss_atol: float = LOSS_ATOL, norm_rtol: float = NORM_RTOL):
    if got.get("copies") is not None:  # a pipeline: the copies of a tied embedding stayed bit-identical
        assert_copies_identical(*got["copies"], what)
    assert len(got["steps"]) == len(ref["steps"])
    for i, ((loss, norm), (ref_loss, ref_norm)) in enumerate(zip(got["steps"], ref["steps"])):
        assert abs(loss - ref_loss) <= loss_atol, f"{what} step {i + 1}: loss {loss} vs {ref_loss}"
        assert abs(norm - ref_norm) <= norm_rtol * ref_norm, f"{what} step {i + 1}: grad norm {norm} vs {ref_norm}"
    assert abs(got["val"] - ref["val"]) <= loss_atol, f"{what}: eval {got['val']} vs {ref['val']}"


def outcome(fn: Callable[[], None]) -> str | None:
    """None if ``fn`` passed, else its assertion message (other errors propagate and fail the group)."""
    try:
        fn()
        return None
    except AssertionError as e:
        return str(e) or repr(e)


def assert_slices_of(shards: dict, full: dict, rank: int, world: int, what: str) -> None:
    assert set(shards) == set(full), what
    sharded = 0
    for name, shard in shards.items():
        whole = full[name]
        candidates = [whole] if shard.shape == whole.shape else [
            whole.chunk(world, dim)[rank] for dim in range(whole.dim()) if whole.shape[dim] == world * shard.shape[dim]]
        assert any(torch.equal(shard, c) for c in candidates), f"{what}: rank {rank}'s {name} is not its slice"
        sharded += shard.shape != whole.shape
    assert sharded, f"{what}: no parameter was sharded"


def assert_no_autocast(seen: list[bool]) -> None:
    assert seen and not any(seen), f"{sum(seen)} of {len(seen)} gradient hooks ran under autocast"


def assert_vocab_sharded(logits, world: int) -> None:
    from torch.distributed.tensor import DTensor

    assert isinstance(logits, DTensor), f"logits are a {type(logits).__name__}, not a DTensor"
    assert [p.is_shard(dim=2) for p in logits.placements] == [True], logits.placements
    assert logits.to_local().shape[-1] == VOCAB // world, logits.to_local().shape


def every_rank(results: dict[str, str | None]) -> dict[str, str | None]:
    """A case fails if it failed on any rank: merge every rank's outcomes, naming the ranks."""
    from dtrain.distributed import collectives

    merged: dict[str, str | None] = {}
    for rank, outcomes in enumerate(collectives.all_gather_object(results)):
        for case, problem in outcomes.items():
            if problem is not None:
                merged[case] = "; ".join(filter(None, [merged.get(case), f"rank {rank}: {problem}"]))
            else:
                merged.setdefault(case, None)
    return merged


def assert_calls(counter, kind: str, expected: int) -> None:
    assert counter.calls[kind] == expected, f"{counter.calls[kind]} {kind} calls, expected {expected}: " \
                                            f"{dict(counter.calls)}"


def assert_extra_all_reduces(tied, untied, extra: int, nbytes: int) -> None:
    calls, payload = (tied.calls["all_reduce"] - untied.calls["all_reduce"],
                      tied.bytes["all_reduce"] - untied.bytes["all_reduce"])
    assert (calls, payload) == (extra, extra * nbytes), \
        f"tied minus untied: {calls} all-reduces of {payload} bytes, expected {extra} of {extra * nbytes}"


# --- memory -----------------------------------------------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t._local_tensor if isinstance(t, DTensor) else t


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a DTensor's local shard): what is allocated."""
    storages = {}
    for t in tensors:
        if t is not None:
            storage = _local(t).untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measured_memory(strategy) -> dict[str, int]:
    """Parameters, gradients (just before the optimizer step) and AdamW state actually allocated on this
    rank; activations as the storages autograd saves for one micro-batch (parameters and their views
    excluded), for strategies that expose one model."""
    from torch import nn

    from dtrain.strategies.loss import inputs_and_targets, token_loss_sum

    params = [p for group in strategy.optimizer.param_groups for p in group["params"]]
    measured: dict[str, int] = {}
    hook = strategy.optimizer.register_step_pre_hook(
        lambda *_: measured.__setitem__("grads", storage_bytes(p.grad for p in params)))
    step(strategy, batches(1)[0])
    hook.remove()
    measured["params"] = storage_bytes(params)
    measured["optimizer"] = storage_bytes(v for state in strategy.optimizer.state.values()
                                          for k, v in state.items() if k != "step")
    if getattr(strategy, "model", None) is not None:
        saved = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            base = t._base if t._base is not None else t
            if not isinstance(base, nn.Parameter) and not (base.is_leaf and base.requires_grad):
                saved[_local(t).untyped_storage().data_ptr()] = _local(t).untyped_storage().nbytes()
            return t

        inputs, targets = inputs_and_targets(batches(1)[0][:strategy.spec.micro_batch_size])
        loss_context = getattr(strategy, "_loss_context", nullcontext)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), loss_context():
            token_loss_sum(strategy.model(inputs), targets)
        strategy.optimizer.zero_grad(set_to_none=True)
        measured["activations"] = sum(saved.values())
    return measured


def assert_memory_close(measured: dict[str, int], estimate, what: str) -> None:
    for key in ("params", "grads", "optimizer"):
        assert abs(measured[key] - getattr(estimate, key)) <= STATE_RTOL * getattr(estimate, key), \
            f"{what}: {key} measured {measured[key]} vs estimated {getattr(estimate, key)}"
    if "activations" in measured:
        assert abs(measured["activations"] - estimate.activations) <= ACTIVATION_RTOL * measured["activations"], \
            f"{what}: activations measured {measured['activations']} vs estimated {estimate.activations}"


def plan_estimates(world: int) -> dict[str, list]:
    """What ``dtrain plan`` predicts for every rank of each MEMORY case (meta model, fake process group;
    activations without the checkpointing recompute, which a forward-only measurement cannot see)."""
    from dataclasses import replace

    from dtrain.dryrun import rank_memory
    from dtrain.parallel.memory import activation_bytes, activation_shape
    from dtrain.strategies.layout import parallel_dims

    out = {}
    for overrides in MEMORY:
        cfg = load_config(BASE + overrides, world)
        dims = parallel_dims(cfg.strategy.name, cfg.strategy, world)
        estimates = []
        for rank in range(world):
            estimate = rank_memory(cfg, dims, rank)
            forward_only = activation_bytes(activation_shape(cfg, dims, rank), include_recompute=False)
            estimates.append(replace(estimate, activations=forward_only))
        out[label(overrides)] = estimates
    return out


# --- checkpoints ---------------------------------------------------------------------------------

def save_and_expect(overrides: list[str], world: int, path: str) -> list[tuple[float, float]]:
    """Train a step (so the optimizer has state), save, then return the 2 steps an uninterrupted run takes
    next."""
    strategy = make(overrides, world)
    data = batches(3)
    step(strategy, data[0])
    dcp.save(strategy.state_dict(), checkpoint_id=path)
    expected = [step(strategy, b) for b in data[1:]]
    strategy.teardown()
    return expected


def resume_and_compare(overrides: list[str], world: int, path: str, expected, what: str) -> None:
    from dtrain.distributed import collectives

    strategy = make(overrides, world)
    state = strategy.state_dict()
    saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata.keys()
    # agreed by every rank before the collective load, so a rank that cannot load fails the case, not the group
    problems = [p for p in collectives.all_gather_object(checkpoint_mismatch(state, saved)) if p]
    if problems:
        strategy.teardown()
        raise AssertionError(f"{what}: {problems[0]}")
    dcp.load(state, checkpoint_id=path)
    strategy.load_state_dict(state)
    copies = gathered_tied_copies(strategy) if hasattr(strategy, "tied") else None
    got = [step(strategy, b) for b in batches(3)[1:]]
    strategy.teardown()
    if copies is not None:
        assert_copies_identical(*copies, f"{what}, after loading")
    for (loss, norm), (ref_loss, ref_norm) in zip(got, expected):
        assert abs(loss - ref_loss) <= LOSS_ATOL, f"{what}: loss {loss} vs {ref_loss}"
        assert abs(norm - ref_norm) <= NORM_RTOL * ref_norm, f"{what}: grad norm {norm} vs {ref_norm}"


def run_chain(chain: list[list[str]], world: int, root: str, results: dict) -> list[tuple[float, float]]:
    expected = None
    for index, overrides in enumerate(chain):
        if expected is not None:
            what = f"{label(chain[index - 1])} @{world} -> {label(overrides)} @{world}"
            results[what] = outcome(lambda: resume_and_compare(overrides, world, f"{root}/{index - 1}", expected, what))
        expected = save_and_expect(overrides, world, f"{root}/{index}")
    return expected


# --- the two process groups ------------------------------------------------------------------------

def _parity(cases, world: int, refs: dict, results: dict, steps: int = STEPS) -> None:
    data = batches(steps)
    for overrides, ref in cases:
        what = f"{label(overrides)} @{world}"
        reference = refs[ref] if steps == STEPS else refs[f"{ref}_{steps}"]
        results[what] = outcome(lambda: assert_matches(trajectory(overrides, world, data), reference, what))


def _four_rank_worker(rank: int, world: int, refs: dict, root: str, out: str) -> None:
    results: dict[str, str | None] = {}
    _parity(FOUR_RANKS, world, refs, results)
    _parity(FOUR_RANK_VARIANTS, world, refs, results, steps=VARIANT_STEPS)
    expected = run_chain(CHAIN_FOUR, world, root, results)
    results = every_rank(results)
    if rank == 0:
        torch.save({"results": results, "expected": expected}, out)


def _compile_worker(rank: int, world: int, refs: dict, out: str) -> None:
    """torch.compile per block, under FSDP2 (inductor on CPU; the first compile takes ~30 s on 2 cores)."""
    results = {"fsdp compile=true @2": outcome(lambda: assert_matches(
        trajectory(["strategy=fsdp", "strategy.compile=true"], world, batches(VARIANT_STEPS)),
        refs[f"tied_{VARIANT_STEPS}"], "fsdp compile"))}
    results = every_rank(results)
    if rank == 0:
        torch.save(results, out)


def _memory(cases, world: int, rank: int, plans: dict, results: dict) -> None:
    for overrides in cases:
        strategy = make(overrides, world)
        measured = measured_memory(strategy)
        strategy.teardown()
        what = f"memory {label(overrides)} @{world}"
        results[what] = outcome(lambda: assert_memory_close(measured, plans[label(overrides)][rank], what))


def _two_rank_worker(rank: int, world: int, refs: dict, root: str, from_four: dict, plans: dict, out: str) -> None:
    from dtrain.metrics.comm import CommCounter

    results: dict[str, str | None] = {}
    data = batches()
    _parity(TWO_RANKS, world, refs, results)
    _parity(TWO_RANK_VARIANTS, world, refs, results, steps=VARIANT_STEPS)
    # initial weights ignore the layout: every shard starts as its slice of the one-process weights
    for overrides in (["strategy=fsdp"], ["strategy=tp"]):
        sharded = make(overrides, world)
        shards = {name: p.to_local().detach().clone() for name, p in sharded.model.named_parameters()}
        sharded.teardown()
        what = f"init {label(overrides)} @{world}"
        results[what] = outcome(lambda: assert_slices_of(shards, refs["init"], rank, world, what))
    # the schedule runs backward itself: it must run outside autocast (only stage forwards are autocast)
    pp = make(["strategy=pp"], world, precision="bf16")
    seen: list[bool] = []
    for param in pp.view.parameters():
        param.register_hook(lambda grad: seen.append(torch.is_autocast_enabled("cpu")) or grad)
    step(pp, data[0])
    pp.teardown()
    results["pp bf16 backward outside autocast @2"] = outcome(lambda: assert_no_autocast(seen))
    # tensor parallelism never gathers the full logits: the loss runs on vocabulary shards (loss_parallel)
    tp = make(["strategy=tp", *BIG_MICRO], world)
    logits = tp.model(data[0][:4, :-1])
    tp.teardown()
    results["tp logits stay vocabulary-sharded @2"] = outcome(lambda: assert_vocab_sharded(logits, world))
    for overrides in PADDED:
        what = f"padded {label(overrides)} @{world}"
        results[what] = outcome(lambda: assert_matches(trajectory(overrides, world, padded_batches()),
                                                       refs["padded"], what))

    # bf16: not bit-comparable to fp32, but the same run within bf16 rounding (~3 significant digits)
    fsdp_bf16 = ["strategy=fsdp", "strategy.param_dtype=bf16", "strategy.reduce_dtype=fp32", *UNTIED]
    results["fsdp param_dtype=bf16 @2"] = outcome(lambda: assert_matches(
        trajectory(fsdp_bf16, world, data[:5]), refs["untied_5"], "fsdp bf16", loss_atol=3e-2, norm_rtol=5e-2))
    results["pp precision=bf16 @2"] = outcome(lambda: assert_matches(
        trajectory(["strategy=pp", *UNTIED], world, data[:5], precision="bf16"), refs["bf16_5"], "pp bf16",
        loss_atol=1e-2, norm_rtol=2e-2))

    # gradient reduction once per step, not once per micro-batch (8 / (2 x 2) = 2 micro-batches here)
    for overrides, kind, expected in ((["strategy=fsdp"], "reduce_scatter", 1 + 4),  # root + 4 block groups
                                      (["strategy=hsdp", "strategy.dp_replicate=2", "strategy.dp_shard=1"],
                                       "all_reduce", 1 + 4 + 3)):  # ... + target count, loss and grad norm
        strategy = make(overrides, world)
        step(strategy, data[0])  # the first step initializes lazily
        with CommCounter() as counter:
            step(strategy, data[1])
        strategy.teardown()
        results[f"{label(overrides)} syncs once"] = outcome(lambda: assert_calls(counter, kind, expected))
    # a tied pipeline adds one all-reduce per step (the embedding's gradient, between the two ends); a V
    # schedule holds both ends on one rank and adds none
    for schedule, extra in (("1F1B", 1), ("ZBVZeroBubble", 0)):
        counters = {}
        for tie in ("tied", "untied"):
            strategy = make(["strategy=pp", f"strategy.pp_schedule={schedule}", *(UNTIED if tie == "untied" else [])],
                            world)
            step(strategy, data[0])
            with CommCounter() as counters[tie]:
                step(strategy, data[1])
            strategy.teardown()
        results[f"pp {schedule} tied: {extra} extra all-reduce"] = outcome(
            lambda: assert_extra_all_reduces(counters["tied"], counters["untied"], extra, VOCAB * WIDTH * 4))

    _memory(MEMORY, world, rank, plans, results)
    run_chain(CHAIN_TWO, world, root, results)
    for overrides in FROM_FOUR:
        what = f"fsdp @4 -> {label(overrides)} @{world}"
        results[what] = outcome(lambda: resume_and_compare(overrides, world, from_four["path"], from_four["expected"],
                                                           what))
    results = every_rank(results)
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def references() -> dict:
    data = batches()
    initial = make(["strategy=single"], 1)
    refs = {"init": {name: p.detach().clone() for name, p in initial.model.named_parameters()},
            "tied": trajectory(["strategy=single"], 1, data),
            "untied": trajectory(["strategy=single", *UNTIED], 1, data),
            "untied_5": trajectory(["strategy=single", *UNTIED], 1, data[:5]),
            f"untied_{VARIANT_STEPS}": trajectory(["strategy=single", *UNTIED], 1, data[:VARIANT_STEPS]),
            f"tied_{VARIANT_STEPS}": trajectory(["strategy=single"], 1, data[:VARIANT_STEPS]),
            "padded": trajectory(["strategy=single", *UNTIED], 1, padded_batches()),
            "bf16_5": trajectory(["strategy=single", *UNTIED], 1, data[:5], precision="bf16")}
    losses = [loss for loss, _ in refs["untied"]["steps"]]
    assert losses[-1] < losses[0] - 0.3  # the runs learn, so parity is not trivially flat
    return refs


@pytest.fixture(scope="module")
def four_ranks(references, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("four")
    spawn_workers(_four_rank_worker, 4, references, str(root), str(root / "out.pt"), timeout=600)
    saved = torch.load(root / "out.pt")
    saved["path"] = str(root / str(len(CHAIN_FOUR) - 1))
    return saved


@pytest.fixture(scope="module")
def two_ranks(references, four_ranks, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("two")
    spawn_workers(_two_rank_worker, 2, references, str(root), four_ranks, plan_estimates(2), str(root / "out.pt"),
                  timeout=600)
    return torch.load(root / "out.pt")


@pytest.fixture(scope="module")
def compiled(references, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("compile") / "out.pt"
    spawn_workers(_compile_worker, 2, references, str(out), timeout=900)
    return torch.load(out)


@pytest.mark.parametrize("case", [f"{label(o)} @4" for o, _ in FOUR_RANKS + FOUR_RANK_VARIANTS])
def test_four_ranks_match_one_process(four_ranks, case):
    assert four_ranks["results"][case] is None, four_ranks["results"][case]


@pytest.mark.parametrize("case", [f"{label(o)} @2" for o, _ in TWO_RANKS + TWO_RANK_VARIANTS]
                         + ["fsdp param_dtype=bf16 @2", "pp precision=bf16 @2"]
                         + [f"padded {label(o)} @2" for o in PADDED]
                         + ["tp logits stay vocabulary-sharded @2", "pp bf16 backward outside autocast @2",
                            "init strategy=fsdp @2", "init strategy=tp @2"])
def test_two_ranks_match_one_process(two_ranks, case):
    assert two_ranks[case] is None, two_ranks[case]


@pytest.mark.slow
def test_compiled_blocks_match_one_process(compiled):
    assert compiled["fsdp compile=true @2"] is None, compiled["fsdp compile=true @2"]


@pytest.mark.parametrize("case", [f"memory {label(o)} @2" for o in MEMORY])
def test_memory_estimate_matches_what_ranks_allocate(two_ranks, case):
    """Parameters, gradients and optimizer state within 1% of the dry run's plan, saved activations
    within 5% of the estimate."""
    assert two_ranks[case] is None, two_ranks[case]


@pytest.mark.parametrize("case", ["strategy=fsdp syncs once", "strategy=hsdp dp_replicate=2 dp_shard=1 syncs once"])
def test_gradients_are_reduced_once_per_step_not_per_micro_batch(two_ranks, case):
    assert two_ranks[case] is None, two_ranks[case]


@pytest.mark.parametrize("case", ["pp 1F1B tied: 1 extra all-reduce", "pp ZBVZeroBubble tied: 0 extra all-reduce"])
def test_a_tied_pipeline_sums_the_embedding_gradient_with_one_all_reduce(two_ranks, case):
    """The copies' gradients are summed by exactly one all-reduce of the embedding's size per step (none
    where one rank holds both ends). That they stay bit-identical is checked after every parity run."""
    assert two_ranks[case] is None, two_ranks[case]


@pytest.mark.parametrize("case", [f"{label(a)} @4 -> {label(b)} @4" for a, b in zip(CHAIN_FOUR, CHAIN_FOUR[1:])]
                         + [f"{label(a)} @2 -> {label(b)} @2" for a, b in zip(CHAIN_TWO, CHAIN_TWO[1:])]
                         + [f"fsdp @4 -> {label(o)} @2" for o in FROM_FOUR])
def test_checkpoint_resumes_under_another_strategy_and_world_size(four_ranks, two_ranks, case):
    results = {**four_ranks["results"], **two_ranks}
    assert results[case] is None, results[case]


def test_a_checkpoint_of_another_model_is_refused_with_a_reason(tmp_path):
    """In one process: DCP needs no process group. A deeper model lacks entries; a tied checkpoint would
    even load into an untied model, so the model configs are compared too."""
    shallow = make(["strategy=single", "model.n_layer=2"], 1)
    dcp.save(shallow.state_dict(), checkpoint_id=str(tmp_path))
    deeper = make(["strategy=single"], 1)
    saved = dcp.FileSystemReader(str(tmp_path)).read_metadata().state_dict_metadata.keys()
    problem = checkpoint_mismatch(deeper.state_dict(), saved)
    assert problem is not None and "blocks.2" in problem and "different model" in problem, problem
    tied = load_config(BASE + ["strategy=single"], 1).model
    untied = load_config(BASE + ["strategy=single", *UNTIED, "model.dropout=0.1"], 1).model
    problems = model_change_problems(tied, untied)
    assert len(problems) == 1 and "model.tie_embeddings=True (now False)" in problems[0], problems
    assert "dropout" not in problems[0]  # harmless changes pass
