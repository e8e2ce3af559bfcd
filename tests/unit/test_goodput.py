"""The goodput ledger's arithmetic, its writer's robustness, ``dtrain goodput``, and the auto interval."""

from __future__ import annotations

import json
import math

import pytest

from dtrain.checkpoint.interval import WARMUP_STEPS, AutoInterval, FixedInterval, young_daly_interval_s
from dtrain.cli import run
from dtrain.metrics.goodput import (CATEGORIES, LEDGER, GoodputLedger, LedgerError, goodput_ratio, read_ledger,
                                    summarize)


def attempt(records: list, key: str, start: float, restored: int | None, steps: range, commits=(),
            end: str | None = None, step_s: float = 1.0, data_s: float = 0.25) -> float:
    """Append one attempt's records (start-up 2 s, restore 1 s when restoring); returns its last time."""
    restore_s = 1.0 if restored is not None else 0.0
    t = start + 2.0 + restore_s
    records.append({"event": "attempt", "attempt": key, "t": t, "process_start": start, "startup_s": 2.0,
                    "restore_s": restore_s, "step": restored or 0, "restored_step": restored,
                    "manifest_crc32c": None})
    for step in steps:
        t += step_s
        records.append({"event": "step", "attempt": key, "step": step, "t": t, "seconds": step_s,
                        "data_wait_s": data_s})
        if step in commits:
            t += 0.5
            records.append({"event": "commit", "attempt": key, "step": step, "t": t, "manifest_crc32c": "x"})
            records.append({"event": "checkpoint", "attempt": key, "step": step, "t": t, "seconds": 0.5,
                            "kind": "interval"})
    if end:
        t += 0.1
        records.append({"event": "end", "attempt": key, "step": steps[-1], "t": t, "reason": end})
    return t


@pytest.mark.parametrize("second_restore,lost", [(12, 2 + 2), (8, 2 + 6), (None, 2 + 8 + 6)],
                         ids=["newest commit", "fell back past a corrupt step", "nothing committed survived"])
def test_lost_steps_are_the_ones_after_the_restored_step(second_restore, lost):
    records: list = []
    end_a = attempt(records, "a", 100.0, None, range(1, 11), commits=(4, 8))  # killed after step 10
    end_b = attempt(records, "b", end_a + 7.0, 8, range(9, 15), commits=(12,))  # killed after step 14
    first = second_restore or 0
    end_c = attempt(records, "c", end_b + 5.0, second_restore, range(first + 1, 17), commits=(16,), end="done")
    summary = summarize(records)
    assert summary.lost_steps == lost
    assert summary.productive_steps == 16  # every step of the finished run, once
    assert summary.seconds["lost"] == pytest.approx(lost * 1.0)
    assert summary.seconds["productive"] == pytest.approx(16 * 0.75)
    assert summary.seconds["data_wait"] == pytest.approx(16 * 0.25)
    assert summary.seconds["between_attempts"] == pytest.approx(12.0)
    assert summary.wall_s == pytest.approx(end_c - 100.0)
    assert sum(summary.seconds.values()) == pytest.approx(summary.wall_s)  # every second classified
    assert set(summary.seconds) == set(CATEGORIES)
    assert [a.lost_steps for a in summary.attempts][:1] == [{12: 2, 8: 2, None: 10}[second_restore]]
    assert summary.goodput == pytest.approx(16 * 0.75 / summary.wall_s)


def test_a_preempted_attempt_loses_nothing():
    records: list = []
    end_a = attempt(records, "a", 0.0, None, range(1, 8), commits=(4, 7), end="preempted")
    attempt(records, "b", end_a + 30.0, 7, range(8, 11), end="done")
    summary = summarize(records)
    assert summary.lost_steps == 0 and summary.productive_steps == 10
    assert summary.seconds["between_attempts"] == pytest.approx(30.0)


