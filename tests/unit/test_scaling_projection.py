"""The projection: closed-form pieces, monotone behaviour, bad input, and the published-runs validation."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest

from dtrain.config.errors import ConfigError
from dtrain.scaling.case import parse
from dtrain.scaling.hardware import preset_names, resolve
from dtrain.scaling.projection import Timer, model_flops_per_token, project
from dtrain.scaling.published import check, load_rows
from tests.helpers import REPO, subprocess_env

BASE = {"model": {"layers": 24, "hidden": 2048, "heads": 16, "vocab": 51200, "seq_len": 2048},
        "parallel": {"gpus": 8, "tp": 1, "pp": 1, "vpp": 1, "cp": 1, "micro_batch": 4, "global_batch": 64,
                     "zero": 0, "sequence_parallel": False, "recompute": "none", "dp_overlap": True},
        "precision": "bf16", "hardware": "h100_sxm"}


def case(**changes):
    """BASE with dotted changes, e.g. case(**{"parallel.gpus": 16})."""
    doc = copy.deepcopy(BASE)
    for key, value in changes.items():
        block, _, field = key.partition(".")
        if field:
            doc[block][field] = value
        else:
            doc[block] = value
    return doc


def run(**changes):
    return project(parse(case(**changes)))


def test_model_flops_match_the_trainers_count():
    """The projection and the trainer's MFU (GPT.flops_per_token: 6N + 12 L d T) count the same FLOPs."""
    from dtrain.models.gpt import GPT

    gpt = GPT(vocab_size=512, seq_len=256, n_layer=3, n_head=4, d_model=128, tie_embeddings=False)
    shape = parse(case(model={"layers": 3, "hidden": 128, "heads": 4, "vocab": 512, "seq_len": 256})).model
    assert model_flops_per_token(shape) == pytest.approx(gpt.flops_per_token(256))


def test_megatron_flop_formula_with_full_recompute():
    """Hardware TFLOP/s x step time is Megatron's 96 B s l h^2 (1 + s/6h + V/16lh) per GPU."""
    r = run(**{"parallel.recompute": "full"})
    b, s, layers, h, v = 64, 2048, 24, 2048, 51200
    flops = 96 * b * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h))
    assert r.hardware_tflops_per_gpu * 1e12 * r.step_time_s * 8 == pytest.approx(flops, rel=1e-9)


def test_ring_collective_cost_in_a_node_and_across_nodes():
    hw = resolve("a100_80gb")
    timer = Timer(hw, "fp16", 8)
    size = 1e9
    inside = timer.collective("all_reduce", size, 8, 1)
    expected = 2 * 7 / 8 * size / (300e9 * hw.nvlink_efficiency) + 2 * 7 * hw.nvlink_latency_us * 1e-6
    assert inside == pytest.approx(expected)
    # one GPU per node in the group (tp=8 fills the node): each ring crosses nodes through its own NIC
    across = timer.collective("all_reduce", size, 4, 8)
    assert across == pytest.approx(2 * 3 / 4 * size / (25e9 * hw.nic_efficiency) + 2 * 2 * hw.nic_latency_us * 1e-6)
    # all 8 GPUs of each node in the group: 8 rails, bounded by NVLink
    rails = timer.collective("all_gather", size, 32, 1)
    assert rails == pytest.approx(31 / 32 * size / min(300e9 * 0.8, 8 * 25e9 * hw.nic_efficiency)
                                  + (7 * hw.nvlink_latency_us + 3 * hw.nic_latency_us) * 1e-6)


