"""Hang detection: a job whose ranks stop making progress ends within ``monitor.hang_timeout_s``, naming the
rank that holds it up, instead of idling until the scheduler's time limit.

Every rank runs one daemon thread. The training thread only records its phase (``data``, ``step``,
``eval``, ``checkpoint``, ...) and step, two attribute writes. The thread publishes that to the job's
TCPStore every ``monitor.heartbeat_s`` and, once its own rank has not changed phase for the timeout,
(1) writes a report to the store: phase, step, and the last collective of every process group from
PyTorch's Flight Recorder, which records gloo and NCCL collectives alike; (2) dumps every thread's
Python stack (faulthandler) and the Flight Recorder ring into ``<run.dir>/hang/``; (3) waits briefly
for the other ranks' reports; (4) names the culprits and exits with ``EXIT_HUNG``.

Who is the culprit: in a synchronous job a stuck rank stops its peers inside the next collective they
need from it. So a rank whose last collective on some group is older (a lower sequence number) than
the one its peers are waiting in is the one holding them up. Without the recorder (``monitor.
flight_recorder_entries=0``) the rank in an earlier phase of the step is (``data`` before ``step``);
a rank that sent no report at all is named as unresponsive (its process frozen, holding the GIL in C
code, or gone). When every rank waits at the same point, all are named: a collective that never
completes (network, a mismatched call) rather than one rank.

Relation to the other guards: ``dist.timeout_s`` ends a stuck collective with an error that does not
say who is missing (keep it longer than the hang timeout); the preemption deadline
(checkpoint/preemption.py) only applies after a signal; the parent watchdog (distributed/watchdog.py)
covers a dead launcher. On NCCL the recorder also dumps itself on a collective timeout into the same
folder (``TORCH_FR_DUMP_TEMP_FILE``, set by :func:`enable_flight_recorder`).
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dtrain import torch_private

log = logging.getLogger(__name__)

EXIT_HUNG = 1  # a crash for the launcher's exit-code contract: restart from the last committed checkpoint
PHASE_ORDER = ("start", "data", "step", "eval", "checkpoint", "vote")  # the order within one step
_KEY = "dtrain/hang/{prefix}/{kind}/{rank}"


def enable_flight_recorder(run_dir: str, entries: int) -> None:
    """Switch PyTorch's Flight Recorder on before the first process group exists (it reads these variables
    when the group is created). A value the user already set wins. On NCCL the recorder also dumps on a
    collective timeout, into ``<run_dir>/hang/flight_recorder_rank_<rank>`` (the folder is made when the
    loop starts: a run refused as bad input leaves no trace)."""
    settings = {"TORCH_FR_BUFFER_SIZE": str(entries), "TORCH_NCCL_TRACE_BUFFER_SIZE": str(entries)}
    if entries > 0:  # 0 must be said explicitly: torch 2.13 records gloo collectives by default
        dump = str(Path(run_dir) / "hang" / "flight_recorder_rank_")
        settings.update({"TORCH_NCCL_DUMP_ON_TIMEOUT": "1", "TORCH_FR_DUMP_TEMP_FILE": dump,
                         "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": dump})
    for key, value in settings.items():
        os.environ.setdefault(key, value)


@dataclass
class Report:
    """One rank's view when it found itself stuck (or its last heartbeat, when it never reported)."""

    rank: int
    step: int
    phase: str
    stuck_s: float
    # process-group name -> {"seq", "op", "done"} of the newest collective this rank entered on it
    collectives: dict[str, dict[str, Any]] = field(default_factory=dict)
    reported: bool = True


