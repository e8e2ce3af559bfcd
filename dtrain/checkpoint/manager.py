"""When and how checkpoints are saved, committed, pruned and resumed.

Save: every rank writes its DCP shards (plus its RNG state; rank 0 also the trainer state and the
config) into ``step_<8 digits>/``, each file hashed while written and, on local disk, fsynced; the
ranks' file lists are gathered to rank 0 (a collective, not polling the store), which makes the
folder's entries durable and writes ``manifest.json`` last. That write is the commit. A step is
skipped only when this process committed it (or verified it at resume); anything else found at a
step about to be saved (debris, or a step that failed verification at resume) is replaced.

One writer per URI: rank 0 holds a lease (dtrain.checkpoint.lease) and checks it before every save.
Retention runs only after a commit, never touches the newest committed step, and counts toward
``keep_last`` only committed steps of this run's lineage that did not fail verification.

At scale, one rank reads: rank 0 lists the store, reads manifests, configs, trainer state and DCP's
metadata, and broadcasts them; the ranks then verify the files' checksums in parallel, a slice each.

Async: the shards are staged to host memory (the only part the loop waits for) and written by DCP in
the background on a dedicated gloo group (gloo breaks when a background save shares the default group
with training). At most one save is in flight; the next save, or the end of training, waits for it
and re-raises its error.
"""

from __future__ import annotations

import io
import json
import logging
import posixpath
import time
import uuid
from datetime import timedelta
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf

from dtrain.checkpoint import failpoints
from dtrain.checkpoint.dcp_io import (FileRecord, FsspecReader, HashingFsspecWriter, checksum_of_stream,
                                     crc32c_hex, stop_checkpoint_process)
from dtrain.checkpoint.interval import AutoInterval, FixedInterval
from dtrain.checkpoint.lease import WriterLease, this_writer
from dtrain.checkpoint.manifest import (MANIFEST, Manifest, ManifestError, parse_step, read_manifest, step_dir,
                                        verify_files)
from dtrain.checkpoint.storage import Storage
from dtrain.config.secrets import redact, redacted_yaml
from dtrain.config.errors import ConfigError
from dtrain.distributed import collectives
from dtrain.distributed.env import DistEnv
from dtrain.strategies.state import checkpoint_mismatch, model_change_problems

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"


@dataclass
class Restored:
    step: int
    extras: dict[str, Any]  # trainer state: scheduler, loader, ... (identical on every rank)
    source: str  # URL of the step folder
    manifest_crc32c: str = ""  # of the manifest that was verified and loaded (what the goodput ledger records)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _hashed(name: str, data: bytes) -> FileRecord:
    return {"path": name, "size": len(data), "crc32c": crc32c_hex(data)}


def resolve_resume_target(storage: Storage, resume: str) -> tuple[Storage, list[str]]:
    """Where to look and which step folders to try, newest first, for ``checkpoint.resume``."""
    if resume in ("auto", "never"):
        names = [n for n in storage.listdir() if parse_step(n) is not None]
        return storage, sorted(names, reverse=True)
    if resume.isdigit():
        return storage, [step_dir(int(resume))]
    parent, name = posixpath.split(resume.rstrip("/"))
    if parse_step(name) is None:
        raise ConfigError(f"checkpoint.resume={resume} must be auto, never, a step number, or the URI of a "
                          "step_<8 digits> folder")
    return Storage(parent, storage.options), [name]


def step_manifests(storage: Storage) -> dict[int, Manifest | None]:
    """Every step folder under ``storage``: its manifest, or None when it was never committed."""
    found: dict[int, Manifest | None] = {}
    for name in storage.listdir():
        step = parse_step(name)
        if step is None:
            continue
        try:
            found[step] = read_manifest(storage, name)
        except ManifestError:
            found[step] = None
    return dict(sorted(found.items()))


def committed_steps(storage: Storage) -> list[int]:
    """Steps whose manifest exists and parses (without checking the files)."""
    return [step for step, manifest in step_manifests(storage).items() if manifest is not None]


class _PreloadedReader(FsspecReader):
    """DCP's reader with the checkpoint's metadata read once (by rank 0) and handed in, so that N ranks
    do not each fetch and unpickle the same ``.metadata`` object."""

    def __init__(self, url: str, metadata: Any, **options: Any):
        super().__init__(url, **options)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        import copy

        metadata = copy.copy(self._metadata)
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta = copy.copy(metadata.storage_meta)
            metadata.storage_meta.load_id = self.load_id
        return metadata