def test_pipeline_bubble_follows_p_minus_1_over_m_v():
    tiny_head = {"layers": 32, "hidden": 4096, "heads": 32, "vocab": 256, "seq_len": 2048}
    for vpp, microbatches in ((1, 8), (1, 32), (2, 8)):
        r = run(model=tiny_head, **{"parallel.pp": 4, "parallel.vpp": vpp, "parallel.gpus": 4,
                                    "parallel.micro_batch": 1, "parallel.global_batch": microbatches})
        parts = r.breakdown_s
        slot = (parts["compute"] + parts["tp"] + parts["cp"]) / microbatches  # one micro-batch on a stage
        assert parts["bubble"] == pytest.approx(3 / vpp * slot, rel=0.01), (vpp, microbatches)
        busy = r.step_time_s - parts["bubble"]
        assert r.bubble_fraction == pytest.approx(parts["bubble"] / (parts["bubble"] + busy))
    assert r.bubble_fraction < run(model=tiny_head, **{"parallel.pp": 4, "parallel.gpus": 4, "parallel.micro_batch": 1,
                                                       "parallel.global_batch": 8}).bubble_fraction


def test_recompute_and_sequence_parallelism_trade_time_for_memory():
    none, selective, full = (run(**{"parallel.recompute": r}) for r in ("none", "selective", "full"))
    assert none.step_time_s < selective.step_time_s < full.step_time_s
    assert none.memory_gib_per_gpu > full.memory_gib_per_gpu
    tp = {"parallel.tp": 8, "parallel.global_batch": 8, "model.attention": "unfused"}
    assert run(**tp, **{"parallel.sequence_parallel": True}).memory_gib_per_gpu < run(**tp).memory_gib_per_gpu
    memories = [run(**{"parallel.zero": z}).memory_gib_per_gpu for z in (0, 1, 2, 3)]
    assert memories == sorted(memories, reverse=True)


def test_communication_share_grows_with_scale_and_shrinks_with_bandwidth():
    doc = case(**{"parallel.zero": 3})
    results = [project(parse(doc).with_gpus(g)) for g in (8, 128, 1024)]
    fractions = [r.exposed_comm_fraction for r in results]
    assert fractions == sorted(fractions)
    slow = case(**{"parallel.gpus": 64, "parallel.global_batch": 512, "parallel.dp_overlap": False,
                   "hardware": {"preset": "h100_sxm", "nic_gbps_per_gpu": 12.5}})
    fast = case(**{"parallel.gpus": 64, "parallel.global_batch": 512, "parallel.dp_overlap": False})
    assert project(parse(slow)).comm_fraction_by_dim["dp"] > project(parse(fast)).comm_fraction_by_dim["dp"] > 0
    assert project(parse(slow)).step_time_s > project(parse(fast)).step_time_s


def test_overlap_hides_data_parallel_gradients():
    kw = {"parallel.gpus": 64, "parallel.global_batch": 256}
    hidden = run(**kw, **{"parallel.dp_overlap": True})
    exposed = run(**kw, **{"parallel.dp_overlap": False})
    assert hidden.comm_fraction_by_dim["dp"] < 0.5 * exposed.comm_fraction_by_dim["dp"]


def test_with_gpus_keeps_the_batch_per_replica():
    c = parse(case()).with_gpus(64)
    assert (c.parallel.gpus, c.parallel.global_batch, c.parallel.microbatches) == (64, 512, 2)
    strong = parse(case()).with_gpus(16, keep_global_batch=True)
    assert strong.parallel.global_batch == 64 and strong.parallel.microbatches == 1


@pytest.mark.parametrize("changes,expected", [
    ({"parallel.gpus": 12, "parallel.tp": 8}, "parallel.gpus=12 is not divisible by tp x pp x cp = 8 x 1 x 1 = 8"),
    ({"parallel.tp": 3, "parallel.gpus": 3}, "model.heads=16 is not divisible by parallel.tp=3"),
    ({"parallel.pp": 5, "parallel.gpus": 5, "parallel.global_batch": 20},
     "model.layers=24 does not split into pp x vpp"),
    ({"parallel.global_batch": 60}, "parallel.global_batch=60 is not divisible by micro_batch x dp = 4 x 8 = 32"),
    ({"hardware": "b200_nope"}, "unknown hardware preset 'b200_nope'; choose one of: a100_80gb"),
    ({"parallel.recompute": "some"}, "parallel.recompute='some' must be one of: none, selective, full"),
    ({"precision": "int4"}, "precision='int4' must be one of"),
    ({"parallel.zero": 4}, "parallel.zero=4 must be one of 0, 1, 2, 3"),
    ({"model.kv_heads": 5}, "model.heads=16 is not divisible by model.kv_heads=5"),
    ({"hardware": {"peak_tflops": -1}}, "hardware.peak_tflops=-1 must be a positive number"),
    ({"hardware": {"peak_tflops": 312, "warp_drive": 1}}, "hardware.warp_drive is not a hardware field"),
    ({"model.depth": 3}, "model.depth is not a model field"),
])
def test_bad_cases_are_one_clear_line(changes, expected):
    with pytest.raises(ConfigError) as info:
        parse(case(**changes))
    assert expected in info.value.render()
    assert all("\n" not in p for p in info.value.problems)
    assert len(info.value.problems) == (2 if "tp=3" in expected else 1)  # tp=3 splits neither heads nor FFN


