"""``dtrain scale measure STUDY.yaml --out DIR``: a scaling sweep, run for real, summarized in one file.

A study is strategies x world sizes x models x series (``strong``: the global batch stays; ``weak``: it
grows with the world size, so each rank's work stays). Every point is an ordinary training run with
its own run directory under ``DIR/runs/``; its ``metrics.jsonl`` (step time, tokens/s, exposed
communication by dimension, bubble, bytes, peak memory) is summarized over the measured steps
(medians; the first ``warmup_steps`` are dropped) into ``DIR/results.json``, with each point's
efficiency against the smallest world size of its series, and, when the study names a ``hardware``
preset, the projection of the same point on it (the closed loop of ``dtrain scale calibrate``).

Each multi-rank point also gets a reference run, alone on the machine and one process: one rank's share
of the same work without communication (a pipeline: all its stages on one rank; :func:`reference_of`), under
``DIR/runs/reference/``; its median step is ``reference_step_time_s``, and the projection starts from it.

Study file (YAML)::

    name: cpu_sweep
    launcher: torchrun        # torchrun (here) | slurm | kubernetes (through `dtrain launch`, see README)
    world_sizes: [1, 2, 4]
    series: [strong, weak]
    steps: 10                 # measured steps per point
    warmup_steps: 3
    timeout_s: 900            # per point
    common: [data=synthetic, data.seq_len=128, trainer.global_batch_size=16, trainer.micro_batch_size=2]
    models: {gpt_tiny: [model=gpt_tiny], gpt_small: [model=gpt_small, model.n_head=8]}
    strategies: {ddp: [strategy=ddp], fsdp: [strategy=fsdp], tp: [strategy=tp],
                 pp: [strategy=pp, model.tie_embeddings=false]}
    exclude: [gpt_small/tp/4]  # model/strategy/world_size points to skip
    repeats: 1                 # rounds over all points (alternating order); each point keeps its
                               # least disturbed round (lowest median step): for a shared machine
    hardware: cpu_local        # optional: project every point on this preset too

Every point's config is validated (for its world size, in this process) before anything runs; all
problems are reported at once. ``--plan`` prints the points and their overrides as JSON instead of
running them (what a cluster launcher needs); ``--collect`` only summarizes run directories that
already exist (after the points ran elsewhere, e.g. on a cluster, into ``DIR/runs/``); ``--resume``
reruns only the runs that did not finish their steps (an interrupted sweep).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from dtrain.config.errors import ConfigError

LAUNCHERS = ("torchrun", "slurm", "kubernetes")
SERIES = ("strong", "weak")
STUDY_KEYS = {"name", "launcher", "launcher_options", "world_sizes", "series", "steps", "warmup_steps", "timeout_s",
              "repeats", "common", "models", "strategies", "exclude", "hardware"}
# every run of a study: no evaluation, sampling or checkpoints; one log line per step; one thread per rank
RUN_OVERRIDES = ["trainer.eval_every=0", "trainer.sample_tokens=0", "trainer.log_every=1", "logging.progress=off",
                 "checkpoint.interval_steps=0", "checkpoint.save_final=false", "checkpoint.lease_ttl_s=0",
                 "trainer.measure_comm=true"]
METRIC_KEYS = ("exposed_comm_s", "exposed_comm_fraction", "exposed_comm_dp_s", "exposed_comm_tp_s",
               "exposed_comm_pp_s", "exposed_comm_cp_s", "exposed_comm_other_s", "bubble_s", "bubble_fraction",
               "comm_bytes", "comm_calls")


@dataclass
class Study:
    name: str
    launcher: str
    launcher_options: dict[str, Any]
    world_sizes: list[int]
    series: list[str]
    steps: int
    warmup_steps: int
    timeout_s: float
    repeats: int
    common: list[str]
    models: dict[str, list[str]]
    strategies: dict[str, list[str]]
    exclude: list[str]
    hardware: str | None


@dataclass
class Point:
    model: str
    strategy: str
    series: str
    world_size: int
    overrides: list[str]
    global_batch: int
    # the per-rank work of the point in one process, without communication (see reference_of), or None
    reference: list[str] | None = None
    reference_world: int = 1

    @property
    def key(self) -> str:
        return f"{self.model}/{self.strategy}/{self.series}/{self.world_size}"

    @property
    def run_name(self) -> str:
        return self.key.replace("/", "-")

    def run_dir(self, out: Path, round_: int) -> Path:
        return out / "runs" / (self.run_name if round_ == 0 else f"{self.run_name}-r{round_}")

    def reference_dir(self, out: Path, round_: int) -> Path:
        return out / "runs" / "reference" / (self.run_name if round_ == 0 else f"{self.run_name}-r{round_}")


@dataclass
class Summary:
    """One point of results.json (medians over the measured steps)."""

    model: str
    strategy: str
    series: str
    world_size: int
    global_batch: int
    step_time_s: float | None = None
    step_time_best_s: float | None = None  # the fastest measured step: least disturbed by a busy machine
    tokens_per_s: float | None = None
    tokens_per_s_per_rank: float | None = None
    strong_efficiency: float | None = None
    weak_efficiency: float | None = None
    exposed_comm_fraction: float | None = None
    exposed_comm_fraction_by_dim: dict[str, float] = field(default_factory=dict)
    bubble_fraction: float | None = None
    comm_bytes_per_step: float | None = None
    peak_memory_gib: float | None = None
    oversubscribed: bool = False
    steps_measured: int = 0
    run_dir: str = ""
    rounds_step_time_s: list[float | None] = field(default_factory=list)  # with repeats: every round's median
    reference_step_time_s: float | None = None  # the per-rank work alone, without communication (median)
    step_jitter_cv: float | None = None  # how much the step varies from step to step (see step_jitter_cv)
    reference_step_jitter_cv: float | None = None
    error: str | None = None
    projection: dict[str, Any] | None = None


def _list(value: Any, what: str, problems: list[str]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{what} must be a list of overrides (strings), not {value!r}")
        return []
    return value


def load_study(path: str | Path) -> Study:
    from dtrain.scaling.case import read_document

    data = read_document(path, "study file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"study file {path} must be a mapping (see `dtrain scale measure --help`)")
    problems = [f"{k} is not a study field; known: {', '.join(sorted(STUDY_KEYS))}"
                for k in sorted(set(data) - STUDY_KEYS)]
    launcher = data.get("launcher", "torchrun")
    if launcher not in LAUNCHERS:
        problems.append(f"launcher={launcher!r} must be one of: {', '.join(LAUNCHERS)}")
    worlds = data.get("world_sizes", [1, 2])
    if not isinstance(worlds, list) or not worlds or not all(isinstance(w, int) and w >= 1 for w in worlds):
        problems.append(f"world_sizes={worlds!r} must be a list of positive integers")
        worlds = []
    series = data.get("series", ["strong"])
    if not isinstance(series, list) or not series or any(s not in SERIES for s in series):
        problems.append(f"series={series!r} must list one or both of: {', '.join(SERIES)}")
        series = []
    numbers = {}
    for key, default, low in (("steps", 10, 1), ("warmup_steps", 3, 0), ("timeout_s", 900, 1), ("repeats", 1, 1)):
        value = data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < low:
            problems.append(f"{key}={value!r} must be a number >= {low}")
        numbers[key] = value
    blocks = {}
    for key in ("models", "strategies"):
        block = data.get(key)
        if not isinstance(block, dict) or not block:
            problems.append(f"{key} must be a mapping of names to override lists, e.g. {key}: {{name: [...]}}")
            block = {}
        blocks[key] = {name: _list(v, f"{key}.{name}", problems) for name, v in block.items()}
    hardware = data.get("hardware")
    if hardware is not None:
        from dtrain.scaling.hardware import preset_names

        if hardware not in preset_names():
            problems.append(f"hardware={hardware!r} is not a preset; choose one of: {', '.join(preset_names())}")
    if problems:
        raise ConfigError(problems)
    return Study(name=str(data.get("name", Path(path).stem)), launcher=launcher,
                 launcher_options=dict(data.get("launcher_options") or {}), world_sizes=sorted(set(worlds)),
                 series=series, steps=int(numbers["steps"]), warmup_steps=int(numbers["warmup_steps"]),
                 timeout_s=float(numbers["timeout_s"]), repeats=int(numbers["repeats"]),
                 common=_list(data.get("common"), "common", problems),
                 models=blocks["models"], strategies=blocks["strategies"],
                 exclude=[str(e) for e in data.get("exclude") or []], hardware=hardware)


def _global_batch(overrides: list[str]) -> int:
    from dtrain.config.validate import load_config

    return int(load_config([*overrides, "run.name=plan"], 1).trainer.global_batch_size)


def plan(study: Study) -> list[Point]:
    """Every point with its overrides, each validated for its world size; ConfigError lists all problems."""
    from dtrain.config.validate import load_config

    points, problems = [], []
    for model, model_overrides in study.models.items():
        for strategy, strategy_overrides in study.strategies.items():
            base = [*study.common, *model_overrides, *strategy_overrides]
            try:
                batch = _global_batch(base)
            except ConfigError as e:
                problems += [f"{model}/{strategy}: {p}" for p in e.problems]
                continue
            smallest = min(study.world_sizes)
            for series in study.series:
                for world in study.world_sizes:
                    if f"{model}/{strategy}/{world}" in study.exclude or (world == smallest
                                                                           and series != study.series[0]):
                        continue  # the smallest point is shared by both series
                    global_batch = batch * world // smallest if series == "weak" else batch
                    overrides = [*base, f"trainer.global_batch_size={global_batch}", *RUN_OVERRIDES,
                                 f"trainer.max_steps={study.warmup_steps + study.steps}"]
                    try:
                        load_config([*overrides, "run.name=plan"], world)
                    except ConfigError as e:
                        problems += [f"{model}/{strategy} at {world} ranks ({series}): {p}" for p in e.problems]
                        continue
                    label = series if world != smallest else study.series[0]  # the shared smallest point
                    reference, reference_world = reference_of(overrides, world)
                    try:
                        if reference:
                            load_config([*reference, "run.name=plan"], reference_world)
                    except ConfigError as e:
                        problems += [f"{model}/{strategy} at {world} ranks ({series}), its reference run: {p}"
                                     for p in e.problems]
                        continue
                    points.append(Point(model, strategy, label, world, overrides, global_batch, reference,
                                        reference_world))
    if problems:
        raise ConfigError(problems + ["exclude a point with `exclude: [model/strategy/world_size]`"])
    return points


def reference_of(overrides: list[str], world_size: int) -> tuple[list[str] | None, int]:
    """The overrides (and pretended world size) of a point's reference: one process doing one rank's work
    of the point with no communication, alone on the machine. What the projection adds to it (collectives,
    co-running ranks, the bubble) is then the part the closed loop tests.

    - data parallelism (``ddp``): DDP on one rank with that rank's share of the batch (torch's DDP refuses
      the fake group; a 1-rank group's all-reduce moves nothing, while DDP's own hooks and buckets stay);
    - any other mesh without a pipeline: rank 0 of the same layout on torch's ``fake`` process group
      (collectives return at once; FSDP2's and DTensor's own work per step stays);
    - a pipeline (pp only): every stage of it on one rank, run by torch's interleaved schedule: the whole
      pipeline's work with its schedule's per-action work, stage hand-offs local (a lone rank of the
      pipeline cannot run on the fake group: its stages exchange shapes with their neighbours before the
      first step). The projection anchors at it as at a 1-rank point; a pipeline mixed with other
      dimensions has none."""
    from dtrain.config.validate import load_config
    from dtrain.strategies.layout import parallel_dims
    from dtrain.strategies.pipeline import pipeline_shape

    if world_size == 1:
        return None, 1
    cfg = load_config([*overrides, "run.name=plan"], world_size)
    dims = parallel_dims(cfg.strategy.name, cfg.strategy, world_size)
    if dims is None or (dims.pp > 1 and dims.pp != world_size):
        return None, 1
    if dims.pp > 1:
        stages = pipeline_shape(cfg, dims)["stages"]
        keep = [o for o in overrides
                if o.split("=", 1)[0] not in ("strategy.pp_schedule", "strategy.pp_stages_per_rank")]
        return [*keep, "strategy.pp_schedule=Interleaved1F1B", f"strategy.pp_stages_per_rank={stages}"], 1
    if cfg.strategy.name == "ddp":  # one replica's work: the same run on one rank and its share of the batch
        keep = [o for o in overrides if o.split("=", 1)[0] != "trainer.global_batch_size"
                and not o.startswith("strategy.dp_")]
        return [*keep, f"trainer.global_batch_size={cfg.trainer.global_batch_size // world_size}"], 1
    return [*overrides, "dist.backend=fake"], world_size


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_reference(point: Point, study: Study, run_dir: Path) -> str | None:
    """Run a point's reference: one process, rank 0 of ``reference_world`` (see :func:`reference_of`)."""
    command = [sys.executable, "-m", "dtrain", *point.reference, f"run.dir={run_dir}", f"run.name={run_dir.name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": str(point.reference_world), "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    return _run(command, env, study, run_dir)


def _run(command: list[str], env: dict[str, str], study: Study, run_dir: Path) -> str | None:
    """Run one command for ``run_dir`` (emptied first); None or the error's last lines."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=study.timeout_s,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        return f"did not finish within {study.timeout_s:.0f} s"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "stderr.log").write_text(done.stderr[-20000:])
    if done.returncode != 0:
        return f"exit {done.returncode}: " + " | ".join(done.stderr.strip().splitlines()[-3:])
    return None


def _run_point(point: Point, study: Study, run_dir: Path) -> str | None:
    """Run one point through torchrun; None or the error's last lines."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={point.world_size}",
               "-m", "dtrain", *point.overrides, f"run.dir={run_dir}", f"run.name={run_dir.name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return _run(command, env, study, run_dir)


def _measured_rows(run_dir: Path, study: Study) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("step", 0) > study.warmup_steps and "step_time_s" in r]


