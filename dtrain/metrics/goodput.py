"""The goodput ledger: where every second of a run's wall time went, across restarts and requeues.

Rank 0 appends one JSON line per event to ``<run.dir>/goodput.jsonl``: an ``attempt`` record when a
process has built its trainer (with its start-up and restore time and the step it restored), then
``step``, ``evaluation``, ``checkpoint`` (time the loop was blocked), ``commit`` and ``end`` records.
Each line is one ``write`` to a file opened with O_APPEND, so a line is in the kernel before the next
step starts and survives a SIGKILL of the process; ``fsync`` runs at attempt, checkpoint, commit and
end records and at most every ``FSYNC_EVERY_S`` otherwise (a crash of the machine may lose seconds of
step records, never a commit). A failed write is logged once and never stops training.

Nothing is rewritten: lost work is decided when reading. An attempt that restores step S makes every
step above S recorded by earlier attempts *lost* (it was computed and thrown away); a fresh start
(nothing restored) loses everything before it. The gap between one attempt's last record and the next
process's start is *between attempts* (the interrupted step or save, detection, teardown, queueing and
relaunch). Inside an attempt, what no record covers (logging, the preemption vote, the final text
sample) is *other*, so the categories always add up to the wall time.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

LEDGER = "goodput.jsonl"
FSYNC_EVERY_S = 10.0
CATEGORIES = ("productive", "data_wait", "startup", "restore", "checkpoint", "evaluation", "lost",
              "between_attempts", "other")
_DURABLE = {"attempt", "checkpoint", "commit", "end"}
_IMPORTED_AT = time.time()


def process_start_unix() -> float:
    """When this process started, so the interpreter's start-up and imports count as start-up time.

    Linux: the process's start in clock ticks since boot (/proc/self/stat) against the uptime; elsewhere
    the moment this module was imported."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
            seconds_since_boot = float(uptime.read().split()[0])
        return time.time() - (seconds_since_boot - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return _IMPORTED_AT


# -- writing (rank 0) -------------------------------------------------------------------------------------
class NullLedger:
    """Every rank but 0: records nothing, knows no ratio."""

    def begin(self, step: int, restored_step: int | None, manifest: str | None, restore_s: float) -> None:
        pass

    def step(self, step: int, seconds: float, data_wait_s: float) -> None:
        pass

    def evaluation(self, step: int, seconds: float) -> None:
        pass

    def checkpoint(self, step: int, blocked_s: float, kind: str) -> None:
        pass

    def commit(self, step: int, manifest: str) -> None:
        pass

    def end(self, step: int, reason: str) -> None:
        pass

    def ratio(self) -> float | None:
        return None


class GoodputLedger(NullLedger):
    """Rank 0's writer. Records nothing before ``begin`` (a run refused at start-up leaves no trace)."""

    def __init__(self, run_dir: str | Path, world_size: int = 1, process_start: float | None = None):
        self.path = Path(run_dir) / LEDGER
        self.world_size = world_size
        self.process_start = process_start_unix() if process_start is None else process_start
        self.attempt = uuid.uuid4().hex[:8]
        self._fd: int | None = None
        self._write_failed = False
        self._last_sync = 0.0
        self._ended = True  # until begin()
        self._past_productive = 0.0  # earlier attempts' surviving productive seconds
        self._first_start = self.process_start
        self._productive = 0.0

    def begin(self, step: int, restored_step: int | None, manifest: str | None, restore_s: float) -> None:
        """The trainer is built (and restored): from here on the loop runs."""
        now = time.time()
        self._ended = False
        self._append({"event": "attempt", "t": now, "process_start": self.process_start,
                      "startup_s": max(0.0, now - self.process_start - restore_s), "restore_s": restore_s,
                      "step": step, "restored_step": restored_step, "manifest_crc32c": manifest,
                      "world_size": self.world_size, "host": socket.gethostname(), "pid": os.getpid()})
        try:
            summary = summarize(read_ledger(self.path))
            self._past_productive, self._first_start = summary.seconds["productive"], summary.first_start
        except (OSError, LedgerError):
            pass  # the ratio then covers this attempt only

    def step(self, step: int, seconds: float, data_wait_s: float) -> None:
        self._productive += seconds - data_wait_s
        self._append({"event": "step", "step": step, "t": time.time(), "seconds": seconds,
                      "data_wait_s": data_wait_s})

    def evaluation(self, step: int, seconds: float) -> None:
        self._append({"event": "evaluation", "step": step, "t": time.time(), "seconds": seconds})

    def checkpoint(self, step: int, blocked_s: float, kind: str) -> None:
        self._append({"event": "checkpoint", "step": step, "t": time.time(), "seconds": blocked_s, "kind": kind})

    def commit(self, step: int, manifest: str) -> None:
        """Written just before the manifest (the commit itself), so every committed step has a record."""
        self._append({"event": "commit", "step": step, "t": time.time(), "manifest_crc32c": manifest})

    def end(self, step: int, reason: str) -> None:
        """``done``, ``preempted`` or ``error``; only the first call of an attempt counts."""
        if self._ended:
            return
        self._append({"event": "end", "step": step, "t": time.time(), "reason": reason})
        self._ended = True
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def ratio(self) -> float | None:
        """Goodput so far: productive seconds of the whole run (this attempt's uncommitted steps counted as
        productive) over its wall time. What the step metrics report as ``goodput``."""
        wall = time.time() - self._first_start
        return (self._past_productive + self._productive) / wall if wall > 0 else None

    def _append(self, record: dict[str, Any]) -> None:
        if self._ended and record["event"] != "attempt":
            return
        record["attempt"] = self.attempt
        line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
        try:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                if _ends_mid_line(self.path):  # a line torn by a kill must not swallow this one
                    line = b"\n" + line
            os.write(self._fd, line)
            now = time.monotonic()
            if record["event"] in _DURABLE or now - self._last_sync > FSYNC_EVERY_S:
                os.fsync(self._fd)
                self._last_sync = now
        except OSError as e:
            if not self._write_failed:
                self._write_failed = True
                log.warning("goodput ledger %s cannot be written (%s); training continues without it", self.path, e)


def _ends_mid_line(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def open_ledger(run_dir: str | Path, is_rank_zero: bool, world_size: int) -> NullLedger:
    """Decided once: rank 0 writes, every other rank gets a no-op."""
    return GoodputLedger(run_dir, world_size) if is_rank_zero else NullLedger()


# -- reading ------------------------------------------------------------------------------------------------
class LedgerError(ValueError):
    """No usable ledger; the message says why."""


def read_ledger(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record; a line torn by a kill is skipped."""
    path = Path(path)
    if path.is_dir():
        path = path / LEDGER
    if not path.exists():
        raise LedgerError(f"{path} does not exist: no goodput ledger (was this run directory written by a dtrain "
                          "that records one, and did any attempt get past start-up?)")
    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record and "attempt" in record:
            records.append(record)
    return records


@dataclass
class Attempt:
    attempt: str
    process_start: float
    started: float  # when the loop began
    startup_s: float
    restore_s: float
    first_step: int
    restored_step: int | None
    manifest: str | None
    host: str = ""
    pid: int = 0
    last_t: float = 0.0
    last_step: int | None = None
    steps: int = 0
    lost_steps: int = 0  # of this attempt's steps, how many a later attempt threw away
    lost_s: float = 0.0
    checkpoint_s: float = 0.0
    evaluation_s: float = 0.0
    ended: str | None = None  # done | preempted | error | None (killed, or still running)
    commits: list[int] = field(default_factory=list)


@dataclass
class Summary:
    wall_s: float
    seconds: dict[str, float]
    attempts: list[Attempt]
    productive_steps: int
    lost_steps: int
    first_start: float
    restores: list[dict[str, Any]]
    commits: list[dict[str, Any]]

    @property
    def goodput(self) -> float:
        return self.seconds["productive"] / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"goodput": self.goodput, "wall_s": self.wall_s, "seconds": self.seconds,
                "shares": {k: (v / self.wall_s if self.wall_s > 0 else 0.0) for k, v in self.seconds.items()},
                "productive_steps": self.productive_steps, "lost_steps": self.lost_steps,
                "attempts": [vars(a) for a in self.attempts], "restores": self.restores, "commits": self.commits}


def summarize(records: Iterable[dict[str, Any]]) -> Summary:
    """Classify the run's wall time (see the module docstring); records in file order."""
    attempts: dict[str, Attempt] = {}
    step_records: dict[str, list[dict[str, Any]]] = {}
    commits: list[dict[str, Any]] = []
    for record in records:
        kind, key = record["event"], record["attempt"]
        if kind == "attempt":
            attempts[key] = Attempt(key, record["process_start"], record["t"], record["startup_s"],
                                    record["restore_s"], record["step"], record.get("restored_step"),
                                    record.get("manifest_crc32c"), record.get("host", ""), record.get("pid", 0),
                                    last_t=record["t"])
            step_records[key] = []
            continue
        attempt = attempts.get(key)
        if attempt is None:
            continue  # its attempt record was lost: nothing to attribute it to
        attempt.last_t = max(attempt.last_t, record["t"])
        if kind == "step":
            step_records[key].append(record)
            attempt.steps += 1
            attempt.last_step = record["step"]
        elif kind == "evaluation":
            attempt.evaluation_s += record["seconds"]
        elif kind == "checkpoint":
            attempt.checkpoint_s += record["seconds"]
        elif kind == "commit":
            attempt.commits.append(record["step"])
            commits.append({"attempt": key, "step": record["step"], "manifest_crc32c": record["manifest_crc32c"]})
        elif kind == "end":
            attempt.ended = record["reason"]
    if not attempts:
        raise LedgerError("the goodput ledger holds no attempt: no run got past start-up")

    ordered = list(attempts.values())
    seconds = dict.fromkeys(CATEGORIES, 0.0)
    alive: list[tuple[Attempt, dict[str, Any]]] = []  # steps whose result is still part of the run
    lost_steps = 0
    for index, attempt in enumerate(ordered):
        if index:
            seconds["between_attempts"] += max(0.0, attempt.process_start - ordered[index - 1].last_t)
        restored = attempt.restored_step or 0
        kept = []
        for owner, record in alive:
            if record["step"] > restored:
                owner.lost_steps += 1
                owner.lost_s += record["seconds"]
                seconds["lost"] += record["seconds"]
                lost_steps += 1
            else:
                kept.append((owner, record))
        alive = kept + [(attempt, record) for record in step_records[attempt.attempt]]
        step_s = sum(record["seconds"] for record in step_records[attempt.attempt])
        seconds["startup"] += attempt.startup_s
        seconds["restore"] += attempt.restore_s
        seconds["checkpoint"] += attempt.checkpoint_s
        seconds["evaluation"] += attempt.evaluation_s
        covered = attempt.startup_s + attempt.restore_s + step_s + attempt.checkpoint_s + attempt.evaluation_s
        seconds["other"] += max(0.0, attempt.last_t - attempt.process_start) - covered
    for _, record in alive:
        seconds["data_wait"] += record["data_wait_s"]
        seconds["productive"] += record["seconds"] - record["data_wait_s"]
    restores = [{"attempt": a.attempt, "step": a.restored_step, "manifest_crc32c": a.manifest}
                for a in ordered if a.restored_step is not None]
    wall = ordered[-1].last_t - ordered[0].process_start
    return Summary(wall, seconds, ordered, len(alive), lost_steps, ordered[0].process_start, restores, commits)


def goodput_ratio(run_dir: str | Path) -> float:
    """The run's goodput (productive seconds / wall seconds) from its ledger; raises LedgerError."""
    return summarize(read_ledger(Path(run_dir) / LEDGER)).goodput


def median_step_s(records: Iterable[dict[str, Any]]) -> float | None:
    times = [r["seconds"] for r in records if r["event"] == "step"]
    return statistics.median(times) if times else None