def test_presets_include_the_datasheet_gpus():
    names = preset_names()
    assert {"a100_80gb", "h100_sxm", "h200_sxm"} <= set(names)
    h200 = resolve("h200_sxm")
    assert (h200.hbm_gib, h200.hbm_gbps, h200.nvlink_gbps_per_gpu, h200.nic_gbps_per_gpu) == (141, 4800, 450, 50)


def test_a_block_without_optional_fields_equals_the_a100_preset():
    """The published-cases file gives A100s as a block of five fields; it must project like the preset."""
    block = {"peak_tflops": 312, "hbm_gib": 80, "gpus_per_node": 8, "nvlink_gbps_per_gpu": 300, "nic_gbps_per_gpu": 25}
    a = run(hardware=block, precision="fp16")
    b = run(hardware="a100_80gb", precision="fp16")
    assert a.step_time_s == pytest.approx(b.step_time_s)


def test_out_of_memory_is_a_flag_with_the_excess():
    r = run(model={"layers": 80, "hidden": 8192, "heads": 64, "vocab": 128256, "seq_len": 8192},
            **{"parallel.micro_batch": 1, "parallel.global_batch": 8})
    assert not r.fits_in_memory and r.memory_excess_gib > 100 and r.step_time_s > 0


def test_validation_meets_its_goals_on_both_published_tables():
    report = check(load_rows())
    for name, table in report["tables"].items():
        assert table["mean_abs_error"] <= 0.05 and table["max_abs_error"] <= 0.10, (name, table)
    assert len(report["tables"]["megatron2021_t1"]["rows"]) == 10
    assert len(report["tables"]["korthikanti2022_t5"]["rows"]) == 8


