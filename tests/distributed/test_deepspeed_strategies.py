"""DeepSpeed strategies against one process on real gloo groups: losses and gradient norms, one gradient
reduction per step, the shared checkpoint layout, and checkpoints that move between DeepSpeed and
native strategies and world sizes.

The machinery is test_parallel_strategies.py's (same batches, references from ``strategy=single``, one
process group per world size running every case, outcomes merged over ranks). DeepSpeed compiles no
op here: the client AdamW needs no FusedAdam/CPUAdam, and the CPU shared-memory comm op is skipped; the
last test checks that the per-session TORCH_EXTENSIONS_DIR (tests/conftest.py) stayed empty.

The chain zero2@2 -> fsdp@2 -> zero3@1 -> ddp@2 -> ds_tp@2 is one continuous run: each link resumes
the previous link's checkpoint, takes the next step and saves, and every step must equal the
uninterrupted single-process run's. A world size of 1 needs its own process group, so the chain
spans three: 2 ranks (parity, then the chain to fsdp), 1 rank (zero3), 2 ranks again (ddp, ds_tp).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dtrain.models.generate import generate
from dtrain.strategies.state import checkpoint_mismatch
from tests.distributed.test_parallel_strategies import (BIG_MICRO, LOSS_ATOL, NORM_RTOL, ONE_MICRO, SEQ, STEPS, UNTIED,
                                                        VARIANT_STEPS, assert_matches, batches, every_rank, label, make,
                                                        outcome, padded_batches, run_chain, step, trajectory)
from tests.helpers import spawn_workers

OFFLOAD = ["strategy.offload_optimizer=cpu"]
# Larger micro-batches where per-micro-batch communication dominates a tiny model's step on 2 cores
# (ZeRO-3 gathers every layer, AutoTP all-reduces every block); zero1 and zero2 keep 2 micro-batches per
# rank, and the sync tests below run every family with 2 and with 1.
ZERO3, PIPE, AUTOTP = ["strategy=zero3", *BIG_MICRO], ["strategy=ds_pp", *BIG_MICRO], ["strategy=ds_tp", *ONE_MICRO]
# (overrides, reference) for STEPS steps at 2 ranks; ds_pp and ds_tp keep the embedding and head tied
TWO_RANKS = [
    (["strategy=zero1"], "tied"),
    (["strategy=zero2"], "tied"),
    (ZERO3, "tied"),
    (["strategy=zero2", *OFFLOAD], "tied"),
    (PIPE, "tied"),
    (AUTOTP, "tied"),
]
TWO_RANK_VARIANTS = [
    (["strategy=zero1", *OFFLOAD], "tied"),
    ([*ZERO3, *OFFLOAD, "strategy.offload_param=cpu"], "tied"),
    ([*PIPE, *UNTIED], "untied"),
    ([*AUTOTP, "strategy.zero_stage=0"], "tied"),
    ([*AUTOTP, "strategy.zero_stage=3"], "tied"),
]
PADDED = [["strategy=zero2", *UNTIED], [*PIPE, *UNTIED], [*AUTOTP, *UNTIED]]
# ZeRO stage 0 with data parallelism: ds_tp with no tensor parallelism
STAGE0_DP = ["strategy=ds_tp", "strategy.tp=1", "strategy.zero_stage=0"]
# collective that carries the gradients, per case
SYNC = [(["strategy=zero1"], "all_reduce"), (["strategy=zero2"], "all_reduce"), (["strategy=zero3"], "reduce_scatter"),
        (STAGE0_DP, "all_reduce")]
# layouts compared key by key with a native checkpoint of the same model
LAYOUTS = [["strategy=zero2"], ZERO3, PIPE, AUTOTP]
# pairwise: each resumes the previous one's checkpoint and continues its steps
PAIRS = [PIPE, [*ZERO3, *OFFLOAD], [*AUTOTP, "strategy.zero_stage=2"], ["strategy=zero1"]]
CHAIN = [(["strategy=zero2"], 2), (["strategy=fsdp"], 2), (ZERO3, 1), (["strategy=ddp"], 2), (AUTOTP, 2)]
SAMPLE_PROMPT = [5, 9, 13]
# tensor- or pipeline-parallel 2 x data-parallel 2 (micro-batches of 4 and 2: one and two per rank)
FOUR_RANKS = [
    (["strategy=zero2"], "tied"),
    (["strategy=ds_tp", "strategy.tp=2", *BIG_MICRO], "tied"),
    (["strategy=ds_tp", "strategy.tp=2", "strategy.zero_stage=3", *BIG_MICRO], "tied"),
    (["strategy=ds_pp", "strategy.pp=2"], "tied"),
]


def chain_link(index: int, root: str, reference: list, results: dict) -> None:
    """Link ``index`` of CHAIN: resume link ``index - 1``'s checkpoint (if any), take step ``index``, save."""
    overrides, world = CHAIN[index]
    what = f"chain {label(overrides)}@{world} step {index + 1}"
    strategy = make(overrides, world)
    if index:
        state = strategy.state_dict()
        saved = dcp.FileSystemReader(f"{root}/{index - 1}").read_metadata().state_dict_metadata.keys()
        results[what + " layout"] = outcome(lambda: _assert_none(checkpoint_mismatch(state, saved)))
        dcp.load(state, checkpoint_id=f"{root}/{index - 1}")
        strategy.load_state_dict(state)
    loss, norm = step(strategy, batches(index + 1)[index])
    ref_loss, ref_norm = reference[index]
    results[what] = outcome(lambda: _assert_close(loss, norm, ref_loss, ref_norm, what))
    dcp.save(strategy.state_dict(), checkpoint_id=f"{root}/{index}")
    strategy.teardown()


