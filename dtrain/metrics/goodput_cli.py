"""``dtrain goodput RUN_DIR [--json]``: the breakdown of a run's wall time and its goodput ratio."""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Sequence

from dtrain.config.errors import ArgumentParser, ConfigError
from dtrain.metrics.goodput import LEDGER, Attempt, LedgerError, Summary, read_ledger, summarize

LABELS = {"productive": "productive steps", "data_wait": "data wait", "startup": "start-up", "restore": "restore",
          "checkpoint": "checkpoint (blocking)", "evaluation": "evaluation", "lost": "lost (re-done after a failure)",
          "between_attempts": "between attempts", "other": "other (logging, vote, sample)"}


def _still_running(attempt: Attempt) -> bool:
    if attempt.host != socket.gethostname() or attempt.pid <= 0:
        return False
    try:
        os.kill(attempt.pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _ending(attempt: Attempt, last: bool) -> str:
    if attempt.ended:
        return attempt.ended
    if last and _still_running(attempt):
        return "running"
    return "killed (no end record)"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def render(summary: Summary, where: str) -> str:
    lines = [f"goodput of {where}: {summary.goodput:.1%} ({_duration(summary.seconds['productive'])} productive of "
             f"{_duration(summary.wall_s)} wall, {len(summary.attempts)} attempt(s))"]
    for key, label in LABELS.items():
        value = summary.seconds[key]
        share = value / summary.wall_s if summary.wall_s > 0 else 0.0
        note = ""
        if key == "productive":
            note = f"  {summary.productive_steps} steps"
        elif key == "lost":
            note = f"  {summary.lost_steps} steps after the last commit"
        lines.append(f"  {label:<32} {_duration(value):>12} {share:>7.1%}{note}")
    lines.append("attempts:")
    for index, a in enumerate(summary.attempts):
        started = datetime.datetime.fromtimestamp(a.process_start).strftime("%Y-%m-%d %H:%M:%S")
        origin = f"restored step {a.restored_step}" if a.restored_step is not None else "fresh start"
        steps = f"steps {a.first_step + 1}-{a.last_step}" if a.last_step is not None else "no steps"
        lost = f", {a.lost_steps} lost ({_duration(a.lost_s)})" if a.lost_steps else ""
        lines.append(f"  {index + 1}. {started} {origin}, {steps}{lost}, ended: "
                     f"{_ending(a, index == len(summary.attempts) - 1)}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    parser = ArgumentParser(prog="dtrain goodput", description="Where a run's wall time went, across restarts.")
    parser.add_argument("run_dir", help=f"the run directory (holds {LEDGER})")
    parser.add_argument("--json", action="store_true", help="print the breakdown as JSON")
    try:
        args = parser.parse_args(list(argv))
        path = Path(args.run_dir)
        if not path.is_dir():
            raise ConfigError(f"dtrain goodput: {path} is not a directory (give a run directory, e.g. runs/NAME)")
        summary = summarize(read_ledger(path / LEDGER))
    except (ConfigError, LedgerError) as e:
        print((e if isinstance(e, ConfigError) else ConfigError(str(e))).render(), file=sys.stderr)
        return 2
    if args.json:
        data = summary.to_dict()
        last = len(summary.attempts) - 1
        for index, (record, attempt) in enumerate(zip(data["attempts"], summary.attempts)):
            record["ended"] = _ending(attempt, index == last)
        print(json.dumps({"run_dir": str(path), **data}, indent=2))
    else:
        print(render(summary, str(path)))
    return 0