def _dtrain(*args) -> subprocess.CompletedProcess:
    """``dtrain scale ...`` in this process through the real entry's dispatch (stdout/stderr captured)."""
    import contextlib
    import io

    from dtrain.cli import run as dtrain_run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = dtrain_run(["scale", *args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_cli_contract(tmp_path):
    case_file = tmp_path / "case.yaml"
    case_file.write_text(json.dumps(case(**{"parallel.zero": 3})))
    out = tmp_path / "out.json"
    # once through a real process: the console entry and its exit code
    done = subprocess.run([sys.executable, "-m", "dtrain", "scale", "project", str(case_file), "--gpus", "8,128,1024",
                           "--out", str(out)], capture_output=True, text=True, env=subprocess_env(), cwd=REPO,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    points = json.loads(out.read_text())
    keys = {"gpus", "efficiency", "step_time_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu",
            "hardware_tflops_per_gpu", "mfu", "memory_gib_per_gpu", "exposed_comm_fraction", "comm_fraction_by_dim",
            "bubble_fraction"}
    assert [p["gpus"] for p in points] == [8, 128, 1024] and all(keys <= set(p) for p in points)
    assert points[0]["efficiency"] == 1.0 and set(points[0]["comm_fraction_by_dim"]) == {"dp", "tp", "pp", "cp"}
    single = tmp_path / "one.json"
    assert _dtrain("project", str(case_file), "--out", str(single)).returncode == 0
    assert keys - {"efficiency"} <= set(json.loads(single.read_text()))

    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(case(**{"parallel.tp": 8, "parallel.gpus": 12})))
    tp8 = tmp_path / "tp8.yaml"
    tp8.write_text(json.dumps(case(**{"parallel.tp": 8, "parallel.global_batch": 8})))
    for args in (["project", str(bad), "--out", str(tmp_path / "x.json")],
                 ["project", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x.json")],
                 ["project", str(case_file), "--gpus", "8,x", "--out", str(tmp_path / "x.json")],
                 ["project", str(tp8), "--gpus", "8,12", "--out", str(tmp_path / "x.json")],
                 ["project", str(case_file)],
                 ["nonsense"]):
        done = _dtrain(*args)
        assert done.returncode == 2 and done.stderr.startswith("dtrain: "), (args, done.stderr)
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "x.json").exists()

    validation = tmp_path / "v.json"
    done = _dtrain("validate", "--out", str(validation))
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(validation.read_text())
    assert report["meets_goal"] and all("error" in r for t in report["tables"].values() for r in t["rows"])


def test_projections_check_the_quoted_targets(tmp_path):
    (tmp_path / "ddp.yaml").write_text(json.dumps(case(**{"parallel.gpus": 1, "parallel.global_batch": 8})))
    (tmp_path / "tp8.yaml").write_text(json.dumps(case(**{"parallel.tp": 8, "parallel.global_batch": 8})))
    spec = tmp_path / "projections.yaml"
    spec.write_text(json.dumps({"gpus": [1, 8, 128], "hardware": ["h100_sxm", "h200_sxm"],
                                "cases": {"ddp": "ddp.yaml", "tp8": "tp8.yaml"},
                                "targets": {"efficiency": {"8": 0.99, "128": 0.97}, "comm_fraction": 0.10}}))
    done = _dtrain("projections", str(spec), "--out", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "out" / "projections.json").read_text())
    assert len(report["projections"]) == 4 and len(report["table"]) == 12
    rows = [r for r in report["table"] if "error" not in r]
    assert len(rows) == 10  # tp=8 does not run on 1 GPU: its baseline is the first node
    for row in rows:
        assert row["compute_share"] == pytest.approx(1 - row["comm"] - row["bubble"], abs=1e-3)
        assert row["comm_holds"] == (row["comm"] < 0.10)
        if row["gpus"] == row["baseline_gpus"]:
            assert row["efficiency"] == 1.0 and row["efficiency_target"] is None
        else:
            assert row["efficiency_holds"] == (row["efficiency"] >= {8: 0.99, 128: 0.97}[row["gpus"]])
    assert {r["baseline_gpus"] for r in rows if r["case"] == "tp8"} == {8}
    tp_row = next(r for r in rows if r["case"] == "tp8")
    assert tp_row["largest_loss"].startswith("tp communication")
    table = (tmp_path / "out" / "targets.md").read_text()
    assert table.count("\n") == 2 + 12 and "holds" in table and "n/a: parallel.gpus=1" in table
    assert (tmp_path / "out" / "efficiency_projected.png").stat().st_size > 0


def test_calibration_fits_the_per_kernel_overhead_to_one_rank_steps(tmp_path):
    """On a CPU preset the projection is linear in the per-kernel overhead: one-rank steps measured at a
    known overhead give it back, and the written preset loads as a preset."""
    from dataclasses import replace

    from dtrain.scaling.calibrate import fit_kernel_overhead, write_preset
    from dtrain.scaling.hardware import from_block
    from dtrain.scaling.study import case_from_overrides

    preset = {"peak_tflops": 0.02, "peak_tflops_fp32": 0.02, "hbm_gib": 16, "hbm_gbps": 5.0, "gpus_per_node": 64,
              "nvlink_gbps_per_gpu": 1.0, "nic_gbps_per_gpu": 1.0, "compute_slots_per_node": 2,
              "async_device": False, "matmul_efficiency": 1.0, "memory_efficiency": 1.0, "nvlink_efficiency": 1.0,
              "nic_efficiency": 1.0, "nvlink_latency_us": 100.0, "nic_latency_us": 100.0, "kernel_overhead_us": 0.0,
              "flash_attention_efficiency": 1.0, "attention": "flash"}
    points = []
    for name, overrides in (("tiny", ["model=gpt_tiny"]), ("small", ["model=gpt_small", "model.n_head=8"])):
        overrides = [*overrides, "data=synthetic", "data.seq_len=64", "trainer.global_batch_size=8"]
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "overrides.txt").write_text("\n".join(overrides + ["run.dir=x"]) + "\n")
        case = case_from_overrides(overrides, 1, preset)
        truth = project(replace(case, hardware=from_block({**preset, "kernel_overhead_us": 37.0}))).step_time_s
        points.append({"model": name, "strategy": "ddp", "world_size": 1, "step_time_s": truth,
                       "run_dir": str(run_dir)})
    overhead, rows = fit_kernel_overhead(preset, {"points": points})
    assert overhead == pytest.approx(37.0, rel=1e-6)
    assert all(abs(r["error"]) < 1e-6 for r in rows)
    path = tmp_path / "cpu_test.yaml"
    write_preset(path, {**preset, "kernel_overhead_us": overhead},
                 {"gemm_flops": 2e10, "copy_bytes_per_s": 5e9, "gloo_alpha_s": 1e-4, "gloo_beta_bytes_per_s": 1e9,
                  "cpus": 2}, "dtrain scale calibrate")
    import yaml

    loaded = from_block(yaml.safe_load(path.read_text()), "cpu_test")
    assert loaded.kernel_overhead_us == pytest.approx(37.0) and not loaded.async_device


