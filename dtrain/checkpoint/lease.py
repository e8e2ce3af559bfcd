"""One writer per checkpoint URI: a lease that a second job sees, and refuses on.

Two jobs writing one URI (a duplicate submission, a requeue racing its predecessor) destroy each other's
work: each removes the other's in-flight folder as debris, retention deletes steps the other relies on,
and two manifests race for one step. Object stores offer no lock (and no create-if-absent that every
fsspec backend exposes), so the lease is announce-then-check: rank 0 lists ``_writers/``, writes its
own ``_writers/<id>.json``, lists again, and renews the file every ``ttl / 4`` seconds from a daemon
thread. Two writers that start at the same moment both see each other and both refuse: never both
proceed. Before every save rank 0 lists again, so a writer that appeared anyway stops the save.

Whose lease may be taken over at once: an earlier attempt of the same job (Slurm requeues and torchrun
restarts keep the job id and never run two attempts at once), a process on this host that no longer
exists (or this very process, from an earlier run), and any lease not renewed for ``ttl``. Any other
live writer may be finishing a preemption save: it is waited for, up to the grace period, then refused.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from dtrain.checkpoint.storage import Storage
from dtrain.config.errors import ConfigError
from dtrain.distributed.env import DistEnv, run_id

log = logging.getLogger(__name__)

LEASES = "_writers"


@dataclass(frozen=True)
class WriterInfo:
    writer: str  # random id of this launch
    job: str | None  # the launcher's job id (Slurm job, Kubernetes Job, torchrun run id), if any
    attempt: int  # restart/requeue count within the job
    host: str
    pid: int
    started_unix: float
    renewed_unix: float

    def describe(self, now: float | None = None) -> str:
        age = (now or time.time()) - self.renewed_unix
        job = f"job {self.job} attempt {self.attempt}" if self.job else "a job without a launcher id"
        return f"writer {self.writer} ({job}, {self.host} pid {self.pid}, lease renewed {age:.0f} s ago)"


def this_writer(env: DistEnv) -> WriterInfo:
    now = time.time()
    return WriterInfo(writer=uuid.uuid4().hex[:12], job=run_id(), attempt=env.restart_count,
                      host=socket.gethostname(), pid=os.getpid(), started_unix=now, renewed_unix=now)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class WriterLease:
    """Rank 0's claim on a checkpoint URI (see module docstring)."""

    def __init__(self, storage: Storage, me: WriterInfo, ttl_s: float, wait_s: float):
        self.storage, self.me, self.ttl_s, self.wait_s = storage, me, ttl_s, wait_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ---------------------------------------------------------------------------------
    def others(self) -> list[WriterInfo]:
        """Leases of other writers, whether or not they are still alive."""
        found = []
        for name in self.storage.listdir(LEASES):
            if not name.endswith(".json") or name == f"{self.me.writer}.json":
                continue
            try:
                found.append(WriterInfo(**json.loads(self.storage.read_bytes(posixpath.join(LEASES, name)))))
            except (FileNotFoundError, ValueError, TypeError):
                continue  # released meanwhile, or not a lease
        return found

    def _is_live(self, other: WriterInfo, now: float) -> bool:
        if self.me.job is not None and other.job == self.me.job:
            return False  # an earlier attempt of this job: the launcher never runs two at once
        if other.host == self.me.host and (other.pid == self.me.pid or _pid_gone(other.pid)):
            return False
        return now - other.renewed_unix < self.ttl_s

    def live_others(self) -> list[WriterInfo]:
        now = time.time()
        return [other for other in self.others() if self._is_live(other, now)]

    def _refusal(self, others: list[WriterInfo], waited: float) -> ConfigError:
        who = "; ".join(other.describe() for other in others)
        return ConfigError(f"checkpoint.uri={self.storage.uri} is being written by another run: {who}. Two writers "
                           f"would destroy each other's checkpoints; stop the other job or use another "
                           f"checkpoint.uri (waited {waited:.0f} s for it to finish; nothing was written)")

    def wait_for_others(self) -> None:
        """Return once no other live writer holds the URI; raise ConfigError after ``wait_s``."""
        start = time.monotonic()
        delay = 0.5
        while True:
            live = self.live_others()
            if not live:
                return
            waited = time.monotonic() - start
            if waited >= self.wait_s:
                raise self._refusal(live, waited)
            if delay == 0.5:
                log.warning("waiting up to %.0f s for %s to finish with %s", self.wait_s, live[0].describe(),
                            self.storage.uri)
            time.sleep(min(delay, max(0.0, self.wait_s - waited)))
            delay = min(delay * 2, 5.0)

    # -- holding ---------------------------------------------------------------------------------
    def acquire(self) -> None:
        """Announce this writer, then check that nobody else did; start renewing."""
        self.wait_for_others()
        now = time.time()
        stale = [other for other in self.others() if not self._is_live(other, now)]
        self._write()
        live = self.live_others()
        if live:
            self.release()
            raise self._refusal(live, 0.0)
        for other in stale:  # taken over: their files would only confuse the next reader
            log.info("taking over the checkpoint lease of %s", other.describe())
            self.storage.remove(posixpath.join(LEASES, f"{other.writer}.json"))
        self._thread = threading.Thread(target=self._renew, name="dtrain-ckpt-lease", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Before a save: refuse if another live writer appeared after this one started."""
        live = self.live_others()
        if live:
            raise LeaseConflict(f"another run started writing checkpoint.uri={self.storage.uri} while this one "
                                f"was running: {'; '.join(o.describe() for o in live)}; not saving, so that neither "
                                "destroys the other's checkpoints. Stop one of the two jobs.")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        try:
            self.storage.remove(posixpath.join(LEASES, f"{self.me.writer}.json"))
        except Exception as e:  # the lease then expires by itself after ttl
            log.warning("could not release the checkpoint lease %s: %s", self.me.writer, e)

    def _write(self) -> None:
        self.me = WriterInfo(**{**asdict(self.me), "renewed_unix": time.time()})
        self.storage.write_bytes(posixpath.join(LEASES, f"{self.me.writer}.json"), json.dumps(asdict(self.me)).encode())

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self._write()
            except Exception as e:  # one failed renewal is not fatal; ttl allows three more
                log.warning("renewing the checkpoint lease failed: %s", e)


class LeaseConflict(ConfigError):
    """Another writer appeared on this checkpoint URI while this run was writing it (exit 2: retrying
    cannot help while the other job runs)."""