def last_collectives(dump: bytes | str | None) -> dict[str, dict[str, Any]]:
    """Newest non-p2p collective per process group from a Flight Recorder JSON dump."""
    if not dump:
        return {}
    newest: dict[str, dict[str, Any]] = {}
    for entry in json.loads(dump).get("entries", []):
        if entry.get("is_p2p"):
            continue
        group = entry.get("process_group") or [str(entry.get("pg_id", "?")), "?"]
        name = group[1] if len(group) > 1 and group[1] else group[0]
        seq = int(entry.get("collective_seq_id", 0))
        if name not in newest or seq > newest[name]["seq"]:
            newest[name] = {"seq": seq, "op": entry.get("profiling_name", "?"),
                            "done": bool(entry.get("retired")) or entry.get("state") == "completed"}
    return newest


def _where(report: Report) -> str:
    return f"step {report.step}, phase '{report.phase}' for {report.stuck_s:.0f} s"


def find_culprits(reports: dict[int, Report], world_size: int) -> tuple[list[int], str]:
    """(ranks holding the job up, one line saying what each was doing and why it is blamed)."""
    if world_size == 1:
        return [0], f"rank 0 ({_where(reports[0])})"
    silent = [r for r in range(world_size) if r not in reports or not reports[r].reported]
    if silent:
        parts = []
        for r in silent:
            seen = reports.get(r)
            parts.append(f"rank {r} sent no report (" + (f"last heartbeat: {_where(seen)}" if seen else
                                                         "no heartbeat at all") + "): frozen or gone")
        return silent, "; ".join(parts)
    behind: dict[int, str] = {}
    for group in sorted({g for rep in reports.values() for g in rep.collectives}):
        members = {r: rep.collectives[group] for r, rep in reports.items() if group in rep.collectives}
        newest = max(c["seq"] for c in members.values())
        waiting = sorted(r for r, c in members.items() if c["seq"] == newest and not c["done"])
        if not waiting:
            continue
        op = members[waiting[0]]["op"]
        for r, c in members.items():
            if c["seq"] < newest and r not in behind:
                behind[r] = (f"rank {r} ({_where(reports[r])}; last collective #{c['seq']} {c['op']} on {group} "
                             f"{'completed' if c['done'] else 'in flight'}) has not entered collective #{newest} "
                             f"{op} that rank{'s' if len(waiting) > 1 else ''} "
                             f"{', '.join(map(str, waiting))} wait{'' if len(waiting) > 1 else 's'} in")
    if behind:
        return sorted(behind), "; ".join(behind[r] for r in sorted(behind))
    position = {r: (rep.step, PHASE_ORDER.index(rep.phase) if rep.phase in PHASE_ORDER else 0)
                for r, rep in reports.items()}
    lowest = min(position.values())
    late = sorted(r for r, p in position.items() if p == lowest)
    if len(late) < len(reports):
        return late, "; ".join(f"rank {r} ({_where(reports[r])}) is behind its peers" for r in late)
    first = reports[late[0]]
    detail = "; ".join(f"{g} #{c['seq']} {c['op']}" for g, c in sorted(first.collectives.items()))
    return late, (f"every rank is stuck at the same point ({_where(first)}" + (f"; last collectives {detail}"
                                                                              if detail else "") +
                  "): a collective that never completes (network, or ranks that called different collectives)")