def _cpu_case(strategy: list[str], world: int, preset: dict):
    from dtrain.scaling.study import case_from_overrides

    overrides = ["model=gpt_tiny", "data=synthetic", "data.seq_len=64", "trainer.micro_batch_size=2",
                 f"trainer.global_batch_size={8 * world}", *strategy]
    return case_from_overrides(overrides, world, preset)


CPU = {"peak_tflops": 0.02, "peak_tflops_fp32": 0.02, "hbm_gib": 16, "hbm_gbps": 5.0, "gpus_per_node": 64,
       "nvlink_gbps_per_gpu": 1.0, "nic_gbps_per_gpu": 1.0, "compute_slots_per_node": 2, "corun_slowdown": 1.5,
       "async_device": False, "kernel_overhead_us": 10.0, "matmul_efficiency": 1.0, "memory_efficiency": 1.0,
       "attention": "flash"}


def test_cpu_ranks_that_compute_at_once_share_the_cores():
    """Weak scaling keeps each rank's work: its compute grows by the measured co-run slowdown when both
    cores compute, and by the core count on top when ranks outnumber the cores."""
    compute = {w: project(_cpu_case(["strategy=ddp"], w, CPU)).breakdown_s["compute"] for w in (1, 2, 4)}
    assert compute[2] == pytest.approx(1.5 * compute[1]) and compute[4] == pytest.approx(3.0 * compute[1])
    alone = project(_cpu_case(["strategy=ddp"], 2, {**CPU, "corun_slowdown": 1.0})).breakdown_s["compute"]
    assert alone == pytest.approx(compute[1])
    # pipeline ranks sleep through the bubble in their receives: fewer of them compete for the cores
    pp = project(_cpu_case(["strategy=pp"], 4, CPU))
    m = pp.layout["microbatches"]
    busy = 4 * m / (m + 3)
    assert busy > 2
    stage = project(_cpu_case(["strategy=pp"], 4, {**CPU, "compute_slots_per_node": 64, "corun_slowdown": 1.0}))
    assert pp.breakdown_s["compute"] == pytest.approx(stage.breakdown_s["compute"] * 1.5 * busy / 2)
    from dtrain.scaling.hardware import from_block

    with pytest.raises(ConfigError, match="corun_slowdown"):
        from_block({**CPU, "corun_slowdown": 0.5})


