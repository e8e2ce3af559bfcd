"""One process, no process group: parallel degrees, config errors, pipeline rules, stage splits,
the activation estimate against autograd's own record, and ``dtrain plan`` for 1024 ranks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dtrain.config.errors import ConfigError
from dtrain.config.validate import load_config
from dtrain.distributed.parallel_dims import ParallelDims
from dtrain.models.gpt import GPT
from dtrain.models.gpt_plans import share_tied_weight, split_stage, stage_layer_counts, stages_view, tied_copies
from dtrain.parallel.activation_checkpoint import apply_ac
from dtrain.parallel.materialize import materialize
from dtrain.parallel.memory import activation_bytes, activation_shape
from dtrain.parallel.pipeline import schedule_problems, stage_ids, stage_owners
from dtrain.strategies.layout import parallel_dims


def test_minus_one_takes_the_rest_and_ranks_are_row_major_with_tp_innermost():
    dims = ParallelDims.resolve(16, pp=2, dp_shard=-1, tp=2)
    assert (dims.pp, dims.dp_replicate, dims.dp_shard, dims.tp, dims.dp) == (2, 1, 4, 2, 4)
    assert dims.coordinates(0) == {"pp": 0, "dp_replicate": 0, "dp_shard": 0, "cp": 0, "tp": 0}
    assert dims.coordinates(1)["tp"] == 1 and dims.coordinates(2)["dp_shard"] == 1
    assert dims.coordinates(8)["pp"] == 1
    for rank in range(16):
        assert dims.rank_at(**dims.coordinates(rank)) == rank
    # tp and pp peers read the same data slice; data-parallel peers read different ones
    assert dims.dp_rank(0) == dims.dp_rank(1) == dims.dp_rank(8) == 0
    assert sorted({dims.dp_rank(r) for r in range(16)}) == [0, 1, 2, 3]
    hsdp = ParallelDims.resolve(8, dp_replicate=2, dp_shard=-1)
    assert [hsdp.dp_rank(r) for r in range(8)] == list(range(8))


@pytest.mark.parametrize("world,degrees,message", [
    (8, dict(pp=2, dp_shard=3, tp=2), "parallel degrees pp=2 x dp_replicate=1 x dp_shard=3 x cp=1 x tp=2 multiply "
                                      "to 12, not the world size 8"),
    (6, dict(dp_shard=-1, tp=4), "world size 6 is not divisible by strategy.tp=4 (the degrees other than "
                                 "strategy.dp_shard=-1)"),
    (6, dict(dp_shard=-1, tp=2, pp=2), "world size 6 is not divisible by strategy.pp=2 x strategy.tp=2 = 4"),
    (4, dict(dp_shard=-1, tp=-1), "strategy.dp_shard=-1 and strategy.tp=-1: only one degree may be -1"),
    (4, dict(tp=0), "strategy.tp=0 must be a positive integer or -1"),
])
def test_degrees_that_do_not_fit_are_one_line_with_the_numbers(world, degrees, message):
    with pytest.raises(ConfigError) as info:
        ParallelDims.resolve(world, **degrees)
    assert message in info.value.render() and len(info.value.problems) == 1


BASE = ["run.name=t", "model=gpt_tiny"]


@pytest.mark.parametrize("overrides,world,expected", [
    (["strategy=fsdp_tp", "strategy.tp=3"], 4, "strategy=fsdp_tp: world size 4 is not divisible by strategy.tp=3"),
    (["strategy=3d", "strategy.dp_shard=3", "model.tie_embeddings=false"], 8, "multiply to 12, not the world size 8"),
    (["strategy=tp", "model.n_head=6", "model.d_model=96"], 4, "strategy.tp=4 does not divide model.n_head=6"),
    (["strategy=tp", "model.vocab_size=258"], 4, "strategy.tp=4 does not divide model.vocab_size=258"),
    (["strategy=tp", "data.seq_len=126"], 4, "data.seq_len=126 is not divisible by strategy.tp=4"),
    (["strategy=tp", "model.dropout=0.1"], 2, "model.dropout=0.1 under strategy.tp=2"),
    (["strategy=pp", "strategy.pp=8", "model.tie_embeddings=false", "trainer.micro_batch_size=2"], 8,
     "8 pipeline stages (pp x stages per rank) but model.n_layer=4"),
    (["strategy=pp", "model.tie_embeddings=false", "trainer.micro_batch_size=16"], 2,
     "strategy.pp_schedule=1F1B needs at least as many micro-batches as stages: 1 < 2"),
    (["strategy=pp", "model.tie_embeddings=false", "strategy.pp_schedule=DualPipeV", "trainer.micro_batch_size=8"],
     2, "strategy.pp_schedule=DualPipeV needs at least as many micro-batches as stages: 2 < 4"),
    (["strategy=pp", "model.tie_embeddings=false", "strategy.pp_schedule=ZeroBubble"], 2,
     "strategy.pp_schedule=ZeroBubble is not a pipeline schedule; choose one of: GPipe, 1F1B"),
    (["strategy=pp", "model.tie_embeddings=false", "strategy.microbatches=3"], 2,
     "strategy.microbatches=3 must divide the 4 micro-batches of a rank's step"),
    (["strategy=pp", "model.tie_embeddings=false", "strategy.pp_layers_per_stage=[3,2]"], 2,
     "strategy.pp_layers_per_stage=[3, 2] must be positive and sum to model.n_layer=4"),
    (["strategy=pp", "model.tie_embeddings=false", "strategy.pp_schedule=1F1B", "strategy.pp_stages_per_rank=2"],
     2, "strategy.pp_schedule=1F1B runs one stage per rank but strategy.pp_stages_per_rank=2"),
    (["strategy=pp", "model.tie_embeddings=false", "strategy.compile=true", "strategy.pp_schedule=ZBVZeroBubble"], 2,
     "strategy.compile=true cannot be used with strategy.pp_schedule=ZBVZeroBubble"),
    (["strategy=fsdp", "strategy.tp=2"], 4, "strategy=fsdp does not use strategy.tp=2; set it to 1 or use "
                                            "strategy=fsdp_tp or 3d"),
    (["strategy=tp", "strategy.param_dtype=bf16"], 2, "strategy.param_dtype/reduce_dtype are FSDP mixed precision"),
    (["strategy=fsdp", "strategy.activation_checkpointing=some"], 2,
     "strategy.activation_checkpointing=some is not one of: none, full, selective"),
])
def test_bad_parallel_config_is_one_clear_line(overrides, world, expected):
    with pytest.raises(ConfigError) as info:
        load_config(BASE + overrides, world)
    rendered = info.value.render()
    assert expected in rendered, rendered
    assert len(info.value.problems) == 1, info.value.problems


def test_good_configs_resolve_their_data_parallel_size():
    for overrides, world, dp in ((["strategy=fsdp"], 4, 4), (["strategy=hsdp", "strategy.dp_shard=2"], 8, 8),
                                 (["strategy=tp"], 4, 1), (["strategy=fsdp_tp"], 8, 4),
                                 (["strategy=3d"], 8, 2)):
        cfg = load_config(BASE + overrides + ["trainer.global_batch_size=32"], world)
        assert parallel_dims(cfg.strategy.name, cfg.strategy, world).dp == dp, overrides


def test_stage_placement_loop_and_v():
    assert [stage_ids(r, 4, 1, "1F1B") for r in range(4)] == [[0], [1], [2], [3]]
    assert [stage_ids(r, 2, 2, "Interleaved1F1B") for r in range(2)] == [[0, 2], [1, 3]]
    assert [stage_ids(r, 2, 2, "ZBVZeroBubble") for r in range(2)] == [[0, 3], [1, 2]]
    assert stage_owners(2, 2, "DualPipeV") == [0, 1, 1, 0]
    assert stage_layer_counts(10, 4) == [3, 3, 2, 2] and stage_layer_counts(4, 2, [1, 3]) == [1, 3]


@pytest.mark.parametrize("schedule,pp,per_rank,micro,ok", [
    ("GPipe", 4, 1, 1, True), ("1F1B", 4, 1, 3, False), ("1F1B", 4, 1, 4, True),
    ("Interleaved1F1B", 2, 2, 6, True), ("Interleaved1F1B", 4, 2, 9, False), ("LoopedBFS", 2, 3, 1, True),
    ("ZBVZeroBubble", 2, 2, 4, True), ("ZBVZeroBubble", 2, 3, 4, False), ("DualPipeV", 2, 2, 3, False),
])
def test_schedule_rules(schedule, pp, per_rank, micro, ok):
    assert (schedule_problems(schedule, pp, per_rank, micro) == []) is ok


def test_a_stage_keeps_only_its_blocks_and_the_full_model_names():
    with torch.device("meta"):
        model = GPT(vocab_size=64, seq_len=16, n_layer=4, n_head=4, d_model=32, tie_embeddings=False)
    counts = stage_layer_counts(4, 2)
    first, last = split_stage(model, 0, counts), split_stage(model, 1, counts)
    assert list(first.blocks.keys()) == ["0", "1"] and first.lm_head is None and first.ln_f is None
    assert list(last.blocks.keys()) == ["2", "3"] and last.wte is None and last.wpe is None
    full = {n for n, _ in model.named_parameters()}
    assert {n for n, _ in first.named_parameters()} | {n for n, _ in last.named_parameters()} == full
    view = stages_view([first, last])
    assert {n for n, _ in view.named_parameters()} == full
    assert view.blocks["2"] is last.blocks["2"]  # the same modules, not copies


def test_a_tied_split_gives_the_last_stage_a_copy_named_like_the_whole_model():
    with torch.device("meta"):
        model = GPT(vocab_size=64, seq_len=16, n_layer=4, n_head=4, d_model=32)  # tied, the default
    first, last = (split_stage(model, stage, [2, 2]) for stage in (0, 1))
    for part in (first, last):
        materialize(part, torch.device("cpu"), 3)
    # its own Parameter, initialized to the embedding's values
    assert last.lm_head.weight is not first.wte.weight and torch.equal(last.lm_head.weight, first.wte.weight)
    # named wte.weight for the optimizer, and both names in the state dict, exactly as in the whole tied model
    view = stages_view([last])
    assert [n for n, _ in view.named_parameters() if not n.startswith("blocks")] == ["wte.weight", "ln_f.weight",
                                                                                       "ln_f.bias"]
    whole = {n for n in model.state_dict() if not n.startswith("blocks")}
    assert {n for n in view.state_dict() if not n.startswith("blocks")} == whole - {"wpe.weight"}
    # one rank holding both ends (a V) shares one Parameter, as the whole model does
    v_first, v_last = (split_stage(model, stage, [1, 1, 1, 1]) for stage in (0, 3))
    assert len(tied_copies([v_first, v_last])) == 2
    share_tied_weight([v_first, v_last])
    assert v_last.lm_head.weight is v_first.wte.weight and tied_copies([v_first, v_last]) == [v_first.wte.weight]


@pytest.mark.parametrize("overrides,world,pp_rank,params_vs_untied,unstepped", [
    (["strategy=pp"], 2, 1, 0, 0),  # the last stage's copy costs what an untied head costs
    (["strategy=pp", "strategy.pp_schedule=ZBVZeroBubble"], 2, 0, -1, 0),  # both ends on rank 0: one Parameter
    (["strategy=pp_fsdp", "strategy.pp_schedule=ZBVZeroBubble"], 4, 0, 0, 0.5),  # two FSDP shards, one stepped
], ids=["1F1B", "ZBV", "pp_fsdp ZBV"])
def test_the_plan_counts_the_copies_of_a_tied_embedding(overrides, world, pp_rank, params_vs_untied, unstepped):
    """Against the untied model: in embedding matrices (V x d x 4 bytes), how many more parameters the rank
    holds and how many it holds without AdamW state (a follower copy)."""
    from dtrain.dryrun import rank_memory

    common = BASE + ["data=synthetic", "data.seq_len=16", "data.vocab_size=64", "model.d_model=32",
                     "trainer.global_batch_size=16", *overrides]
    tied, untied = (load_config(common + extra, world) for extra in ([], ["model.tie_embeddings=false"]))
    dims = parallel_dims(tied.strategy.name, tied.strategy, world)
    rank = dims.rank_at(pp=pp_rank)
    got, base = rank_memory(tied, dims, rank), rank_memory(untied, dims, rank)
    matrix = 64 * 32 * 4
    assert got.params - base.params == params_vs_untied * matrix
    assert got.optimizer == 2 * (got.params - unstepped * matrix), (got, base)


def _saved_activation_bytes(model: nn.Module, tokens: torch.Tensor) -> int:
    """What autograd keeps for backward: unique storages handed to the saved-tensor hooks, parameters
    excluded."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t, nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("overrides", [[], ["model.n_layer=3", "model.d_model=96"], ["trainer.micro_batch_size=4"],
                                       ["strategy.activation_checkpointing=full"]])
