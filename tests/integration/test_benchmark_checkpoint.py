"""Smoke run of benchmarks/checkpoint.py on a tiny state: every reported field is there, each figure is what
its samples give, and every arm really wrote the bytes it is credited with. No timing asserts."""

from __future__ import annotations

import json
import statistics
import sys

import pytest

from tests.helpers import run_cmd

REPEATS, S3_REPEATS, THREADS = 2, 2, 4


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("checkpoint") / "checkpoint.json"
    proc = run_cmd([sys.executable, "benchmarks/checkpoint.py", "--out", str(out), "--d-model", "64", "--layers", "1",
                    "--repeats", str(REPEATS), "--s3-repeats", str(S3_REPEATS), "--write-threads", str(THREADS),
                    "--disk-probe-mib", "8", "--overlap-d-model", "64", "--overlap-layers", "1",
                    "--overlap-idle-steps", "3"], timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def check_figure(figure: dict, payload: int, samples: int) -> None:
    """``s`` is the median of its samples and ``MBps`` the payload over it."""
    assert len(figure["samples_s"]) == samples
    assert figure["s"] == pytest.approx(statistics.median(figure["samples_s"]), rel=1e-12)
    assert figure["MBps"] == pytest.approx(payload / figure["s"] / 1e6, rel=1e-12)


def test_local_raw_baseline_writes_the_same_bytes_as_dtrain(result):
    local = result["local"]
    payload = local["state_bytes"]
    assert local["write_threads"] == THREADS
    assert local["raw"]["threads"]["files"] == THREADS and local["raw"]["one_file"]["files"] == 1
    for raw in local["raw"].values():
        assert raw["bytes_written"] == payload  # every tensor byte, once
        check_figure(raw, payload, REPEATS)
    committed = local["committed"]
    assert committed["verified"] is True and committed["step"] == REPEATS
    assert committed["shard_files"] == THREADS  # DCP split the state into as many files as the raw baseline
    # DCP frames each entry (torch.save) and stores the optimizer's scalars beside the tensors: a little more
    assert payload <= local["dtrain_shard_bytes"] <= 2 * payload
    assert local["dtrain_bytes_written"] == committed["bytes"] > local["dtrain_shard_bytes"]


def test_local_ratio_is_against_the_best_raw_write(result):
    local = result["local"]
    assert len(local["samples_dtrain_s"]) == REPEATS
    assert local["dtrain_save_s"] == pytest.approx(statistics.median(local["samples_dtrain_s"]), rel=1e-12)
    assert local["dtrain_MBps"] == pytest.approx(local["state_bytes"] / local["dtrain_save_s"] / 1e6, rel=1e-12)
    best = max(local["raw"], key=lambda name: local["raw"][name]["MBps"])
    assert local["best_raw"] == best and local["best_raw_MBps"] == local["raw"][best]["MBps"]
    assert local["ratio"] == pytest.approx(local["dtrain_MBps"] / local["best_raw_MBps"], rel=1e-12)
    disk = local["disk"]
    for name in ("one_thread", "threads"):
        check_figure(disk[name], disk["probe_bytes"], REPEATS)
    assert disk["probe_bytes"] == 8 * 2**20
    assert disk["best_MBps"] == max(disk["one_thread"]["MBps"], disk["threads"]["MBps"])
    assert local["ratio_vs_disk"] == pytest.approx(local["dtrain_MBps"] / disk["best_MBps"], rel=1e-12)


def test_async_figures_come_from_their_samples(result):
    a = result["async"]
    assert len(a["samples_sync_s"]) == len(a["samples_blocked_s"]) == REPEATS
    assert a["ratio"] == pytest.approx(a["async_blocked_s"] / a["sync_save_s"], rel=1e-12)
    for during_key, slowdown_key in (("samples_during_save_step_s", "samples_overlap_slowdown"),
                                     ("samples_during_raw_write_step_s", "samples_overlap_slowdown_raw_write")):
        during, idle = a[during_key], a["samples_idle_step_s"]
        assert len(during) == len(idle) == REPEATS and all(len(steps) == 3 for steps in idle)
        assert all(len(steps) >= 1 for steps in during)
        expected = [statistics.median(d) / statistics.median(i) for d, i in zip(during, idle)]
        assert a[slowdown_key] == pytest.approx(expected, rel=1e-12)
    assert a["overlap_slowdown"] == pytest.approx(statistics.median(a["samples_overlap_slowdown"]), rel=1e-12)
    assert a["overlap_slowdown_raw_write"] == pytest.approx(
        statistics.median(a["samples_overlap_slowdown_raw_write"]), rel=1e-12)
    assert a["steps_overlapped"] == [len(steps) for steps in a["samples_during_save_step_s"]]


def test_s3_has_a_raw_baseline_and_several_samples(result):
    s3 = result["s3"]
    payload = s3["state_bytes"]
    assert payload == result["local"]["state_bytes"] and s3["parallel_requests"] == THREADS
    assert s3["committed"]["verified"] is True and s3["committed"]["shard_files"] == THREADS
    for figure in (*s3["save"].values(), *s3["load"].values()):
        if isinstance(figure, dict):
            check_figure(figure, payload, S3_REPEATS)
    assert s3["save"]["ratio"] == pytest.approx(s3["save"]["dtrain"]["MBps"] / s3["save"]["raw"]["MBps"], rel=1e-12)
    assert s3["load"]["ratio"] == pytest.approx(
        s3["load"]["dtrain_verified"]["MBps"] / s3["load"]["raw"]["MBps"], rel=1e-12)
    assert s3["load"]["ratio_unverified"] == pytest.approx(
        s3["load"]["dtrain_unverified"]["MBps"] / s3["load"]["raw"]["MBps"], rel=1e-12)