def test_reference_runs_do_one_ranks_work_without_communication():
    """A study point's reference: DDP's is one rank with its share of the batch; a sharded or
    tensor-parallel layout's is rank 0 of the same world on the fake process group; a pipeline's is all
    its stages on one rank (torch's interleaved schedule); a pipeline mixed with other dimensions has none."""
    from dtrain.config.validate import load_config
    from dtrain.scaling.study import reference_of

    base = ["model=gpt_tiny", "data=synthetic", "trainer.micro_batch_size=2", "trainer.global_batch_size=16"]
    ddp, world = reference_of([*base, "strategy=ddp", "strategy.dp_replicate=4",
                               "strategy.activation_checkpointing=full"], 4)
    assert world == 1 and "strategy=ddp" in ddp and "trainer.global_batch_size=4" in ddp
    assert "strategy.activation_checkpointing=full" in ddp  # the rank's work stays the same
    assert not any(o.startswith("strategy.dp_") for o in ddp)
    assert load_config([*ddp, "run.name=x"], 1).trainer.global_batch_size == 4
    fsdp, world = reference_of([*base, "strategy=fsdp"], 2)
    assert world == 2 and fsdp[-1] == "dist.backend=fake"
    pp, world = reference_of([*base, "strategy=pp", "strategy.pp_schedule=1F1B"], 4)
    assert world == 1 and pp[-2:] == ["strategy.pp_schedule=Interleaved1F1B", "strategy.pp_stages_per_rank=4"]
    assert "strategy.pp_schedule=1F1B" not in pp
    assert load_config([*pp, "run.name=x"], 1).strategy.pp_stages_per_rank == 4
    assert reference_of([*base, "strategy=pp_fsdp"], 4) == (None, 1)
    assert reference_of([*base, "strategy=tp"], 1) == (None, 1)
    with pytest.raises(ConfigError, match="dist.backend=fake .* must not write checkpoints"):
        load_config([*base, "strategy=fsdp", "dist.backend=fake", "run.name=x"], 2)


def test_all_gather_and_reduce_scatter_efficiency_slow_only_their_collectives():
    """gloo's all-gather and reduce-scatter move bytes slower than its all-reduce (calibrate measures
    each): the preset's efficiencies stretch exactly those collectives' bandwidth term."""
    from dtrain.scaling.hardware import from_block

    slow = from_block({**CPU, "all_gather_efficiency": 0.5, "reduce_scatter_efficiency": 0.25})
    fast = from_block(CPU)
    megabytes = 8e6
    for kind, factor in (("all_gather", 2.0), ("reduce_scatter", 4.0), ("all_reduce", 1.0)):
        latency = Timer(fast, "fp32", 2).collective(kind, 1.0, 2, 1)  # ~ the latency alone
        stretched = Timer(slow, "fp32", 2).collective(kind, megabytes, 2, 1) - latency
        plain = Timer(fast, "fp32", 2).collective(kind, megabytes, 2, 1) - latency
        assert stretched == pytest.approx(factor * plain, rel=1e-6)
    # FSDP's step pays for it; DDP's (all-reduce only) does not
    presets = (CPU, {**CPU, "reduce_scatter_efficiency": 0.25})
    fsdp = [project(_cpu_case(["strategy=fsdp"], 2, hw)).step_time_s for hw in presets]
    ddp = [project(_cpu_case(["strategy=ddp"], 2, hw)).step_time_s for hw in presets]
    assert fsdp[1] > fsdp[0] and ddp[1] == ddp[0]
    with pytest.raises(ConfigError, match="all_gather_efficiency"):
        from_block({**CPU, "all_gather_efficiency": 1.5})


