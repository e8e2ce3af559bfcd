"""Bad input, swept: every case exits non-zero with exactly one line beginning ``dtrain:`` and no
traceback, creates no checkpoint step, and leaves existing checkpoints byte-identical.

One process, through ``dtrain.cli.run`` (what the console script calls), so the sweep stays cheap; the
classes a new user meets: every config group, the subcommands, storage URIs and stores, the
environment a launcher leaves, and resume.
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from pathlib import Path

import pytest

from dtrain.cli import run

SMALL = ["strategy=single", "model.n_layer=1", "model.d_model=32", "data.seq_len=16", "data.max_bytes=200000",
         "trainer.global_batch_size=4", "trainer.micro_batch_size=2", "trainer.eval_every=0",
         "trainer.sample_tokens=0", "logging.progress=off", "trainer.max_steps=2", "checkpoint.interval_steps=1"]


@pytest.fixture(scope="module")
def committed(tmp_path_factory) -> Path:
    """A run with committed steps 1 and 2, the checkpoints every case must leave untouched."""
    run_dir = tmp_path_factory.mktemp("committed")
    assert run([*SMALL, f"run.dir={run_dir}"]) == 0
    return run_dir


def snapshot(folder: Path) -> dict[str, str]:
    """Every file of the run folder (checkpoints, config, metrics) by content; leases come and go."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "_writers" not in p.parts}


def live_lease(run_dir: Path) -> None:
    """Another job's writer lease, renewed just now, on another host."""
    leases = run_dir / "checkpoints" / "_writers"
    leases.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (leases / "other.json").write_text(json.dumps({"writer": "other", "job": "slurm-9", "attempt": 0,
                                                   "host": "node-9", "pid": 4242, "started_unix": now,
                                                   "renewed_unix": now}))


SUBCOMMANDS = ("validate", "plan", "ckpt", "launch", "goodput", "scale")
SPOT = ["--spot-preemptions-per-node-hour", "0.01", "--on-demand-price", "4", "--spot-price", "1.2",
        "--out", "/nonexistent/dtrain-spot.json", "--save-s", "10", "--restart-s", "60"]