def _complete(run_dir: Path, study: Study) -> bool:
    return len(_measured_rows(run_dir, study)) >= study.steps


def step_jitter_cv(step_times: list[float]) -> float | None:
    """The spread of a run's step time from step to step, relative to its mean: the RMS of successive
    differences over sqrt(2) (a slow drift of the whole machine, which every rank sees alike and which
    costs no waiting, cancels out; what one process suffers on its own stays). A single-process run's
    value is the projection's ``step_jitter_cv``: n synchronous ranks wait for the slowest of them."""
    if len(step_times) < 3:
        return None
    diffs = [b - a for a, b in zip(step_times, step_times[1:])]
    return (sum(d * d for d in diffs) / len(diffs) / 2) ** 0.5 / statistics.mean(step_times)


def _reference_steps(run_dir: Path, study: Study) -> tuple[float | None, float | None]:
    """A reference run's median step and its step-to-step spread (None, None without measured steps)."""
    times = [r["step_time_s"] for r in _measured_rows(run_dir, study)]
    return (statistics.median(times), step_jitter_cv(times)) if times else (None, None)


def summarize(point: Point, study: Study, run_dir: Path, cpus: int) -> Summary:
    summary = Summary(point.model, point.strategy, point.series, point.world_size, point.global_batch,
                      run_dir=str(run_dir), oversubscribed=point.world_size > cpus)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        summary.error = f"no metrics in {run_dir}"
        return summary
    rows = _measured_rows(run_dir, study)
    if not rows:
        summary.error = f"no measured steps in {path}"
        return summary

    def median(key: str) -> float | None:
        values = [r[key] for r in rows if key in r]
        return statistics.median(values) if values else None

    summary.steps_measured = len(rows)
    summary.step_time_s = median("step_time_s")
    summary.step_time_best_s = min(r["step_time_s"] for r in rows)
    summary.step_jitter_cv = step_jitter_cv([r["step_time_s"] for r in rows])
    summary.tokens_per_s = median("tokens_per_s")
    summary.tokens_per_s_per_rank = summary.tokens_per_s / point.world_size if summary.tokens_per_s else None
    summary.exposed_comm_fraction = median("exposed_comm_fraction")
    if summary.exposed_comm_fraction is not None:
        summary.exposed_comm_fraction_by_dim = {
            dim: statistics.median(r[f"exposed_comm_{dim}_s"] / r["step_time_s"] for r in rows)
            for dim in ("dp", "tp", "pp", "cp", "other")}
    summary.bubble_fraction = median("bubble_fraction")
    summary.comm_bytes_per_step = median("comm_bytes")
    peaks = [r["peak_mem_gib"] for r in rows if "peak_mem_gib" in r]
    summary.peak_memory_gib = max(peaks) if peaks else None
    return summary