def test_latency_factors_and_steps_change_only_the_latency_they_describe():
    """gloo's small reduce-scatter takes as long as an all-reduce (calibrate measures the factor), and its
    collectives' latency grows per doubling of the ranks (log2), not per rank as NCCL's rings do."""
    from dtrain.scaling.hardware import from_block

    base = from_block({**CPU, "nvlink_gbps_per_gpu": 1e9})  # bandwidth so high that latency is all that is left
    factored = from_block({**CPU, "nvlink_gbps_per_gpu": 1e9, "reduce_scatter_latency_factor": 2.0,
                           "all_gather_latency_factor": 0.5})
    for kind, factor in (("reduce_scatter", 2.0), ("all_gather", 0.5), ("all_reduce", 1.0)):
        plain = Timer(base, "fp32", 2).collective(kind, 4096, 2, 1)
        assert Timer(factored, "fp32", 2).collective(kind, 4096, 2, 1) == pytest.approx(factor * plain, rel=1e-3)
    ring = from_block({**CPU, "nvlink_gbps_per_gpu": 1e9, "compute_slots_per_node": 64})  # no shared cores
    log2 = from_block({**CPU, "nvlink_gbps_per_gpu": 1e9, "compute_slots_per_node": 64, "latency_steps": "log2"})
    for hw, steps_at_8 in ((ring, 7), (log2, 3)):
        timer = Timer(hw, "fp32", 8)
        for kind in ("all_reduce", "all_gather", "reduce_scatter"):
            at_2, at_8 = timer.collective(kind, 4096, 2, 1), timer.collective(kind, 4096, 8, 1)
            assert at_8 == pytest.approx(steps_at_8 * at_2, rel=1e-3), (hw.latency_steps, kind)
    assert resolve("h100_sxm").latency_steps == "ring" and resolve("h100_sxm").reduce_scatter_latency_factor == 1
    with pytest.raises(ConfigError, match="latency_steps='tree' must be one of: ring, log2"):
        from_block({**CPU, "latency_steps": "tree"})
    with pytest.raises(ConfigError, match="reduce_scatter_latency_factor=0 must be a positive number"):
        from_block({**CPU, "reduce_scatter_latency_factor": 0})


def test_an_uneven_pipeline_split_runs_at_its_largest_stage_and_computes_only_its_layers():
    """6 layers over 4 stages as dtrain splits them (2, 2, 1, 1): the steady state paces at the largest
    stage, as 8 layers split evenly would, but the bubble fills with the average stage, the FLOPs are those
    of 6 layers, and on shared cores the ranks of the small stages sleep more and leave the cores to the
    others."""
    pipeline = {"parallel.gpus": 4, "parallel.pp": 4, "parallel.global_batch": 32}
    uneven = run(**pipeline, **{"model.layers": 6, "parallel.stage_layers": [2, 2, 1, 1]})
    even = run(**pipeline, **{"model.layers": 8})
    assert uneven.breakdown_s["compute"] == pytest.approx(even.breakdown_s["compute"], rel=1e-9)
    assert uneven.breakdown_s["bubble"] < even.breakdown_s["bubble"]
    assert uneven.model_tflops_per_gpu < even.model_tflops_per_gpu
    cpu = [_cpu_case(["strategy=pp", f"model.n_layer={n}"], 4, CPU) for n in (6, 8)]
    assert cpu[0].parallel.stage_layers == (2, 2, 1, 1) and cpu[0].model.layers == 6
    assert cpu[1].parallel.stage_layers == ()
    assert project(cpu[0]).breakdown_s["compute"] < project(cpu[1]).breakdown_s["compute"]
    for bad in ([2, 2, 2], [2, 2, 1, 2], [2, 2, 1, "x"]):
        with pytest.raises(ConfigError, match="parallel.stage_layers="):
            parse(case(**pipeline, **{"model.layers": 6, "parallel.stage_layers": bad}))


def test_a_synchronous_step_waits_for_its_slowest_rank():
    """Each rank's compute varies from step to step (step_jitter_cv); n synchronous ranks pay the expected
    maximum of n of them: cv x E[max of n normals] of the compute on top (E = 1/sqrt(pi) for 2, 1.03 for
    4), nothing at one rank, and nothing on the GPU presets (0)."""
    import math

    from dtrain.scaling.hardware import from_block, load_preset
    from dtrain.scaling.projection import expected_max_of_normals

    assert expected_max_of_normals(1) == 0.0
    assert expected_max_of_normals(2) == pytest.approx(1 / math.sqrt(math.pi), abs=1e-4)
    assert expected_max_of_normals(4) == pytest.approx(1.0294, abs=1e-4)
    steady = {**CPU, "corun_slowdown": 1.0}
    for world in (1, 2, 4):
        still = project(_cpu_case(["strategy=ddp"], world, steady))
        shaky = project(_cpu_case(["strategy=ddp"], world, {**steady, "step_jitter_cv": 0.1}))
        wait = 0.1 * expected_max_of_normals(world) * (still.breakdown_s["compute"] + still.breakdown_s["optimizer"])
        assert shaky.step_time_s == pytest.approx(still.step_time_s + wait, rel=1e-9)
        assert (shaky.step_time_s > still.step_time_s) == (world > 1)
    assert all(load_preset(name).step_jitter_cv == 0.0 for name in ("a100_80gb", "h100_sxm", "h200_sxm"))
    with pytest.raises(ConfigError, match="step_jitter_cv"):
        from_block({**CPU, "step_jitter_cv": 1.5})