# (id, argv, environment, what the one line must contain); "{committed}" is the committed run's folder
CASES = [
    # config groups
    ("model group", ["model=nope"], {}, "unknown model 'nope'"),
    ("data group", ["data=nope"], {}, "unknown data 'nope'"),
    ("strategy group", ["strategy=nope"], {}, "unknown strategy 'nope'"),
    ("optim group", ["optim=nope"], {}, "unknown optim 'nope'"),
    ("logging group", ["logging=nope"], {}, "unknown logging 'nope'"),
    ("hardware group", ["hardware=nope"], {}, "unknown hardware 'nope'"),
    ("checkpoint group", ["checkpoint=nope"], {}, "unknown checkpoint 'nope'"),
    ("experiment group", ["experiment=nope"], {}, "unknown experiment 'nope'"),
    ("launcher group", ["launcher=nope"], {}, "unknown launcher 'nope'"),
    ("unknown key", ["trainer.nonexistent=1"], {}, "trainer.nonexistent"),
    ("wrong type", ["trainer.max_steps=abc"], {}, "trainer.max_steps"),
    ("negative lr", ["optim.lr=-1"], {}, "optim.lr=-1.0 must be positive"),
    ("zero steps", ["trainer.max_steps=0"], {}, "trainer.max_steps=0 must be positive"),
    ("batch does not divide", ["trainer.global_batch_size=6", "trainer.micro_batch_size=4"], {},
     "trainer.global_batch_size=6 is not divisible"),
    ("precision", ["trainer.precision=fp8"], {}, "trainer.precision=fp8 is not one of"),
    ("device", ["trainer.device=tpu"], {}, "trainer.device=tpu is not one of"),
    ("backend", ["dist.backend=mpi"], {}, "dist.backend=mpi is not one of"),
    ("schedule", ["optim.schedule=weird"], {}, "optim.schedule=weird is not one of"),
    ("heads do not divide width", ["model.d_model=30", "model.n_head=4"], {}, "model.d_model=30 is not divisible"),
    ("degree on single", ["strategy.tp=2"], {}, "would be ignored"),
    ("pipeline schedule", ["strategy=pp", "strategy.pp_schedule=Zigzag"], {}, "strategy.pp_schedule=Zigzag"),
    ("memory does not fit", ["data.seq_len=100000", "data.max_bytes=3000000", "trainer.micro_batch_size=16",
                             "trainer.global_batch_size=16",
                             "model.n_layer=4", "model.d_model=128"], {}, "would need about"),
    ("straggler threshold", ["monitor.straggler_threshold=1.5"], {}, "monitor.straggler_threshold"),
    ("prometheus port in use", ["logging.prometheus.port={busy_port}"], {}, "Address already in use"),
    # storage
    ("bucket forgotten", ["checkpoint.uri=s3://"], {}, "names no bucket or host"),
    ("gs bucket forgotten", ["checkpoint.uri=gs://"], {}, "names no bucket or host"),
    ("scheme without //", ["checkpoint.uri=s3:bucket/run"], {}, "has no '//' after 's3:'"),
    ("unknown protocol", ["checkpoint.uri=foo://x/y"], {}, "unknown protocol foo://"),
    ("driver not installed", ["checkpoint.uri=hdfs://namenode/run"], {}, "hdfs"),
    ("unwritable path", ["checkpoint.uri=/proc/dtrain-ckpt"], {}, "is not usable"),
    ("no credentials", ["checkpoint.uri=s3://bkt/run", "+checkpoint.storage_options.endpoint_url=http://127.0.0.1:9"],
     {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_PROFILE": None}, "no credentials found"),
    ("keep_last", ["checkpoint.keep_last=0"], {}, "checkpoint.keep_last=0 must be >= 1"),
    ("async mode", ["checkpoint.async_mode=fast"], {}, "checkpoint.async_mode=fast is not one of"),
    ("signal name", ["checkpoint.preemption_signals=[SIGFOO]"], {}, "'SIGFOO', not a signal name"),
    ("storage timeout", ["checkpoint.storage_timeout_s=0"], {}, "checkpoint.storage_timeout_s=0"),
    ("interval nonsense", ["checkpoint.interval_steps=often"], {}, "checkpoint.interval_steps=often must be"),
    ("auto interval without an MTBI", ["checkpoint.interval_steps=auto"], {}, "needs checkpoint.mtbi_s"),
    ("MTBI not positive", ["checkpoint.interval_steps=auto", "checkpoint.mtbi_s=0"], {},
     "checkpoint.mtbi_s=0.0 must be a positive"),
    # resume, against the committed run
    ("resume never over committed steps", ["checkpoint.resume=never", "run.dir={committed}"], {},
     "already holds committed steps"),
    ("resume a missing step", ["checkpoint.resume=99", "run.dir={committed}"], {}, "no committed step 99"),
    ("resume an older step", ["checkpoint.resume=1", "run.dir={committed}"], {}, "holds newer committed steps"),
    ("resume nonsense", ["checkpoint.resume=banana", "run.dir={committed}"], {}, "checkpoint.resume=banana"),
    ("resume another model", ["model.d_model=64", "trainer.max_steps=3", "run.dir={committed}"], {},
     "written for another model"),
    ("another live writer", ["checkpoint.grace_period_s=1", "trainer.max_steps=3", "run.dir={committed}"],
     {"lease": "yes"}, "is being written by another run"),
    # the environment a launcher leaves
    ("rank outside the world", [], {"RANK": "3", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
     "rank 3 is outside world size 2"),
    ("rank not a number", [], {"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc' is not an integer"),
    ("torchrun variables half set", ["run.name=x"], {"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR"),
    # subcommands
    ("validate", ["validate", "model=nope"], {}, "unknown model 'nope'"),
    ("plan without a world size", ["plan", "model=gpt_tiny"], {}, "--world-size"),
    ("plan that cannot split", ["plan", "--world-size", "2", "strategy=tp", "model.n_head=3", "model.d_model=96"],
     {}, "strategy.tp=2 does not divide model.n_head=3"),
    ("ckpt unknown command", ["ckpt", "frobnicate", "x"], {}, "frobnicate"),
    ("ckpt ls of a bad uri", ["ckpt", "ls", "s3://"], {}, "names no bucket or host"),
    ("ckpt verify of nothing", ["ckpt", "verify", "/nonexistent/dtrain"], {}, "no checkpoint steps under"),
    ("ckpt inspect of a root", ["ckpt", "inspect", "{committed}/checkpoints"], {}, "give the URI of one step"),
    ("launch without a partition", ["launch", "slurm", "--nodes", "2"], {}, "launcher.partition is required"),
    ("launch a local store on k8s", ["launch", "k8s", "--nodes", "2", "launcher.image=x"], {}, "share no disk"),
    ("launch degrees that do not fit", ["launch", "torchrun", "--nproc-per-node", "3", "strategy=fsdp_tp",
                                        "strategy.tp=2"], {}, "is not divisible by strategy.tp=2"),
    ("launch an unknown launcher", ["launch", "frob"], {}, "unknown launcher 'frob'"),
    ("launch a bad option value", ["launch", "slurm", "--nodes", "zero"], {}, "invalid int value: 'zero'"),
    ("goodput of a folder without a ledger", ["goodput", "{committed}/checkpoints"], {}, "no goodput ledger"),
    ("goodput of a missing folder", ["goodput", "/nonexistent/dtrain-run"], {}, "is not a directory"),
    ("spot rate out of range", ["scale", "spot", *SPOT[:1], "-0.5", *SPOT[2:]], {}, "within [0, 3600)"),
    ("spot price not positive", ["scale", "spot", *SPOT[:5], "0", *SPOT[6:]], {}, "--spot-price=0 must be a positive"),
    ("scale an unknown command", ["scale", "frob"], {}, "unknown scale command 'frob'"),
    ("scale project a missing CASE", ["scale", "project", "/nonexistent/case.yaml", "--out", "/nonexistent/p.json"], {},
     "CASE file /nonexistent/case.yaml does not exist"),
    ("scale project a bad GPU list",
     ["scale", "project", str(Path(__file__).parents[2] / "scaling_studies/cases/gpt2_124m_ddp.yaml"), "--gpus", "8,x",
      "--out", "/nonexistent/p.json"], {}, "comma-separated list of GPU counts"),
    ("scale measure a missing study", ["scale", "measure", "/nonexistent/s.yaml", "--out", "/nonexistent/d"], {},
     "study file /nonexistent/s.yaml does not exist"),
    ("spot from a run without a ledger", ["scale", "spot", *SPOT[:-4], "--from", "{committed}/checkpoints"], {},
     "no goodput ledger"),
    ("ckpt export into a missing folder", ["ckpt", "export", "{committed}/checkpoints/step_00000002",
                                           "/nonexistent/dir/m.safetensors"], {}, "/nonexistent/dir"),
]


@pytest.mark.parametrize("case,argv,environ,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(case, argv, environ, expected, committed, tmp_path, monkeypatch,
                                                   capsys):
    before = snapshot(committed)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    argv = [a.replace("{committed}", str(committed)).replace("{busy_port}", str(busy.getsockname()[1]))
            for a in argv]
    environ = dict(environ)
    if environ.pop("lease", None):
        live_lease(committed)
    for key, value in environ.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    subcommand = argv[:1] if argv and argv[0] in SUBCOMMANDS else []
    rest = argv[len(subcommand):]
    if subcommand or any(a.startswith("run.dir=") for a in rest):
        full = argv
    else:
        full = [*SMALL, f"run.dir={tmp_path / 'run'}", *rest]
    if subcommand in (["validate"], ["plan"]):
        full = [*subcommand, *[a for a in SMALL if not a.startswith("checkpoint")], *rest]
    try:
        code = run(full)
    finally:
        (committed / "checkpoints" / "_writers" / "other.json").unlink(missing_ok=True)
        busy.close()
    out = capsys.readouterr()
    text = out.err + out.out
    lines = [line for line in text.splitlines() if line.lstrip("[rank0] ").startswith("dtrain:")]
    assert code != 0, text[-2000:]
    assert "Traceback" not in text, text[-3000:]
    assert len(lines) == 1, text[-2000:]
    assert expected in lines[0], lines[0]
    assert snapshot(committed) == before
    assert not list(tmp_path.glob("**/step_*"))


def test_the_sweep_covers_every_config_group_and_subcommand():
    from dtrain.config.compose import config_dir

    groups = {p.name for p in config_dir().iterdir() if p.is_dir()}
    covered = {case[1][0].split("=")[0] for case in CASES if case[1] and "=" in case[1][0]}
    assert groups <= covered, f"config groups without a bad-input case: {sorted(groups - covered)}"
    assert len(CASES) >= 30
    assert set(SUBCOMMANDS) <= {case[1][0] for case in CASES if case[1]}