def _assert_none(problem: str | None) -> None:
    assert problem is None, problem


def _assert_close(loss: float, norm: float, ref_loss: float, ref_norm: float, what: str) -> None:
    assert abs(loss - ref_loss) <= LOSS_ATOL, f"{what}: loss {loss} vs {ref_loss}"
    assert abs(norm - ref_norm) <= NORM_RTOL * ref_norm, f"{what}: grad norm {norm} vs {ref_norm}"


def _parity(cases, world: int, refs: dict, results: dict, steps: int = STEPS) -> None:
    data = batches(steps)
    for overrides, ref in cases:
        what = f"{label(overrides)} @{world}"
        reference = refs[ref] if steps == STEPS else refs[f"{ref}_{steps}"]
        results[what] = outcome(lambda: assert_matches(trajectory(overrides, world, data), reference, what))


def _sync_counts(overrides: list[str], world: int, kind: str) -> tuple[int, int]:
    """Calls of ``kind`` in one step with 2 micro-batches per rank, and with 1."""
    from dtrain.metrics.comm import CommCounter

    counts = []
    for micro in (2, 4):
        strategy = make([*overrides, f"trainer.micro_batch_size={micro}"], world)
        data = batches(2)
        step(strategy, data[0])
        with CommCounter() as counter:
            step(strategy, data[1])
        strategy.teardown()
        counts.append(counter.calls[kind])
    return counts[0], counts[1]


def _assert_sync_once(counts: tuple[int, int], kind: str) -> None:
    assert counts[0] == counts[1] and counts[0] > 0, \
        f"{counts[0]} {kind} calls in a step of 2 micro-batches, {counts[1]} with 1: gradients reduced per micro-batch"


def _metadata(path: str) -> dict[str, tuple | None]:
    """Every entry of a DCP checkpoint: its global shape (tensors) or None (other values)."""
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return {key: tuple(value.size) if hasattr(value, "size") else None for key, value in meta.items()}


def _assert_same_layout(got: dict, native: dict, what: str) -> None:
    missing, extra = sorted(set(native) - set(got)), sorted(set(got) - set(native))
    assert not missing and not extra, f"{what}: missing {missing[:5]}, extra {extra[:5]}"
    shapes = [key for key in native if native[key] != got[key]]
    assert not shapes, f"{what}: other shapes for {shapes[:5]}"