def test_step_jitter_is_the_spread_a_rank_suffers_alone_not_the_machines_drift():
    """step_jitter_cv of a run: successive differences cancel a slow drift that every rank would see at
    once (no waiting), and keep the step-to-step noise of one process; calibrate takes the median over the
    study's single-process runs (1-rank points and references)."""
    from dtrain.scaling.calibrate import single_process_jitter
    from dtrain.scaling.study import step_jitter_cv

    assert step_jitter_cv([1.0] * 8) == 0.0
    assert step_jitter_cv([1.0, 1.0]) is None
    drift = [1.0 + 0.01 * i for i in range(8)]  # 7% slower by the end, steadily
    noise = [1.0, 1.1] * 4  # +-5% around 1.05, step to step
    assert step_jitter_cv(drift) < 0.01 < 0.05 < step_jitter_cv(noise) < 0.1
    points = [{"world_size": 1, "step_jitter_cv": 0.02, "reference_step_jitter_cv": None},
              {"world_size": 2, "step_jitter_cv": 0.5, "reference_step_jitter_cv": 0.04},
              {"world_size": 4, "step_jitter_cv": 0.5, "reference_step_jitter_cv": 0.06}]
    assert single_process_jitter({"points": points}) == pytest.approx(0.04)
    with pytest.raises(ConfigError, match="--collect"):
        single_process_jitter({"points": [{"world_size": 2, "step_time_s": 1.0}]})


def test_the_closed_loop_gives_each_point_its_references_spread():
    """In a study each multi-rank point waits for its slowest rank with the spread its own reference run
    showed (else its 1-rank point's): the reference's 0.1 s of compute at cv 0.1 adds 0.1 x 0.1 x 1/sqrt(pi)
    (times the co-run slowdown of two busy cores)."""
    from dtrain.scaling.projection import expected_max_of_normals
    from dtrain.scaling.study import Point, Summary, add_projection, reference_of

    overrides = ["model=gpt_tiny", "data=synthetic", "data.seq_len=64", "trainer.micro_batch_size=2",
                 "trainer.global_batch_size=8", "strategy=ddp"]
    reference, reference_world = reference_of(overrides, 2)
    points = [Point("gpt_tiny", "ddp", "strong", 1, overrides, 8),
              Point("gpt_tiny", "ddp", "strong", 2, overrides, 8, reference, reference_world)]

    def projected(cv):
        summaries = [Summary("gpt_tiny", "ddp", "strong", 1, 8, step_time_s=0.2, step_jitter_cv=0.3),
                     Summary("gpt_tiny", "ddp", "strong", 2, 8, step_time_s=0.15, reference_step_time_s=0.1,
                             reference_step_jitter_cv=cv)]
        add_projection(summaries, points, "cpu_local")
        assert summaries[0].projection["step_time_s"] == pytest.approx(0.2, rel=1e-6)  # one rank waits for none
        return summaries[1].projection

    steady, shaky = projected(0.0), projected(0.1)
    assert (steady["step_jitter_cv"], shaky["step_jitter_cv"]) == (0.0, 0.1)
    wait = 0.1 * expected_max_of_normals(2) * 0.1 * resolve("cpu_local").corun_slowdown
    assert shaky["step_time_s"] == pytest.approx(steady["step_time_s"] + wait, rel=1e-4)
    assert projected(None)["step_jitter_cv"] == 0.3