def add_efficiency(summaries: list[Summary]) -> None:
    """Strong: tokens/s against the smallest point x world ratio; weak: tokens/s per rank against it."""
    smallest: dict[tuple[str, str], Summary] = {}
    for s in summaries:
        key = (s.model, s.strategy)
        if s.tokens_per_s and (key not in smallest or s.world_size < smallest[key].world_size):
            smallest[key] = s
    for s in summaries:
        base = smallest.get((s.model, s.strategy))
        if base is None or not s.tokens_per_s_per_rank:
            continue
        ratio = s.tokens_per_s_per_rank / base.tokens_per_s_per_rank
        if s is base:
            s.strong_efficiency = s.weak_efficiency = 1.0
        elif s.series == "strong":
            s.strong_efficiency = ratio
        else:
            s.weak_efficiency = ratio


def _anchored(case, measured: float, compute_only: bool = False):
    """The factor on ``case``'s compute rate that makes its projection take ``measured`` seconds (log
    bisection; the step time falls monotonically as the rate rises). ``compute_only``: make the step's
    compute and optimizer alone, one rank with the machine to itself, take ``measured`` (a reference run)."""
    from dataclasses import replace as with_fields

    from dtrain.scaling.projection import project

    hw = case.hardware
    if compute_only:  # nobody shares the cores
        hw = with_fields(hw, corun_slowdown=1.0, compute_slots_per_node=None, step_jitter_cv=0.0)

    def at(scale: float):
        return with_fields(case, hardware=with_fields(hw, peak_tflops=hw.peak_tflops * scale,
                                                      peak_tflops_fp32=hw.peak_tflops_fp32 * scale))

    def seconds(scale: float) -> float:
        result = project(at(scale))
        return result.breakdown_s["compute"] + result.breakdown_s["optimizer"] if compute_only else result.step_time_s

    low, high = 0.01, 100.0
    for _ in range(50):
        middle = (low * high) ** 0.5
        if seconds(middle) > measured:
            low = middle
        else:
            high = middle
    return (low * high) ** 0.5


