"""``dtrain scale measure``: a 1- and 2-rank sweep through real torchrun, summarized in results.json."""

from __future__ import annotations

import json
import sys

from tests.helpers import read_metrics, run_cmd, subprocess_env

STUDY = """
name: smoke
world_sizes: [1, 2]
series: [strong, weak]
steps: 2
warmup_steps: 1
common: [data=synthetic, data.seq_len=32, data.vocab_size=64, model.n_layer=2, model.d_model=64,
         trainer.micro_batch_size=2, trainer.global_batch_size=4, optim.warmup_steps=0]
models: {gpt_tiny: [model=gpt_tiny]}
strategies: {ddp: [strategy=ddp]}
hardware: cpu_local
"""


def _scale(*args: str, timeout: float = 600):
    return run_cmd([sys.executable, "-m", "dtrain", "scale", *args], timeout=timeout)


def test_measure_runs_the_sweep_and_writes_results(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(STUDY)  # the shared 1-rank point, and a 2-rank point per series
    out = tmp_path / "out"
    done = _scale("measure", str(study), "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    points = {(p["series"], p["world_size"]): p for p in results["points"]}
    assert set(points) == {("strong", 1), ("strong", 2), ("weak", 2)}
    keys = {"world_size", "tokens_per_s", "tokens_per_s_per_rank", "step_time_s", "strong_efficiency",
            "weak_efficiency", "exposed_comm_fraction", "exposed_comm_fraction_by_dim", "bubble_fraction",
            "comm_bytes_per_step", "peak_memory_gib"}
    for p in points.values():
        assert keys <= set(p) and p["error"] is None and p["steps_measured"] == 2
    base, strong, weak = points["strong", 1], points["strong", 2], points["weak", 2]
    assert base["strong_efficiency"] == base["weak_efficiency"] == 1.0 and base["exposed_comm_fraction"] == 0
    assert strong["strong_efficiency"] > 0 and strong["weak_efficiency"] is None
    assert weak["weak_efficiency"] > 0 and weak["global_batch"] == 2 * base["global_batch"]
    assert strong["exposed_comm_fraction"] > 0 and strong["comm_bytes_per_step"] > 0
    assert strong["tokens_per_s_per_rank"] == strong["tokens_per_s"] / 2
    assert strong["projection"]["hardware"] == "cpu_local" and strong["projection"]["step_time_s"] > 0
    # the closed loop anchors each multi-rank point at its reference: one rank's share alone (DDP: the
    # one rank on half the batch), and projects the rest (collectives, ranks sharing the cores) on top
    assert strong["projection"]["anchor"] == "reference run" and base["projection"]["anchor"] == "1-rank point"
    reference = out / "runs" / "reference" / "gpt_tiny-ddp-strong-2"
    overrides = (reference / "overrides.txt").read_text().splitlines()
    assert "strategy=ddp" in overrides and "trainer.global_batch_size=2" in overrides
    assert strong["reference_step_time_s"] > 0 and len(read_metrics(reference)) == 3
    # every training run's metrics carry the exposed-communication numbers
    rows = read_metrics(out / "runs" / "gpt_tiny-ddp-strong-2")
    assert all("exposed_comm_s" in r and "exposed_comm_fraction" in r for r in rows)
    assert (out / "efficiency_gpt_tiny.png").stat().st_size > 0 and (out / "breakdown_gpt_tiny.png").exists()

    # --collect summarizes the same runs again without running anything
    again = _scale("measure", str(study), "--out", str(out), "--collect", timeout=240)
    assert again.returncode == 0 and "[1/" not in again.stdout
    assert json.loads((out / "results.json").read_text())["points"][1]["step_time_s"] == strong["step_time_s"]
    # --resume keeps the runs that finished and reruns the one that did not
    (out / "runs" / "gpt_tiny-ddp-weak-2" / "metrics.jsonl").unlink()
    resumed = _scale("measure", str(study), "--out", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    again = {(p["series"], p["world_size"]): p for p in json.loads((out / "results.json").read_text())["points"]}
    assert again["strong", 2]["step_time_s"] == strong["step_time_s"]
    assert again["weak", 2]["steps_measured"] == 2 and again["weak", 2]["step_time_s"] != weak["step_time_s"]


def test_fake_backend_runs_one_ranks_share_alone(tmp_path):
    """``dist.backend=fake``: one process is rank 0 of a 2-rank FSDP run, its collectives do nothing; the
    reference of a scaling study's sharded points. It trains its steps and records them."""
    from dtrain.scaling.study import free_port

    env = subprocess_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(free_port()))
    args = ["model=gpt_tiny", "model.n_layer=2", "data=synthetic", "data.seq_len=32", "trainer.micro_batch_size=2",
            "trainer.global_batch_size=4", "strategy=fsdp", "dist.backend=fake", "trainer.max_steps=3",
            "trainer.eval_every=0", "trainer.sample_tokens=0", "trainer.log_every=1", f"run.dir={tmp_path / 'run'}",
            "run.name=fake"]
    done = run_cmd([sys.executable, "-m", "dtrain", *args], env=env, timeout=240)
    assert done.returncode == 2 and "must not write checkpoints" in done.stderr  # it never saves
    no_checkpoints = ["checkpoint.interval_steps=0", "checkpoint.save_final=false"]
    done = run_cmd([sys.executable, "-m", "dtrain", *args, *no_checkpoints], env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["step_time_s"] > 0 for r in rows)
    assert "strategy fsdp on 2 ranks" in done.stderr + done.stdout


def test_a_pipelines_reference_runs_all_its_stages_on_one_rank(tmp_path):
    """A pipeline point's reference (no fake group: a lone pipeline rank waits for its neighbours' shapes):
    the same model and batch on one rank, every stage of the 2-stage 1F1B pipeline under torch's
    interleaved schedule. It trains its steps and records them."""
    from dtrain.config.validate import load_config
    from dtrain.scaling.study import free_port, reference_of

    point = ["model=gpt_tiny", "model.n_layer=2", "data=synthetic", "data.seq_len=32", "trainer.micro_batch_size=2",
             "trainer.global_batch_size=8", "strategy=pp", "strategy.pp_schedule=1F1B", "trainer.max_steps=3",
             "trainer.eval_every=0", "trainer.sample_tokens=0", "trainer.log_every=1",
             "checkpoint.interval_steps=0", "checkpoint.save_final=false"]
    reference, world = reference_of(point, 2)
    assert world == 1 and load_config([*reference, "run.name=x"], 1).strategy.pp_stages_per_rank == 2
    env = subprocess_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(free_port()))
    done = run_cmd([sys.executable, "-m", "dtrain", *reference, f"run.dir={tmp_path / 'run'}", "run.name=pp"],
                   env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["step_time_s"] > 0 for r in rows)
    assert "strategy pp on 1 ranks" in done.stderr + done.stdout


def test_bad_study_is_refused_before_anything_runs(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(STUDY.replace("world_sizes: [1, 2]", "world_sizes: [1, 3]")
                     .replace("strategies: {ddp: [strategy=ddp]}", "strategies: {tp: [strategy=tp]}"))
    done = _scale("measure", str(study), "--out", str(tmp_path / "out"), timeout=240)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "gpt_tiny/tp at 3 ranks (strong)" in done.stderr and "exclude a point" in done.stderr
    assert not (tmp_path / "out").exists()
    study.write_text("world_sizes: [0]\nlauncher: mpi\nmodels: {}\n")
    done = _scale("measure", str(study), "--out", str(tmp_path / "out"), timeout=240)
    assert done.returncode == 2 and "launcher='mpi'" in done.stderr and "world_sizes=[0]" in done.stderr
    plan = _scale("measure", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "out"), timeout=240)
    assert plan.returncode == 2 and plan.stderr.strip().count("\n") == 0