def test_activation_estimate_matches_what_autograd_saves(overrides):
    cfg = load_config(["run.name=t", "strategy=single", "data=synthetic", "data.seq_len=32", "data.vocab_size=256",
                       "model.n_layer=2", "model.d_model=64", "trainer.micro_batch_size=2",
                       "model.tie_embeddings=false", *overrides], 1)
    m = cfg.model
    model = GPT(m.vocab_size, m.seq_len, n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model, tie_embeddings=False)
    materialize(model, torch.device("cpu"), 0)
    apply_ac(model.blocks, cfg.strategy.activation_checkpointing)
    tokens = torch.randint(0, m.vocab_size, (cfg.trainer.micro_batch_size, 33))
    measured = _saved_activation_bytes(model, tokens)
    # the recompute of one block during backward is not visible at the end of forward
    estimate = activation_bytes(activation_shape(cfg, ParallelDims(), 0), include_recompute=False)
    assert abs(estimate - measured) <= 0.02 * measured, (estimate, measured)


def test_plan_shows_1024_ranks_in_one_process(capsys):
    from dtrain.cli import run

    code = run(["plan", "--world-size", "1024", "--rank", "37", "strategy=3d", "strategy.tp=4", "strategy.pp=4",
                "model=gpt2_124m", "model.tie_embeddings=false", "trainer.global_batch_size=1024",
                "trainer.micro_batch_size=2", "data.seq_len=1024"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "mesh: pp=4 x dp_replicate=1 x dp_shard=64 x cp=1 x tp=4" in out
    assert "tp groups of 4 (stride 1), e.g. ranks 0, 1, 2, 3" in out
    assert "pp groups of 4 (stride 256), e.g. ranks 0, 256, 512, 768" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "-" in line.split()[1]]
    assert [row[1] for row in rows] == ["0-255", "256-511", "512-767", "768-1023"]
    assert "rank 37: pp=0/4, dp_replicate=0/1, dp_shard=9/64, cp=0/1, tp=1/4; reads data slice 9 of 64" in out
    # the head's rows are split 4 ways by tp, then 64 ways by FSDP: 50304 / 4 = 12576 -> 197 rows on rank 37
    assert "wte.weight" in out and "local (197, 768)" in out
    assert "lm_head.weight" not in out  # rank 37 is on the first stage


def test_plan_refuses_a_layout_the_model_cannot_take(capsys):
    from dtrain.cli import run

    code = run(["plan", "--world-size", "64", "strategy=fsdp_tp", "strategy.tp=8", "model=gpt2_124m",
                "trainer.global_batch_size=256"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "dtrain: config error: strategy.tp=8 does not divide model.n_head=12; pick a tp degree " \
                          "that divides it"


def _tp_collectives_of_one_micro_batch(n_layer: int) -> dict[str, dict[str, int]]:
    """Forward and backward of a sequence-parallel tp=2 GPT as rank 0 of torch's fake process group
    (collectives return at once; what is issued is counted)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import loss_parallel

    from dtrain.metrics.comm import CommCounter
    from dtrain.models.gpt_plans import apply_tp

    dist.init_process_group("fake", rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("tp",))
        with torch.device("meta"):
            model = GPT(vocab_size=64, seq_len=16, n_layer=n_layer, n_head=4, d_model=32, tie_embeddings=False)
        apply_tp(model, mesh, sequence_parallel=True)
        materialize(model, torch.device("cpu"), seed=0)
        tokens = torch.randint(0, 64, (2, 16))
        with CommCounter() as counter, loss_parallel():
            F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
        return counter.summary()
    finally:
        dist.destroy_process_group()


def test_sequence_parallel_layer_gathers_and_scatters_each_module_once_each_way():
    """Megatron-SP per layer: forward all-gathers the attention's and the MLP's input and reduce-scatters
    their outputs; backward mirrors it (one reduce-scatter of each module's summed input gradient, not one
    all-reduce per q/k/v projection) -- 4 all-gathers, 4 reduce-scatters, no all-reduce per layer."""
    one, two = _tp_collectives_of_one_micro_batch(1), _tp_collectives_of_one_micro_batch(2)
    per_layer = {kind: two.get(kind, {}).get("calls", 0) - one.get(kind, {}).get("calls", 0)
                 for kind in set(one) | set(two)}
    assert {k: v for k, v in per_layer.items() if v} == {"all_gather": 4, "reduce_scatter": 4}, (one, two)