def add_projection(summaries: list[Summary], points: list[Point], hardware: str) -> None:
    """The projection of each measured point on ``hardware`` (same model, layout and batch).

    On a CPU preset (``async_device: false``) the closed loop anchors the compute rate of each point at
    a single-process measurement of the same work: the point's reference run where it has one (one
    rank's work without communication, alone: FSDP2's and DTensor's own costs included, see
    :func:`reference_of`), else its model and strategy's 1-rank point (a pipeline). What the projection
    adds to that, and what the comparison with the measured step tests, is everything that comes with
    more ranks: the collectives (gloo's measured latency and bandwidth), ranks competing for the cores,
    the pipeline bubble, and waiting for the slowest rank (each rank's step-to-step spread as the same
    single-process measurement showed it: ``step_jitter_cv``)."""
    from dataclasses import replace as with_fields

    from dtrain.scaling.case import problems_of
    from dtrain.scaling.hardware import resolve
    from dtrain.scaling.projection import project

    by_key = {p.key: p for p in points}
    preset = resolve(hardware)
    anchors: dict[tuple[str, str], float] = {}
    jitters: dict[tuple[str, str], float | None] = {}
    cases = {}
    for s in summaries:
        point = by_key[f"{s.model}/{s.strategy}/{s.series}/{s.world_size}"]
        try:
            case = case_from_overrides(point.overrides, point.world_size, hardware)
        except ConfigError as e:
            s.projection = {"error": "; ".join(e.problems)}
            continue
        if problems_of(case):
            s.projection = {"error": "; ".join(problems_of(case))}
            continue
        cases[id(s)] = case, point
        if s.world_size == 1 and s.step_time_s and not preset.async_device:
            anchors[(s.model, s.strategy)] = _anchored(case, s.step_time_s)
            jitters[(s.model, s.strategy)] = s.step_jitter_cv
    for s in summaries:
        if id(s) not in cases:
            continue
        case, point = cases[id(s)]
        scale = anchors.get((s.model, s.strategy), 1.0)
        anchor = "1-rank point" if (s.model, s.strategy) in anchors else None
        if s.reference_step_time_s and not preset.async_device and case.parallel.pp > 1:
            # the whole pipeline on one rank: anchor as at a 1-rank point
            reference = case_from_overrides(point.reference, point.reference_world, hardware)
            scale, anchor = _anchored(reference, s.reference_step_time_s), "reference run (1 rank)"
        elif s.reference_step_time_s and not preset.async_device:
            scale, anchor = _anchored(case, s.reference_step_time_s, compute_only=True), "reference run"
        # each rank's step-to-step spread as its reference run (else the 1-rank point) showed it
        jitter = case.hardware.step_jitter_cv
        if not preset.async_device:
            measured = s.reference_step_jitter_cv
            if measured is None:
                measured = jitters.get((s.model, s.strategy))
            jitter = jitter if measured is None else measured
        hw = case.hardware
        case = with_fields(case, hardware=with_fields(hw, peak_tflops=hw.peak_tflops * scale,
                                                      peak_tflops_fp32=hw.peak_tflops_fp32 * scale,
                                                      step_jitter_cv=jitter))
        result = project(case)
        s.projection = {"hardware": hardware, "anchor": anchor, "step_jitter_cv": jitter,
                        "compute_gflops": round(case.hardware.peak_tflops * 1e3, 2),
                        "step_time_s": result.step_time_s, "exposed_comm_fraction": result.exposed_comm_fraction,
                        "bubble_fraction": result.bubble_fraction,
                        "error_vs_measured": (result.step_time_s - s.step_time_s) / s.step_time_s
                        if s.step_time_s else None,
                        "error_vs_best": (result.step_time_s - s.step_time_best_s) / s.step_time_best_s
                        if s.step_time_best_s else None}


