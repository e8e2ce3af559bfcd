"""When and how checkpoints are saved, committed, pruned and resumed.

Save: every rank writes its DCP shards (plus its RNG state; rank 0 also the trainer state and the
config) into ``step_<8 digits>/``, each file hashed while written; each rank then drops a small
sidecar listing its files; rank 0 waits for all sidecars and writes ``manifest.json`` last. That
write is the commit. Retention runs only after a commit and never touches the newest committed step.

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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from omegaconf import DictConfig, OmegaConf

from dtrain.checkpoint import failpoints
from dtrain.checkpoint.dcp_io import (FileRecord, FsspecReader, HashingFsspecWriter, checksum_of_stream,
                                     crc32c_hex, stop_checkpoint_process)
from dtrain.checkpoint.manifest import (MANIFEST, Manifest, ManifestError, parse_step, read_manifest, step_dir,
                                        verify_files)
from dtrain.checkpoint.storage import Storage, StorageError
from dtrain.config.secrets import redact, redacted_yaml
from dtrain.config.errors import ConfigError
from dtrain.distributed import collectives
from dtrain.distributed.env import DistEnv
from dtrain.strategies.state import checkpoint_mismatch, model_change_problems

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
CONFIG = "config.yaml"
SIDECARS = "_ranks"


@dataclass
class Restored:
    step: int
    extras: dict[str, Any]  # trainer state: scheduler, loader, ... (identical on every rank)
    source: str  # URL of the step folder


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


def committed_steps(storage: Storage) -> list[int]:
    """Steps whose manifest exists and parses (without checking the files)."""
    steps = []
    for name in storage.listdir():
        step = parse_step(name)
        if step is None:
            continue
        try:
            read_manifest(storage, name)
            steps.append(step)
        except ManifestError:
            continue
    return sorted(steps)


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
        self._group = dist.new_group(backend="gloo") if dist.is_initialized() and self._executor else None
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

    # -- saving ----------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return self.cfg.interval_steps > 0 and step % self.cfg.interval_steps == 0

    def save(self, step: int, state: dict[str, Any], extras: dict[str, Any], blocking: bool = False) -> float:
        """Start (or, if ``blocking`` or async is off, complete and commit) a save; returns seconds blocked."""
        start = time.perf_counter()
        self.wait()
        name = step_dir(step)
        # rank 0 commits, so only rank 0 knows for sure; everyone follows its answer
        committed = self.storage.exists(posixpath.join(name, MANIFEST)) if self.env.is_rank_zero else None
        if collectives.broadcast_object(committed):
            log.info("step %d is already committed at %s; not saving it again", step, self.storage.url(name))
            return time.perf_counter() - start
        if self.env.is_rank_zero and self.storage.exists(name):
            log.info("removing debris of an interrupted save at %s before saving again", self.storage.url(name))
            self.storage.remove(name, recursive=True)
        collectives.barrier()  # nobody writes into the folder while it is being cleared
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
        return blocked

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
        self.wait()
        self._wait_for_retention()
        self._janitor.shutdown(wait=True)
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
            self.storage.write_bytes(posixpath.join(name, relative), data)
        if upload is not None:
            upload.result()
        records = dict(writer.records) or self._hash_written_back(name)  # process mode hashes in a child
        records.update({relative: _hashed(relative, data) for relative, data in small_files.items()})
        sidecar = posixpath.join(name, SIDECARS, f"rank_{self.env.rank:05d}.json")
        self.storage.write_bytes(sidecar, json.dumps(sorted(records.values(), key=lambda r: r["path"])).encode())
        failpoints.failpoint("after_shards", step)
        if self.env.is_rank_zero:
            files = self._gather_sidecars(name)
            seconds = time.perf_counter() - start
            manifest = Manifest(step=step, world_size=self.env.world_size, strategy=self.strategy_name,
                                config_hash=self.config_hash, files=files, save_seconds=seconds,
                                created_unix=time.time(), extra={"async_mode": self.async_mode})
            self.storage.write_bytes(posixpath.join(name, MANIFEST), manifest.to_json())
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

    def _gather_sidecars(self, name: str) -> list[FileRecord]:
        deadline = time.monotonic() + self.cfg.commit_timeout_s
        expected = [f"rank_{r:05d}.json" for r in range(self.env.world_size)]
        while True:
            present = set(self.storage.listdir(posixpath.join(name, SIDECARS)))
            missing = [e for e in expected if e not in present]
            if not missing:
                break
            if time.monotonic() > deadline:
                raise StorageError(f"step {name} not committed: ranks {missing[:8]} never reported their files "
                                   f"within checkpoint.commit_timeout_s={self.cfg.commit_timeout_s}")
            time.sleep(0.05)
        files: dict[str, FileRecord] = {}
        for sidecar in expected:
            for record in json.loads(self.storage.read_bytes(posixpath.join(name, SIDECARS, sidecar))):
                files[record["path"]] = record
        return sorted(files.values(), key=lambda r: r["path"])

    def _retain(self, newest: int) -> None:
        """Keep the newest ``keep_last`` committed steps; delete older ones and debris of older failed saves.

        Deleting a step removes its manifest first, so an interrupted deletion leaves debris, never a
        committed step with missing files.
        """
        committed = committed_steps(self.storage)
        keep = set(committed[-self.cfg.keep_last:]) | {newest}
        for folder in self.storage.listdir():
            step = parse_step(folder)
            if step is None or step in keep or step > newest:
                continue
            if step in committed:
                self.storage.remove(posixpath.join(folder, MANIFEST))
                log.info("retention: removing committed step %d (keep_last=%d)", step, self.cfg.keep_last)
                failpoints.failpoint("mid_retention", newest)
            else:
                log.info("retention: removing debris of an interrupted save at step %d", step)
            self.storage.remove(folder, recursive=True)

    # -- resuming --------------------------------------------------------------------------------------
    def restore(self, template: dict[str, Any]) -> Restored | None:
        """Load the step chosen by ``checkpoint.resume`` into ``template`` (in place); None: start fresh."""
        resume = str(self.cfg.resume)
        if resume == "never":
            return None
        if resume not in ("auto",) and not resume.isdigit() and committed_steps(self.storage):
            # a requeued run that started from another run's checkpoint continues from its own steps
            log.info("checkpoint.uri already holds this run's committed steps; resuming the newest of them "
                     "instead of %s", resume)
            resume = "auto"
        storage, candidates = resolve_resume_target(self.storage, resume)
        candidates = collectives.broadcast_object(candidates)  # everyone tries the same steps in order
        explicit = resume != "auto"
        for name in candidates:
            problem = self._check_step(storage, name)
            if problem is not None:
                if explicit:
                    raise ConfigError(f"cannot resume from {storage.url(name)}: {problem}")
                log.warning("skipping %s: %s", storage.url(name), problem)
                continue
            return self._load(storage, name, template)
        if explicit:
            raise ConfigError(f"checkpoint.resume={resume}: no such step at {storage.url()}")
        log.info("no committed checkpoint under %s; starting from step 0", self.storage.url())
        return None

    def _check_step(self, storage: Storage, name: str) -> str | None:
        """Why this step cannot be loaded, or None. Checksum work is split across the ranks."""
        problem = None
        try:
            manifest = read_manifest(storage, name)
            mine = manifest.files[self.env.rank::self.env.world_size]
            problems = verify_files(storage, name, mine, checksums=self.cfg.verify_checksums)
            problem = "; ".join(problems[:3]) if problems else None
        except ManifestError as e:
            problem = str(e)
        reports = [p for p in collectives.all_gather_object(problem) if p]
        return "; ".join(reports) if reports else None

    def _load(self, storage: Storage, name: str, template: dict[str, Any]) -> Restored:
        url = storage.url(name)
        saved_cfg = OmegaConf.create(storage.read_bytes(posixpath.join(name, CONFIG)).decode())
        self._check_compatible(saved_cfg, url)
        reader = FsspecReader(url, **storage.options)
        self._check_shapes(reader, template, url)
        start = time.perf_counter()
        dcp.load(template, storage_reader=reader, no_dist=not dist.is_initialized())
        extras = json.loads(storage.read_bytes(posixpath.join(name, TRAINER_STATE)))
        manifest = read_manifest(storage, name)
        if manifest.world_size == self.env.world_size:
            with storage.open(posixpath.join(name, f"rng/rank_{self.env.rank:05d}.pt")) as stream:
                set_rng_state(torch.load(io.BytesIO(stream.read()), weights_only=True))
        else:
            # RNG streams cannot be split or merged across ranks: re-seed deterministically instead
            torch.manual_seed(self.full_cfg.trainer.seed * 100_003 + manifest.step * 1_009 + self.env.rank)
        log.info("resumed from %s (step %d, saved by %d ranks with strategy %s) in %.2f s", url, manifest.step,
                 manifest.world_size, manifest.strategy, time.perf_counter() - start)
        if manifest.world_size != self.env.world_size:
            log.info("world size changed %d -> %d: model and optimizer resharded by DCP, data continues at "
                     "global sample %s, RNG re-seeded per rank", manifest.world_size, self.env.world_size,
                     extras.get("loader", {}).get("next_sample"))
        return Restored(step=manifest.step, extras=extras, source=url)

    def _check_compatible(self, saved: DictConfig, url: str) -> None:
        """A checkpoint of another model is a config error, reported before any tensor is read."""
        # the saved config is redacted, so compare it with the redacted current one
        current = redact(OmegaConf.to_container(self.full_cfg.model, resolve=True))
        problems = model_change_problems(saved.model, current)
        if problems:
            raise ConfigError(f"cannot resume from {url}: {problems[0]} (or start a new run: a new "
                              "checkpoint.uri, or checkpoint.resume=never)")

    def _check_shapes(self, reader: FsspecReader, template: dict[str, Any], url: str) -> None:
        """Every entry this strategy needs must be in the checkpoint, with the same global shape."""
        saved = reader.read_metadata().state_dict_metadata
        missing = checkpoint_mismatch(template, saved.keys())
        problems = [missing] if missing else []
        for key, value in template.get("model", {}).items():
            meta = saved.get(f"model.{key}")
            if isinstance(value, torch.Tensor) and hasattr(meta, "size") and tuple(meta.size) != tuple(value.shape):
                problems.append(f"{key} is {tuple(meta.size)} there, {tuple(value.shape)} here")
        if problems:
            raise ConfigError(f"checkpoint {url} does not fit this model: {'; '.join(problems[:4])}")
