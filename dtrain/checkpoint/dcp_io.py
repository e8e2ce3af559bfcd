"""torch.distributed.checkpoint over fsspec, with a size and SHA-256 for every file computed while it is
written (no second read of the bytes).

DCP's fsspec writer lives in a private module (``torch.distributed.checkpoint._fsspec_filesystem``);
this file is the only place that imports it, so a torch upgrade that moves it breaks one file.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter

from dtrain.checkpoint import failpoints

__all__ = ["FileRecord", "HashingFsspecWriter", "FsspecReader", "sha256_of_stream", "stop_checkpoint_process"]

FileRecord = dict[str, Any]  # {"path": relative name, "size": bytes, "sha256": hex}


class _HashingStream(io.RawIOBase):
    """Pass-through writer that hashes and counts what goes by; sequential writes only."""

    def __init__(self, inner: Any):
        self.inner, self.digest, self.count = inner, hashlib.sha256(), 0
        self.kill_after = 2**16 if failpoints.active("mid_shard") else None  # fault tests only

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        written = self.inner.write(view)
        written = len(view) if written is None else written
        self.digest.update(view[:written])
        self.count += written
        if self.kill_after is not None and self.count >= self.kill_after:
            self.inner.flush()
            failpoints.failpoint("mid_shard")
        return written

    def tell(self) -> int:
        return self.count

    def seek(self, *args) -> int:
        raise io.UnsupportedOperation("checksummed checkpoint streams are write-once and sequential")

    def fileno(self) -> int:
        return self.inner.fileno()

    def flush(self) -> None:
        self.inner.flush()


class _HashingFileSystem(FileSystem):
    """DCP's fsspec filesystem, recording (size, sha256) of every file it creates, keyed by basename."""

    def __init__(self, inner: FileSystem, records: dict[str, FileRecord]):
        super().__init__()
        self.fs = inner.fs
        self.records = records
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # async_mode=process pickles the writer into a child process: the lock cannot travel, and the
        # records the child makes stay there (the parent then hashes the files by reading them back)
        state = dict(self.__dict__)
        state.pop("_lock")
        state["records"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        with super().create_stream(path, mode) as stream:
            hashing = _HashingStream(stream)
            yield hashing
            hashing.flush()
        with self._lock:
            name = posixpath.basename(os.fspath(path))
            self.records[name] = {"path": name, "size": hashing.count, "sha256": hashing.digest.hexdigest()}

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        """DCP renames ``.metadata.tmp`` into place. Object stores have no rename: copy + delete directly
        rather than let the backend try a server-side move first (gcsfs logs a traceback when it fails)."""
        if "file" in self.fs.protocol or "local" in self.fs.protocol:
            super().rename(path, new_path)
        else:
            self.fs.copy(os.fspath(path), os.fspath(new_path))
            self.fs.rm(os.fspath(path))
        with self._lock:
            old, new = posixpath.basename(os.fspath(path)), posixpath.basename(os.fspath(new_path))
            if old in self.records:
                self.records[new] = {**self.records.pop(old), "path": new}


class HashingFsspecWriter(FsspecWriter):
    """DCP writer whose ``records`` afterwards hold every file this rank wrote, with size and checksum."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, sync_files: bool = True,
                 thread_count: int = 1):
        # sync_files: fsync local files before the manifest can commit them (object stores need no fsync)
        super().__init__(url, thread_count=thread_count, sync_files=sync_files, overwrite=True,
                         **(storage_options or {}))
        self.records: dict[str, FileRecord] = {}
        self.fs = _HashingFileSystem(self.fs, self.records)


def sha256_of_stream(stream: Any, chunk: int = 8 * 2**20) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while True:
        block = stream.read(chunk)
        if not block:
            return size, digest.hexdigest()
        digest.update(block)
        size += len(block)


def stop_checkpoint_process() -> None:
    """Stop DCP's background save process (``async_mode=process``) now, instead of at garbage collection,
    which never comes when the launcher exits with ``os._exit``; the child would then die on a closed pipe."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    process = getattr(executor, "_CHECKPOINT_PROCESS", None)
    if process is not None:
        executor._CHECKPOINT_PROCESS = None
        del process  # its __del__ sends TERMINATE and joins the child