def test_writer_appends_survives_torn_lines_and_reports_the_ratio(tmp_path):
    (tmp_path / LEDGER).write_text('{"event":"step","attempt":"old","step":1,"t":1.0,"sec')  # killed mid-line
    ledger = GoodputLedger(tmp_path, world_size=2, process_start=1000.0)
    ledger.step(1, 9.0, 0.0)  # before begin(): nothing is recorded
    ledger.begin(0, None, None, 0.0)
    ledger.step(1, 0.5, 0.1)
    ledger.checkpoint(1, 0.2, "interval")
    ledger.commit(1, "abcd1234")
    ledger.end(1, "done")
    ledger.end(1, "error")  # the first ending counts
    records = read_ledger(tmp_path)
    assert [r["event"] for r in records] == ["attempt", "step", "checkpoint", "commit", "end"]
    assert records[-1]["reason"] == "done" and records[0]["world_size"] == 2
    summary = summarize(records)
    assert summary.productive_steps == 1 and summary.commits[0]["manifest_crc32c"] == "abcd1234"
    assert goodput_ratio(tmp_path) == pytest.approx(summary.goodput)
    assert 0 < ledger.ratio() < 1


def test_a_ledger_that_cannot_be_written_never_stops_training(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    ledger = GoodputLedger(blocker / "run", process_start=0.0)
    ledger.begin(0, None, None, 0.0)
    for step in range(1, 4):
        ledger.step(step, 0.1, 0.0)
    ledger.end(3, "done")
    warnings = [r for r in caplog.records if "cannot be written" in r.getMessage()]
    assert len(warnings) == 1  # said once, not at every step


def test_goodput_command(tmp_path, capsys):
    records: list = []
    end_a = attempt(records, "a", 100.0, None, range(1, 7), commits=(4,))
    attempt(records, "b", end_a + 3.0, 4, range(5, 9), commits=(8,), end="done")
    (tmp_path / LEDGER).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert run(["goodput", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["lost_steps"] == 2 and data["productive_steps"] == 8
    assert [a["ended"] for a in data["attempts"]] == ["killed (no end record)", "done"]
    assert math.isclose(sum(data["seconds"].values()), data["wall_s"])
    assert run(["goodput", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "2 steps after the last commit" in text and "restored step 4" in text and "goodput of" in text


def test_goodput_of_a_folder_without_a_ledger_says_so(tmp_path, capsys):
    assert run(["goodput", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtrain:") and "no goodput ledger" in err[0]
    with pytest.raises(LedgerError):
        read_ledger(tmp_path)


def test_auto_interval_measures_a_save_then_follows_young_daly():
    mtbi, step_s, cost = 1800.0, 2.0, 5.0
    auto = AutoInterval(mtbi, start_step=100)
    due = [step for step in range(101, 101 + WARMUP_STEPS) if auto.due(step, step_s)]
    assert due == [100 + WARMUP_STEPS]  # no cost known: save once, right after the warm-up, to measure it
    auto.saved(100 + WARMUP_STEPS, cost)
    expected = round(young_daly_interval_s(cost, mtbi) / step_s)
    assert young_daly_interval_s(cost, mtbi) == pytest.approx(math.sqrt(2 * cost * mtbi))
    assert auto.every == expected == 67
    steps = [s for s in range(106, 400) if auto.due(s, step_s)]
    assert steps[0] == 105 + expected
    auto.saved(steps[0], 45.0)  # slower saves: the median of (5, 45) is 25 s, so a longer interval
    assert auto.every == round(math.sqrt(2 * 25.0 * mtbi) / step_s)
    assert "Young/Daly" in auto.reason and "MTBI 1800 s" in auto.reason


def test_auto_interval_restarts_its_count_at_the_restored_step():
    auto = AutoInterval(600.0)
    auto.restart_at(40)
    assert not any(auto.due(s, 1.0) for s in range(41, 40 + WARMUP_STEPS))
    assert auto.due(40 + WARMUP_STEPS, 1.0)


def test_fixed_interval_keeps_its_meaning():
    fixed = FixedInterval(4)
    assert [s for s in range(1, 13) if fixed.due(s)] == [4, 8, 12]
    assert not any(FixedInterval(0).due(s) for s in range(1, 20))