def case_from_overrides(overrides: list[str], world_size: int, hardware: str | dict[str, Any]):
    """The CASE of a dtrain run (built-in GPT): model shape, layout, batch, precision, on ``hardware`` (a
    preset name or a block)."""
    from dtrain.config.validate import load_config
    from dtrain.models.gpt_plans import stage_layer_counts
    from dtrain.scaling.case import parse
    from dtrain.strategies.layout import parallel_dims

    cfg = load_config([*overrides, "run.name=plan"], world_size)
    m, s, t = cfg.model, cfg.strategy, cfg.trainer
    if not {"n_layer", "d_model", "n_head", "vocab_size"} <= set(m.keys()):
        raise ConfigError(f"model._target_={m._target_} does not declare its shape; only the built-in GPT projects")
    dims = parallel_dims(s.name, s, world_size)
    if dims is None:
        raise ConfigError(f"strategy={s.name} has no mesh layout to project")
    zero = 3 if dims.dp_shard > 1 else 0
    # the pipeline's split as dtrain makes it (one stage per rank, as projected): uneven splits run at
    # the pace of their largest stage
    split = stage_layer_counts(m.n_layer, dims.pp, s.get("pp_layers_per_stage")) if dims.pp > 1 else []
    stage_layers = split if len(set(split)) > 1 else []
    recompute = {"none": "none", "full": "full", "selective": "selective"}[s.activation_checkpointing]
    return parse({
        "model": {"layers": m.n_layer, "hidden": m.d_model, "heads": m.n_head, "kv_heads": m.n_head,
                  "ffn_hidden": m.get("mlp_ratio", 4) * m.d_model, "gated_mlp": False, "vocab": m.vocab_size,
                  "seq_len": cfg.data.seq_len, "attention": "flash"},
        "parallel": {"gpus": world_size, "tp": dims.tp, "pp": dims.pp, "vpp": 1, "cp": 1,
                     "micro_batch": t.micro_batch_size, "global_batch": t.global_batch_size, "zero": zero,
                     "sequence_parallel": bool(s.sequence_parallel and dims.tp > 1), "recompute": recompute,
                     "dp_overlap": s.name != "single", "stage_layers": stage_layers},
        "precision": t.precision, "hardware": hardware})


