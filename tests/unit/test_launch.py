"""Launchers in one process: the exit-code contract, rendering, bad input, grace periods, the ready-made files."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from dtrain import exit_codes
from dtrain.cli import run
from dtrain.config.errors import ConfigError
from dtrain.launch.cli import render
from dtrain.launch.spec import time_limit_seconds
from dtrain.launch.wrapper import split_args
from tests.helpers import REPO

LAUNCHERS = REPO / "launchers"


# -- the contract -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("markers,torchrun_code,expected", [
    ({0: {0: 0, 1: 0}}, 0, 0),
    ({}, 0, 0),  # workers that are not dtrain's (or wrote nothing) and a clean torchrun
    ({0: {0: 75, 1: 75}}, 1, 75),  # torchrun's blanket 1 after a committed preemption
    ({0: {1: 75}}, 1, 75),  # rank 0 killed by torchrun after rank 1 left: the commit was collective
    ({0: {0: 2}}, 1, 2),  # one rank reported the config error, torchrun killed the others
    ({0: {0: 2}, 1: {}}, 1, 2),  # ... in an earlier restart: still final
    ({0: {0: 75, 1: 75}, 1: {0: 0, 1: 0}}, 0, 0),  # a stray signal, then an in-place restart finished
    ({}, 1, 1),  # a crash writes no marker
    ({0: {0: 0}}, 1, 1),  # rank 0 finished, another crashed
    ({}, -9, 1),  # torchrun itself killed
])
def test_verdict(markers, torchrun_code, expected):
    assert exit_codes.verdict(markers, torchrun_code) == expected


def test_markers_round_trip_per_restart(tmp_path):
    env = {exit_codes.EXIT_DIR_VAR: str(tmp_path), "RANK": "3", "TORCHELASTIC_RESTART_COUNT": "1"}
    exit_codes.write_marker(75, env)
    exit_codes.write_marker(2, {**env, "RANK": "0", "TORCHELASTIC_RESTART_COUNT": "0"})
    (tmp_path / "restart0001-rank000009.code").write_text("garbage")
    assert exit_codes.read_markers(tmp_path) == {1: {3: 75}, 0: {0: 2}}
    exit_codes.write_marker(0, {"RANK": "0"})  # outside `dtrain launch run`: a no-op


def test_the_cli_and_preemption_use_the_contract():
    from dtrain.checkpoint.preemption import EXIT_PREEMPTED
    from dtrain.cli import EXIT_CONFIG_ERROR

    assert (EXIT_PREEMPTED, EXIT_CONFIG_ERROR) == (exit_codes.PREEMPTED, exit_codes.CONFIG_ERROR) == (75, 2)


def test_wrapper_arguments():
    torchrun, timeout, overrides = split_args(["--nnodes=2", "--host-timeout-s", "7", "--rdzv-id=x", "--",
                                               "model=gpt_tiny", "--looks-like-a-flag"])
    assert torchrun == ["--nnodes=2", "--rdzv-id=x"] and timeout == 7.0
    assert overrides == ["model=gpt_tiny", "--looks-like-a-flag"]


@pytest.mark.parametrize("text,seconds", [("04:00:00", 14400), ("1-00:00:30", 86430), ("4:00", None), ("x", None)])
def test_time_limits(text, seconds):
    assert time_limit_seconds(text) == seconds


# -- rendering --------------------------------------------------------------------------------------------------
def test_slurm_script_carries_the_contract_and_is_valid_bash(tmp_path):
    text, _, _ = render("slurm", ["--nodes", "2", "launcher.partition=gpu", "launcher.grace_period_s=120",
                                  "run.dir=/scratch/${run.name}"])
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue", "#SBATCH --open-mode=append", "#SBATCH --partition=gpu",
                 "readonly EXIT_OK=0 EXIT_CONFIG_ERROR=2 EXIT_PREEMPTED=75", "--shutdown-timeout=120",
                 "--signals-to-handle=SIGTERM,SIGINT,SIGUSR1", "checkpoint.grace_period_s=120",
                 "'run.dir=/scratch/${run.name}'"):  # quoted: bash must not expand Hydra's interpolation
        assert line in text
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0


def test_torchrun_script_is_valid_bash(tmp_path):
    text, _, _ = render("torchrun", ["--nodes", "2", "--nproc-per-node", "4", "strategy=fsdp",
                                     "trainer.micro_batch_size=2"])
    assert '"--rdzv-endpoint=${MASTER_ADDR:?' in text and "--nnodes=2" in text
    (tmp_path / "run.sh").write_text(text)
    assert subprocess.run(["bash", "-n", str(tmp_path / "run.sh")]).returncode == 0


# -- bad input: one line each, exit 2, nothing written ------------------------------------------------------------
BAD = [
    (["slurm", "--nodes", "3", "launcher.partition=gpu", "strategy=tp", "strategy.tp=2"],
     "multiply to 2, not the world size 3; set one of them to -1 or launch 2 ranks (launcher: 3 nodes x 1 processes)"),
    (["slurm", "--nodes", "2"], "launcher.partition is required for Slurm"),
    (["k8s", "--nodes", "2", "checkpoint=s3", "checkpoint.uri=s3://b/x"], "launcher.image is required for Kubernetes"),
    (["k8s", "--nodes", "2", "launcher.image=i"], "is a local path, but the 2 pods of a Kubernetes job share no disk"),
    (["k8s", "launcher.image=i", "launcher.job_name=My_Job"], "launcher.job_name=My_Job must be a DNS label"),
    (["slurm", "launcher=k8s", "launcher.partition=gpu"], "launcher=k8s does not match `dtrain launch slurm`"),
    (["slurm", "--nodes", "2", "launcher.nodes=2", "launcher.partition=gpu"], "both --nodes and launcher.nodes="),
    (["slurm", "launcher.partition=gpu", "launcher.time_limit=4h"], "launcher.time_limit=4h is not HH:MM:SS"),
    (["torchrun", "+checkpoint.storage_options.secret=hunter2"], "carries a credential"),
    (["torchrun", "--gpus", "2"], "unknown option --gpus"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "launcher.out"
    assert run(["launch", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("dtrain:"), err
    assert "hunter2" not in err
    assert not out.exists()


def test_every_problem_at_once(capsys):
    assert run(["launch", "k8s", "--nodes", "3", "strategy=tp", "strategy.tp=2", "launcher.max_restarts=-1"]) == 2
    err = capsys.readouterr().err
    assert "config errors:" in err and "launcher.image is required" in err and "launcher.max_restarts=-1" in err
    assert "not the world size 3" in err and "share no disk" in err


# -- grace periods ----------------------------------------------------------------------------------------------
def test_grace_is_derived_from_a_measured_save_time(capsys):
    text, _, warnings = render("slurm", ["launcher.partition=gpu", "launcher.save_time_s=100"])
    assert warnings == []
    assert "#SBATCH --signal=B:USR1@215" in text  # 2 x 100 s + 15 s
    assert "checkpoint.grace_period_s=215" in text


def test_a_requested_grace_that_cannot_hold_a_save_warns_with_the_numbers(capsys):
    assert run(["launch", "k8s", "launcher.image=i", "launcher.save_time_s=40", "launcher.grace_period_s=15"]) == 0
    captured = capsys.readouterr()
    assert "terminationGracePeriodSeconds: 15" in captured.out
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "grace period 15 s may not hold a preemption save: ~40.0 s to save" in warning[0]
    assert "= 95 s" in warning[0]


def test_the_estimate_counts_the_model_on_the_meta_device():
    _, _, warnings = render("torchrun", ["model=gpt2_124m", "launcher.grace_period_s=30", "launcher.write_mb_s=10"])
    assert len(warnings) == 1 and "124.5M parameters -> 1.49 GB of state" in warnings[0]


def test_a_checkpoint_grace_override_counts_as_the_request():
    text, _, _ = render("torchrun", ["checkpoint.grace_period_s=77"])
    command = text.split("exec ", 1)[1]
    assert "--shutdown-timeout=77" in command and command.count("checkpoint.grace_period_s=") == 1


# -- ready-made files -------------------------------------------------------------------------------------------
READY = sorted(p for p in LAUNCHERS.rglob("*") if p.is_file() and p.name != "README.md")


def test_every_platform_has_ready_files():
    assert {p.parent.name for p in READY} == {"torchrun", "slurm", "k8s"}


@pytest.mark.parametrize("path", READY, ids=[str(p.relative_to(LAUNCHERS)) for p in READY])
def test_ready_files_equal_what_dtrain_launch_renders(path: Path):
    text = path.read_text()
    header = next(line for line in text.splitlines() if line.startswith("# Rendered by: "))
    argv = shlex.split(header.removeprefix("# Rendered by: "))
    assert argv[:2] == ["dtrain", "launch"] and argv[2] == path.parent.name
    rendered, _, _ = render(argv[2], argv[3:])
    assert rendered == text, f"{path} is stale: regenerate it with `{header.removeprefix('# Rendered by: ')} " \
                             f"--out {path.relative_to(REPO)}`"


def test_unknown_launcher_kind(capsys):
    assert run(["launch", "nomad"]) == 2
    assert "unknown launcher 'nomad'" in capsys.readouterr().err
    with pytest.raises(ConfigError):
        render("slurm", ["model=nope"])


def test_a_node_waits_for_the_rendezvous_port_and_names_it(monkeypatch):
    """Pod 1 (not the rendezvous host) waits for node 0's port; a port that never opens is a clear timeout."""
    import time

    from dtrain.launch.wrapper import wait_for_host
    from tests.helpers import free_port

    monkeypatch.setenv("JOB_COMPLETION_INDEX", "1")
    port = free_port()
    started = time.monotonic()
    refused = f"rendezvous host localhost:{port} .* did not accept connections within 1 s"
    with pytest.raises(RuntimeError, match=refused):
        wait_for_host("localhost", port, 1.0)
    assert time.monotonic() - started < 10
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "0")
    wait_for_host("localhost", port, 1.0)  # pod 0 hosts the rendezvous itself: no wait
    with pytest.raises(ConfigError, match="rendezvous host 'no-such-host.invalid' did not resolve within 0.5 s"):
        wait_for_host("no-such-host.invalid", port, 0.5)