class HangWatchdog:
    """The per-rank monitor thread; :meth:`enter` is the training thread's only call."""

    def __init__(self, rank: int, world_size: int, run_dir: str, timeout_s: float, heartbeat_s: float,
                 nccl: bool = False, store: Any = None, key_prefix: str = ""):
        self.key_prefix = key_prefix  # the torchrun restart: its store outlives a restarted worker group
        self.rank, self.world_size, self.timeout_s, self.heartbeat_s = rank, world_size, timeout_s, heartbeat_s
        self.hang_dir, self.nccl = Path(run_dir) / "hang", nccl
        self.store = store if store is not None else torch_private.default_store()
        self.phase, self.step, self.changed = "start", 0, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dtrain-hang-watchdog", daemon=True)
        self._thread.start()

    def enter(self, phase: str, step: int) -> None:
        """The training thread moved on (called at every phase change)."""
        self.phase, self.step, self.changed = phase, step, time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.heartbeat_s + 5)

    # -- monitor thread ------------------------------------------------------------------------------------
    def _snapshot(self, collectives: dict[str, dict[str, Any]] | None = None) -> Report:
        return Report(self.rank, self.step, self.phase, time.monotonic() - self.changed, collectives or {},
                      reported=collectives is not None)

    def _publish(self, kind: str, report: Report) -> None:
        if self.store is not None:
            self.store.set(_KEY.format(prefix=self.key_prefix, kind=kind, rank=self.rank), json.dumps(asdict(report)))

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._publish("beat", self._snapshot())
                if time.monotonic() - self.changed > self.timeout_s:
                    self._on_hang()
            except Exception as e:  # a broken store must not take training down; the timeout still applies
                log.warning("rank %d: hang watchdog heartbeat failed: %s", self.rank, e)

    def _on_hang(self) -> None:
        dump = None
        try:
            dump = torch_private.flight_recorder_json(self.nccl)
        except Exception as e:
            log.warning("rank %d: reading the Flight Recorder failed: %s", self.rank, e)
        mine = self._snapshot(last_collectives(dump))
        self._publish("report", mine)
        trace = self._dump(mine, dump)
        reports = self._gather(mine)
        culprits, why = find_culprits(reports, self.world_size)
        fresh = [r for r, rep in reports.items() if rep.reported]
        if self.rank == min(fresh, default=self.rank):
            line = (f"dtrain: hang detected: no progress for {mine.stuck_s:.0f} s (monitor.hang_timeout_s="
                    f"{self.timeout_s:g}); stuck: {why}; stacks and Flight Recorder dumps of every rank in "
                    f"{self.hang_dir}/; exiting with {EXIT_HUNG}")
            os.write(2, (line + "\n").encode())
            (self.hang_dir / "verdict.txt").write_text(line + "\n")
        else:
            os.write(2, f"dtrain: rank {self.rank}: no progress for {mine.stuck_s:.0f} s ({_where(mine)}); trace in "
                        f"{trace}\n".encode())
            time.sleep(1.0)  # let the reporting rank print before the launcher tears the job down
        os._exit(EXIT_HUNG)

    def _dump(self, mine: Report, dump: bytes | str | None) -> Path:
        self.hang_dir.mkdir(parents=True, exist_ok=True)
        path = self.hang_dir / f"rank_{self.rank:05d}.txt"
        with path.open("w") as out:
            out.write(f"rank {self.rank}: no progress for {mine.stuck_s:.1f} s; {_where(mine)}\n"
                      f"last collectives: {json.dumps(mine.collectives)}\n\n")
            out.flush()
            faulthandler.dump_traceback(file=out, all_threads=True)
        if dump:
            data = dump if isinstance(dump, bytes) else dump.encode()
            (self.hang_dir / f"flight_recorder_rank_{self.rank:05d}.json").write_bytes(data)
        return path

    def _gather(self, mine: Report) -> dict[int, Report]:
        """Every rank's report, waiting up to a few heartbeats for the ranks that detect a little later;
        a rank that never reports is represented by its last heartbeat (``reported=False``)."""
        reports = {self.rank: mine}
        if self.store is None:
            return reports
        deadline = time.monotonic() + max(10.0, 3 * self.heartbeat_s)
        missing = [r for r in range(self.world_size) if r != self.rank]
        while missing and time.monotonic() < deadline:
            for r in list(missing):
                key = _KEY.format(prefix=self.key_prefix, kind="report", rank=r)
                if self.store.check([key]):
                    reports[r] = Report(**json.loads(self.store.get(key)))
                    missing.remove(r)
            time.sleep(0.2)
        for r in missing:
            key = _KEY.format(prefix=self.key_prefix, kind="beat", rank=r)
            if self.store.check([key]):
                reports[r] = Report(**{**json.loads(self.store.get(key)), "reported": False})
        return reports