def main(argv: Sequence[str]) -> int:
    import argparse

    from dtrain.scaling.cli import _Parser, write_json

    parser = _Parser(prog="dtrain scale measure", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", help="study file (YAML)")
    parser.add_argument("--out", required=True, help="folder for runs/ and results.json")
    parser.add_argument("--plan", action="store_true", help="print the points and their overrides, run nothing")
    parser.add_argument("--collect", action="store_true", help="only summarize existing DIR/runs/ (ran elsewhere)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the runs in DIR/runs/ that finished their steps; run only the others")
    args = parser.parse_args(list(argv))
    study = load_study(args.study)
    points = plan(study)
    out = Path(args.out)
    if args.plan:
        print(json.dumps([{"point": p.key, "world_size": p.world_size, "overrides": p.overrides,
                           "reference": p.reference and {"world_size": p.reference_world, "rank": 0,
                                                         "overrides": p.reference}} for p in points], indent=2))
        return 0
    if study.launcher != "torchrun" and not args.collect:
        raise ConfigError(f"launcher={study.launcher}: this build runs studies through torchrun only; submit the "
                          f"points of `dtrain scale measure {args.study} --out {args.out} --plan` with `dtrain "
                          f"launch` (one run per point, run.dir=<out>/runs/<point>), then add --collect")
    cpus = os.cpu_count() or 1
    started = time.monotonic()
    rounds: dict[str, list[Summary]] = {p.key: [] for p in points}
    for round_ in range(study.repeats):
        order = points if round_ % 2 == 0 else points[::-1]  # alternate, against slow drifts of the load
        for index, point in enumerate(order, 1):
            run_dir, reference_dir = point.run_dir(out, round_), point.reference_dir(out, round_)
            error = None
            if not args.collect:
                label = f"round {round_ + 1}/{study.repeats} " if study.repeats > 1 else ""
                print(f"[{label}{index}/{len(points)}] {point.key} ...", end=" ", flush=True)
                t0 = time.monotonic()
                if not (args.resume and _complete(run_dir, study)):
                    error = _run_point(point, study, run_dir)
                if point.reference and not error and not (args.resume and _complete(reference_dir, study)):
                    reference_error = _run_reference(point, study, reference_dir)
                    error = reference_error and f"reference run: {reference_error}"
            summary = summarize(point, study, run_dir, cpus)
            summary.error = error or summary.error
            if point.reference:
                median, spread = _reference_steps(reference_dir, study)
                summary.reference_step_time_s, summary.reference_step_jitter_cv = median, spread
            rounds[point.key].append(summary)
            if not args.collect:
                result = summary.error or f"step {summary.step_time_s:.3f}s, {summary.tokens_per_s:.0f} tok/s, " \
                                          f"exposed comm {summary.exposed_comm_fraction or 0:.1%}"
                print(f"{result} ({time.monotonic() - t0:.0f}s)", flush=True)
    summaries = []
    for point in points:
        done = [s for s in rounds[point.key] if s.step_time_s is not None]
        best = min(done, key=lambda s: s.step_time_s) if done else rounds[point.key][0]
        best.rounds_step_time_s = [s.step_time_s for s in rounds[point.key]]
        summaries.append(best)
    failed = sum(s.error is not None for s in summaries)
    add_efficiency(summaries)
    if study.hardware:
        add_projection(summaries, points, study.hardware)
    import torch

    results = {"study": study.name, "launcher": study.launcher, "series": study.series, "steps": study.steps,
               "warmup_steps": study.warmup_steps, "repeats": study.repeats, "hardware": study.hardware,
               "machine": {"cpus": cpus, "platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__, "omp_threads_per_rank": 1},
               "seconds": round(time.monotonic() - started, 1), "points": [asdict(s) for s in summaries]}
    write_json(out / "results.json", results)
    from dtrain.scaling.report import measured_markdown

    (out / "results.md").write_text(measured_markdown(results))
    print(f"wrote {out / 'results.json'} and results.md ({len(summaries)} points, {failed} failed)")
    try:
        from dtrain.scaling.plots import measured_plots

        for plot in measured_plots(results, out):
            print(f"wrote {plot}")
    except ImportError:
        print("no plots: matplotlib is not installed (pip install 'dtrain[scaling]')")
    return 1 if failed else 0