def _two_rank_worker(rank: int, world: int, refs: dict, root: str, out: str) -> None:
    results: dict[str, str | None] = {}
    _parity(TWO_RANKS, world, refs, results)
    _parity(TWO_RANK_VARIANTS, world, refs, results, steps=VARIANT_STEPS)
    for overrides in PADDED:
        what = f"padded {label(overrides)} @{world}"
        results[what] = outcome(lambda: assert_matches(trajectory(overrides, world, padded_batches()),
                                                       refs["padded"], what))
    results["zero2 precision=bf16 @2"] = outcome(lambda: assert_matches(
        trajectory(["strategy=zero2", *UNTIED], world, batches(5), precision="bf16"), refs["bf16_5"], "zero2 bf16",
        loss_atol=1e-2, norm_rtol=2e-2))
    # text sampling decodes on every rank in lockstep: ZeRO-3 gathers parameters, AutoTP's head is whole
    for overrides in (ZERO3, AUTOTP):
        strategy = make(overrides, world)
        step(strategy, batches(1)[0])
        tokens = generate(strategy.sampling_model(), SAMPLE_PROMPT, 6, SEQ, temperature=0.0)
        strategy.teardown()
        results[f"sample {label(overrides)}"] = outcome(lambda: _assert_same_tokens(tokens, refs["sample"]))
    for overrides, kind in SYNC:
        counts = _sync_counts(overrides, world, kind)
        results[f"{label(overrides)} syncs once"] = outcome(lambda: _assert_sync_once(counts, kind))
    # the layout: the same entries and global shapes as a native checkpoint of the same model
    native = make(["strategy=ddp"], world)
    dcp.save(native.state_dict(), checkpoint_id=f"{root}/native")
    native.teardown()
    for overrides in LAYOUTS:
        strategy = make(overrides, world)
        dcp.save(strategy.state_dict(), checkpoint_id=f"{root}/layout")
        strategy.teardown()
        results[f"layout {label(overrides)}"] = outcome(lambda: _assert_same_layout(
            _metadata(f"{root}/layout"), _metadata(f"{root}/native"), label(overrides)))
    run_chain(PAIRS, world, f"{root}/pairs", results)
    # a deeper model than the checkpoint's is refused with the reason, before any tensor is read
    deeper = make(["strategy=zero2", "model.n_layer=6"], world)
    problem = checkpoint_mismatch(deeper.state_dict(), _metadata(f"{root}/pairs/0"))
    deeper.teardown()
    results["zero2 refuses another model's checkpoint"] = outcome(
        lambda: _assert_refused(problem))
    for index in (0, 1):
        chain_link(index, f"{root}/chain", refs["tied"]["steps"], results)
    results = every_rank(results)
    if rank == 0:
        torch.save(results, out)


def _assert_same_tokens(tokens: list[int], reference: list[int]) -> None:
    assert tokens == reference, f"greedy sample {tokens} vs one process's {reference}"


def _assert_refused(problem: str | None) -> None:
    assert problem is not None and "blocks.4" in problem and "different model" in problem, problem


def _one_rank_worker(rank: int, world: int, refs: dict, root: str, out: str) -> None:
    results: dict[str, str | None] = {}
    chain_link(2, f"{root}/chain", refs["tied"]["steps"], results)
    torch.save(results, out)


def _two_rank_again_worker(rank: int, world: int, refs: dict, root: str, out: str) -> None:
    results: dict[str, str | None] = {}
    for index in (3, 4):
        chain_link(index, f"{root}/chain", refs["tied"]["steps"], results)
    # a DeepSpeed checkpoint of 1 rank resumed by DeepSpeed at 2, no conversion step in between
    strategy = make(["strategy=zero1"], world)
    state = strategy.state_dict()
    dcp.load(state, checkpoint_id=f"{root}/chain/2")
    strategy.load_state_dict(state)
    loss, norm = step(strategy, batches(4)[3])
    strategy.teardown()
    ref_loss, ref_norm = refs["tied"]["steps"][3]
    results["zero3@1 -> zero1@2"] = outcome(lambda: _assert_close(loss, norm, ref_loss, ref_norm, "zero3@1 -> zero1@2"))
    results = every_rank(results)
    if rank == 0:
        torch.save(results, out)


def _four_rank_worker(rank: int, world: int, refs: dict, out: str) -> None:
    results: dict[str, str | None] = {}
    _parity(FOUR_RANKS, world, refs, results)
    results = every_rank(results)
    if rank == 0:
        torch.save(results, out)