class CheckpointManager:
    def __init__(self, cfg: DictConfig, env: DistEnv, config_hash: str, strategy_name: str):
        self.full_cfg, self.cfg, self.env = cfg, cfg.checkpoint, env
        self.config_hash, self.strategy_name = config_hash, strategy_name
        self.storage = Storage(self.cfg.uri, OmegaConf.to_container(self.cfg.storage_options, resolve=True))
        self.async_mode = self.cfg.async_mode
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="dtrain-ckpt") if self.async_mode != "off" else None
        self._pending: Future | None = None
        self._pending_step: int | None = None
        # deleting old steps never blocks the loop: it only touches steps older than the newest commit
        self._janitor = ThreadPoolExecutor(1, thread_name_prefix="dtrain-retention")
        self._retention: Future | None = None
        # a group of its own: background DCP collectives must not interleave with training's on gloo
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=self.cfg.commit_timeout_s)) \
            if dist.is_initialized() and self._executor else None
        # one stager for the whole run keeps its host copy of the state between saves: after the first save
        # the loop waits for a memcpy only, not for allocating (and faulting in) a fresh copy each time
        self._stager = None
        if self._executor is not None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            on_gpu = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=on_gpu,
                                                        use_shared_memory=self.async_mode == "process",
                                                        use_async_staging=False, use_non_blocking_copy=False))
        self.last_save_seconds: float | None = None
        self._config_yaml = redacted_yaml(cfg).encode()  # written into every step; the config does not change
        self._trusted: set[int] = set()  # steps this process committed, or verified at resume (rank 0)
        self._corrupt: set[int] = set()  # committed steps that failed verification at resume (rank 0)
        self.lineage = uuid.uuid4().hex[:12]  # replaced by the resumed step's lineage
        self.newest_committed: int | None = None  # resumed from, or committed since (rank 0 knows the latter)
        self.newest_committed_unix: float | None = None  # its commit time (the manifest's), for its age
        self.lease: WriterLease | None = None
        self.writer = collectives.on_rank_zero(self._acquire_lease)
        self.schedule = AutoInterval(self.cfg.mtbi_s) if self.cfg.interval_steps == "auto" else \
            FixedInterval(int(self.cfg.interval_steps))
        # rank 0 calls this with (step, CRC32C of the manifest) just before writing the manifest, i.e. the commit
        self.on_commit: Callable[[int, str], None] | None = None

    def _acquire_lease(self) -> str:
        """Rank 0 claims the URI for this run (see dtrain.checkpoint.lease); returns this writer's id."""
        me = this_writer(self.env)
        if self.cfg.lease_ttl_s > 0:
            self.lease = WriterLease(self.storage, me, self.cfg.lease_ttl_s, wait_s=self.cfg.grace_period_s)
            self.lease.acquire()
        return me.writer

    # -- saving ----------------------------------------------------------------------------------------
    def due(self, step: int, step_time_s: float | None = None) -> bool:
        """Whether to save after ``step`` (the same answer on every rank; ``auto`` learns from ``step_time_s``)."""
        return self.schedule.due(step, step_time_s)

    def save(self, step: int, state: dict[str, Any], extras: dict[str, Any], blocking: bool = False) -> float:
        """Start (or, if ``blocking`` or async is off, complete and commit) a save; returns seconds blocked."""
        start = time.perf_counter()
        self.wait()
        name = step_dir(step)
        # rank 0 holds the lease and commits, so it decides; its answer is also the barrier that keeps
        # everyone from writing into the folder while it is being cleared
        if collectives.on_rank_zero(lambda: self._prepare_folder(step)) == "skip":
            log.info("step %d was committed by this run already; not saving it again", step)
            return time.perf_counter() - start
        failpoints.saving_step = step
        small_files = self._small_files(extras)
        writer = HashingFsspecWriter(self.storage.url(name), self.storage.options,
                                     sync_files=self.storage.protocol in ("file", "local"),
                                     thread_count=self.cfg.write_threads)
        if self._executor is not None and not blocking:
            from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

            kind = AsyncCheckpointerType.PROCESS if self.async_mode == "process" else AsyncCheckpointerType.THREAD
            response = dcp.async_save(state, storage_writer=writer, process_group=self._group,
                                      async_checkpointer_type=kind, async_stager=self._stager,
                                      no_dist=not dist.is_initialized())
            upload = response if isinstance(response, Future) else response.upload_completion
            self._pending = self._executor.submit(self._complete, name, step, writer, small_files, upload, start)
            self._pending_step = step
        else:
            dcp.save(state, storage_writer=writer, no_dist=not dist.is_initialized())
            self._complete(name, step, writer, small_files, None, start)
            collectives.barrier()  # nobody exits (or starts the next save) before rank 0 has committed
        blocked = time.perf_counter() - start
        log.info("checkpoint step %d: loop blocked %.3f s (%s)", step, blocked,
                 "async write continues" if self._pending is not None else "committed")
        self.schedule.saved(step, blocked)
        return blocked

    def _prepare_folder(self, step: int) -> str:
        """Rank 0, before a save: "skip" if this process committed or verified the step, else "save" after
        checking the lease and clearing whatever occupies the step's folder."""
        if step in self._trusted:
            return "skip"
        if self.lease is not None:
            self.lease.check()
        name = step_dir(step)
        if self.storage.exists(name):
            committed = self.storage.exists(posixpath.join(name, MANIFEST))
            why = ("it failed verification when this run resumed" if step in self._corrupt else
                   "this run did not write it" if committed else "debris of an interrupted save")
            log.warning("replacing %s before saving step %d: %s", self.storage.url(name), step, why)
            self.storage.remove(posixpath.join(name, MANIFEST))  # uncommitted first, then deleted
            self.storage.remove(name, recursive=True)
            self._corrupt.discard(step)
        return "save"

    @property
    def save_in_flight(self) -> bool:
        """Whether a background save is still writing or committing (never blocks)."""
        return self._pending is not None and not self._pending.done()

    def wait(self) -> None:
        """Block until the save in flight has finished; re-raise its failure on this rank."""
        if self._pending is None:
            return
        pending, step = self._pending, self._pending_step
        self._pending = self._pending_step = None
        try:
            pending.result()
        except Exception as e:
            raise RuntimeError(f"rank {self.env.rank}: background checkpoint save of step {step} failed: {e}") from e

    def _wait_for_retention(self) -> None:
        """Finish the previous clean-up; a failed deletion is reported, never fatal (the commit stands)."""
        if self._retention is None:
            return
        try:
            self._retention.result()
        except Exception as e:
            log.warning("retention after a commit failed (old steps may remain under %s): %s", self.storage.url(), e)
        self._retention = None

    def finalize(self) -> None:
        """Wait for the last save and make sure rank 0 has committed it before anyone exits."""
        self.wait()
        self._wait_for_retention()
        collectives.barrier()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._wait_for_retention()
            self._janitor.shutdown(wait=True)
            if self.lease is not None:
                self.lease.release()
                self.lease = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._stager is not None:
            self._stager.close()
            self._stager = None
        if self.async_mode == "process":
            stop_checkpoint_process()

    def _small_files(self, extras: dict[str, Any]) -> dict[str, bytes]:
        """RNG of this rank; on rank 0 also the trainer state and the (redacted) resolved config. Captured
        now, written with the shards (in the background when saving asynchronously)."""
        buffer = io.BytesIO()
        torch.save(rng_state(), buffer)
        files = {f"rng/rank_{self.env.rank:05d}.pt": buffer.getvalue()}
        if self.env.is_rank_zero:
            files[TRAINER_STATE] = json.dumps(extras, sort_keys=True).encode()
            files[CONFIG] = self._config_yaml
        return files

    def _complete(self, name: str, step: int, writer: HashingFsspecWriter, small_files: dict[str, bytes],
                  upload: Future | None, start: float) -> None:
        for relative, data in small_files.items():
            self.storage.write_bytes(posixpath.join(name, relative), data)  # fsynced on local disk
        if upload is not None:
            upload.result()
        records = dict(writer.records) or self._hash_written_back(name)  # process mode hashes in a child
        records.update({relative: _hashed(relative, data) for relative, data in small_files.items()})
        failpoints.failpoint("after_shards", step)
        gathered = collectives.gather_object(sorted(records.values(), key=lambda r: r["path"]), group=self._group)
        if not self.env.is_rank_zero:
            return
        files = sorted({record["path"]: record for rank_records in gathered for record in rank_records}.values(),
                       key=lambda r: r["path"])
        # every file's directory entry is durable before the manifest can point at it
        for folder in (posixpath.join(name, "rng"), name, ""):
            self.storage.sync_dir(folder)
        seconds = time.perf_counter() - start
        manifest = Manifest(step=step, world_size=self.env.world_size, strategy=self.strategy_name,
                            config_hash=self.config_hash, files=files, save_seconds=seconds,
                            created_unix=time.time(), writer=self.writer, lineage=self.lineage,
                            extra={"async_mode": self.async_mode})
        manifest_bytes = manifest.to_json()
        if self.on_commit is not None:
            try:
                self.on_commit(step, crc32c_hex(manifest_bytes))
            except Exception as e:  # bookkeeping never stops a commit
                log.warning("commit callback failed for step %d: %s", step, e)
        self.storage.write_bytes(posixpath.join(name, MANIFEST), manifest_bytes)
        self.storage.sync_dir(name)  # and the manifest's own entry: now the step is committed
        self._trusted.add(step)
        self.newest_committed, self.newest_committed_unix = step, manifest.created_unix
        self.last_save_seconds = seconds
        log.info("committed %s (%.1f MB in %.2f s)", self.storage.url(name), manifest.total_bytes / 1e6, seconds)
        self._wait_for_retention()
        self._retention = self._janitor.submit(self._retain, step)

    def _hash_written_back(self, name: str) -> dict[str, FileRecord]:
        """Checksums of this rank's DCP files by reading them back (when a child process wrote them)."""
        mine = f"__{self.env.rank}_"
        records = {}
        for file_name in self.storage.listdir(name):
            if file_name.startswith(mine) or (self.env.is_rank_zero and file_name == ".metadata"):
                with self.storage.open(posixpath.join(name, file_name)) as stream:
                    size, digest = checksum_of_stream(stream)
                records[file_name] = {"path": file_name, "size": size, "crc32c": digest}
        return records

    def _retain(self, newest: int) -> None:
        """Keep the newest ``keep_last`` committed steps of this run's lineage; delete its older ones and
        debris of older failed saves. Steps of another lineage, and steps that failed verification, are
        neither counted nor deleted (they are not this run's to judge). Deleting a step removes its
        manifest first, so an interrupted deletion leaves debris, never a committed step with missing files.
        """
        found = step_manifests(self.storage)
        own = [step for step, m in found.items()
               if m is not None and m.lineage == self.lineage and step not in self._corrupt and step <= newest]
        keep = set(own[-self.cfg.keep_last:]) | {newest}
        for step, manifest in found.items():
            if step in keep or step > newest:
                continue
            folder = step_dir(step)
            if manifest is None:
                log.info("retention: removing debris of an interrupted save at step %d", step)
            elif step in own:
                self.storage.remove(posixpath.join(folder, MANIFEST))
                log.info("retention: removing committed step %d (keep_last=%d)", step, self.cfg.keep_last)
                failpoints.failpoint("mid_retention", newest)
            else:
                continue
            self.storage.remove(folder, recursive=True)

    # -- resuming --------------------------------------------------------------------------------------
    def restore(self, make_template: Callable[[], dict[str, Any]]) -> Restored | None:
        """Load the step chosen by ``checkpoint.resume`` into ``make_template()`` (in place; the caller keeps
        the state it returned); None: start fresh.

        A factory, called only when there is a step to load: building a state dict initializes an empty
        optimizer (torch's get_state_dict runs a zero-gradient step), which would make Adam's step count
        start at 1 in a fresh run and shrink its first real update."""
        resume = str(self.cfg.resume)
        if resume == "never":
            return None
        root, candidates, explicit = collectives.on_rank_zero(lambda: self._resume_plan(resume))
        storage = self.storage if root is None else Storage(root, self.storage.options)
        for name in candidates:
            manifest, problem = self._check_step(storage, name)
            if problem is None:
                return self._load(storage, name, manifest, make_template())
            if explicit:
                raise ConfigError(f"cannot resume from {storage.url(name)}: {problem}")
            log.warning("skipping %s: %s", storage.url(name), problem)
            if manifest is not None and self.env.is_rank_zero and storage is self.storage:
                self._corrupt.add(manifest.step)  # committed but broken: not counted, and replaced when reached
        if explicit:
            raise ConfigError(f"checkpoint.resume={resume}: no such step at {storage.url()}")
        log.info("no committed checkpoint under %s; starting from step 0", self.storage.url())
        return None

    def _resume_plan(self, resume: str) -> tuple[str | None, list[str], bool]:
        """Rank 0: where to look (None: checkpoint.uri) and which step folders to try, newest first."""
        if resume not in ("auto",) and not resume.isdigit() and committed_steps(self.storage):
            # a requeued run that started from another run's checkpoint continues from its own steps
            log.info("checkpoint.uri already holds this run's committed steps; resuming the newest of them "
                     "instead of %s", resume)
            resume = "auto"
        storage, candidates = resolve_resume_target(self.storage, resume)
        return (None if storage is self.storage else storage.uri), candidates, resume != "auto"

    def _check_step(self, storage: Storage, name: str) -> tuple[Manifest | None, str | None]:
        """(manifest, why this step cannot be loaded or None). Rank 0 reads the manifest; every rank
        checks a slice of the files (sizes, and checksums unless switched off)."""
        def read() -> tuple[Manifest | None, str | None]:
            try:
                return read_manifest(storage, name), None
            except ManifestError as e:
                return None, str(e)

        manifest, problem = collectives.on_rank_zero(read)
        if manifest is None:
            return None, problem
        mine = manifest.files[self.env.rank::self.env.world_size]
        problems = verify_files(storage, name, mine, checksums=self.cfg.verify_checksums)
        reports = [p for p in collectives.all_gather_object("; ".join(problems[:3]) or None) if p]
        return manifest, ("; ".join(reports) if reports else None)

    def _load(self, storage: Storage, name: str, manifest: Manifest, template: dict[str, Any]) -> Restored:
        url = storage.url(name)

        def read() -> tuple[str, bytes, Any]:
            saved_cfg = storage.read_bytes(posixpath.join(name, CONFIG)).decode()
            trainer_state = storage.read_bytes(posixpath.join(name, TRAINER_STATE))
            return saved_cfg, trainer_state, FsspecReader(url, **storage.options).read_metadata()

        saved_cfg, trainer_state, metadata = collectives.on_rank_zero(read)
        self._check_compatible(OmegaConf.create(saved_cfg), url)
        self._check_shapes(metadata, template, url)
        start = time.perf_counter()
        failpoints.failpoint("mid_restore", manifest.step)
        dcp.load(template, storage_reader=_PreloadedReader(url, metadata, **storage.options),
                 no_dist=not dist.is_initialized())
        extras = json.loads(trainer_state)
        if manifest.world_size == self.env.world_size:
            with storage.open(posixpath.join(name, f"rng/rank_{self.env.rank:05d}.pt")) as stream:
                set_rng_state(torch.load(io.BytesIO(stream.read()), weights_only=True))
        else:
            # RNG streams cannot be split or merged across ranks: re-seed deterministically instead
            torch.manual_seed(self.full_cfg.trainer.seed * 100_003 + manifest.step * 1_009 + self.env.rank)
        self.lineage = manifest.lineage
        self.newest_committed = manifest.step if storage is self.storage else None
        self.newest_committed_unix = manifest.created_unix if storage is self.storage else None
        if storage is self.storage:
            self._trusted.add(manifest.step)  # verified just now: saving it again would only risk it
        log.info("resumed from %s (step %d, saved by %d ranks with strategy %s) in %.2f s", url, manifest.step,
                 manifest.world_size, manifest.strategy, time.perf_counter() - start)
        if manifest.world_size != self.env.world_size:
            log.info("world size changed %d -> %d: model and optimizer resharded by DCP, data continues at "
                     "global sample %s, RNG re-seeded per rank", manifest.world_size, self.env.world_size,
                     extras.get("loader", {}).get("next_sample"))
        self.schedule.restart_at(manifest.step)
        return Restored(step=manifest.step, extras=extras, source=url, manifest_crc32c=crc32c_hex(manifest.to_json()))

    def _check_compatible(self, saved: DictConfig, url: str) -> None:
        """A checkpoint of another model is a config error, reported before any tensor is read."""
        # the saved config is redacted, so compare it with the redacted current one
        current = redact(OmegaConf.to_container(self.full_cfg.model, resolve=True))
        problems = model_change_problems(saved.model, current)
        if problems:
            raise ConfigError(f"cannot resume from {url}: {problems[0]} (or start a new run: a new "
                              "checkpoint.uri, or checkpoint.resume=never)")

    def _check_shapes(self, metadata: Any, template: dict[str, Any], url: str) -> None:
        """Every entry this strategy needs must be in the checkpoint, with the same global shape."""
        saved = metadata.state_dict_metadata
        missing = checkpoint_mismatch(template, saved.keys())
        problems = [missing] if missing else []
        for key, value in template.get("model", {}).items():
            meta = saved.get(f"model.{key}")
            if isinstance(value, torch.Tensor) and hasattr(meta, "size") and tuple(meta.size) != tuple(value.shape):
                problems.append(f"{key} is {tuple(meta.size)} there, {tuple(value.shape)} here")
        if problems:
            raise ConfigError(f"checkpoint {url} does not fit this model: {'; '.join(problems[:4])}")
