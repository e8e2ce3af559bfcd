"""The goodput ledger under real SIGKILLs, and the auto interval on two real ranks."""

from __future__ import annotations

import json
import re

from dtrain.cli import run
from dtrain.metrics.goodput import read_ledger
from tests.helpers import TINY, read_metrics, torchrun


def goodput_json(run_dir, capsys) -> dict:
    capsys.readouterr()
    assert run(["goodput", str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def rows_by_attempt(run_dir) -> list[list[dict]]:
    """metrics.jsonl split where the step count goes back (a resumed attempt appends to the file)."""
    attempts: list[list[dict]] = []
    for row in read_metrics(run_dir):
        if not attempts or row["step"] <= attempts[-1][-1]["step"]:
            attempts.append([])
        attempts[-1].append(row)
    return attempts


def test_a_run_killed_twice_accounts_for_its_lost_steps_exactly(tmp_path, capsys):
    overrides = [*TINY, "checkpoint.interval_steps=4", "trainer.max_steps=16", f"run.dir={tmp_path}"]
    # 1st attempt: steps 1-8, SIGKILL of rank 0 while saving step 8 (shards written, no manifest): 4 committed
    first = torchrun(2, overrides, DTRAIN_FAILPOINT="after_shards@0#8")
    assert first.returncode != 0 and "dtrain failpoint" in first.stderr, first.stderr[-2000:]
    # 2nd: resumes 4, steps 5-12, every rank SIGKILLed half-way through its shards of step 12: 8 committed
    second = torchrun(2, overrides, DTRAIN_FAILPOINT="mid_shard@*#12")
    assert second.returncode != 0 and "dtrain failpoint" in second.stderr, second.stderr[-2000:]
    third = torchrun(2, overrides)
    assert third.returncode == 0, third.stderr[-3000:]

    report = goodput_json(tmp_path, capsys)
    attempts = report["attempts"]
    assert [a["restored_step"] for a in attempts] == [None, 4, 8]
    assert [(a["first_step"], a["last_step"]) for a in attempts] == [(0, 8), (4, 12), (8, 16)]
    assert [a["lost_steps"] for a in attempts] == [4, 4, 0]  # 5-8 of the first, 9-12 of the second
    assert [a["ended"] for a in attempts] == ["killed (no end record)"] * 2 + ["done"]
    assert report["lost_steps"] == 8 and report["productive_steps"] == 16

    # the lost seconds are exactly those steps' recorded times, which the metrics file (another writer) confirms
    steps = {(r["attempt"], r["step"]): r["seconds"] for r in read_ledger(tmp_path) if r["event"] == "step"}
    ids = [a["attempt"] for a in attempts]
    lost = [(ids[0], s) for s in range(5, 9)] + [(ids[1], s) for s in range(9, 13)]
    assert report["seconds"]["lost"] == sum(steps[key] for key in lost)
    for index, rows in enumerate(rows_by_attempt(tmp_path)):
        for row in rows:  # a killed save's step has no metrics row; every other step agrees to the bit
            assert steps[(ids[index], row["step"])] == row["step_time_s"]
    assert abs(sum(report["seconds"].values()) - report["wall_s"]) < 1e-6
    assert report["seconds"]["between_attempts"] > 0 and report["seconds"]["restore"] > 0
    # every restore loaded a manifest whose commit was recorded
    committed = {(c["step"], c["manifest_crc32c"]) for c in report["commits"]}
    assert [(r["step"], r["manifest_crc32c"]) in committed for r in report["restores"]] == [True, True]


def test_auto_interval_agrees_on_every_rank_and_follows_its_logged_reasoning(tmp_path):
    STEPS = 40
    # an MTBI this short makes the interval a few steps, so several interval saves follow the measuring one
    # (even when a loaded machine makes a save 2 s: sqrt(2 x 2 s x 0.01 s) = 0.2 s, a few steps)
    overrides = [*TINY, "checkpoint.interval_steps=auto", "checkpoint.mtbi_s=0.01", "checkpoint.keep_last=1",
                 f"trainer.max_steps={STEPS}", f"run.dir={tmp_path}"]
    result = torchrun(2, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    decisions = [int(n) for n in re.findall(r"checkpoint interval auto: every (\d+) steps", result.stderr)]
    assert "no save measured yet" in result.stderr and "Young/Daly sqrt(2 x" in result.stderr
    commits = [r["step"] for r in read_ledger(tmp_path) if r["event"] == "commit"]
    expected, step = [5], 5  # the warm-up's measuring save, then each logged interval in turn
    for every in decisions:
        if step + every >= STEPS:
            break
        step += every
        expected.append(step)
    assert commits == expected + [STEPS], (commits, decisions)  # and the final save
    assert len(commits) >= 4, commits