@pytest.fixture(scope="module")
def references() -> dict:
    data = batches()
    single = make(["strategy=single"], 1)
    step(single, data[0])
    sample = generate(single.sampling_model(), SAMPLE_PROMPT, 6, SEQ, temperature=0.0)
    return {"sample": sample,
            "tied": trajectory(["strategy=single"], 1, data),
            f"tied_{VARIANT_STEPS}": trajectory(["strategy=single"], 1, data[:VARIANT_STEPS]),
            f"untied_{VARIANT_STEPS}": trajectory(["strategy=single", *UNTIED], 1, data[:VARIANT_STEPS]),
            "padded": trajectory(["strategy=single", *UNTIED], 1, padded_batches()),
            "bf16_5": trajectory(["strategy=single", *UNTIED], 1, data[:5], precision="bf16")}


@pytest.fixture(scope="module")
def ranks(references, tmp_path_factory) -> dict:
    """All three process groups, in chain order; every case's outcome by name."""
    root = tmp_path_factory.mktemp("deepspeed")
    outcomes = {}
    for worker, world in ((_two_rank_worker, 2), (_one_rank_worker, 1), (_two_rank_again_worker, 2)):
        out = root / f"{worker.__name__}.pt"
        spawn_workers(worker, world, references, str(root), str(out), timeout=900)
        outcomes.update(torch.load(out))
    return outcomes


@pytest.fixture(scope="module")
def four_ranks(references, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("deepspeed4") / "out.pt"
    spawn_workers(_four_rank_worker, 4, references, str(out), timeout=1800)
    return torch.load(out)


@pytest.mark.parametrize("case", [f"{label(o)} @2" for o, _ in TWO_RANKS + TWO_RANK_VARIANTS]
                         + [f"padded {label(o)} @2" for o in PADDED] + ["zero2 precision=bf16 @2"])
def test_two_ranks_match_one_process(ranks, case):
    assert ranks[case] is None, ranks[case]


@pytest.mark.parametrize("case", [f"sample {label(o)}" for o in (ZERO3, AUTOTP)])
def test_text_sampling_decodes_in_lockstep_like_one_process(ranks, case):
    assert ranks[case] is None, ranks[case]


@pytest.mark.parametrize("case", [f"{label(o)} syncs once" for o, _ in SYNC])
def test_gradients_are_reduced_once_per_step_not_per_micro_batch(ranks, case):
    assert ranks[case] is None, ranks[case]


@pytest.mark.parametrize("case", [f"layout {label(o)}" for o in LAYOUTS])
def test_checkpoint_layout_is_the_native_one(ranks, case):
    assert ranks[case] is None, ranks[case]


@pytest.mark.parametrize("case", [f"{label(a)} @2 -> {label(b)} @2" for a, b in zip(PAIRS, PAIRS[1:])]
                         + ["zero3@1 -> zero1@2", "zero2 refuses another model's checkpoint"])
def test_checkpoints_move_between_deepspeed_strategies_and_world_sizes(ranks, case):
    assert ranks[case] is None, ranks[case]


@pytest.mark.parametrize("case", [f"chain {label(o)}@{w} step {i + 1}" for i, (o, w) in enumerate(CHAIN)]
                         + [f"chain {label(o)}@{w} step {i + 1} layout" for i, (o, w) in enumerate(CHAIN) if i])
def test_chain_between_deepspeed_and_native_continues_the_uninterrupted_run(ranks, case):
    assert ranks[case] is None, ranks[case]


def test_no_deepspeed_op_was_compiled(ranks):
    """A JIT compile takes minutes on 2 cores and leaves a lock that hangs later runs if killed."""
    built = list(Path(os.environ["TORCH_EXTENSIONS_DIR"]).iterdir())
    assert not built, f"DeepSpeed compiled {[p.name for p in built]}"


@pytest.mark.slow
@pytest.mark.parametrize("case", [f"{label(o)} @4" for o, _ in FOUR_RANKS])
def test_four_ranks_match_one_process(four_ranks, case):
    assert four_ranks[case] is None, four_ranks[case]
