"""The one seam between checkpoints and storage: a handful of calls over an fsspec filesystem.

Local disk, ``s3://``, ``gs://`` and ``memory://`` all go through here, so the commit protocol is the
same code everywhere. Nothing here renames: object stores have no atomic rename, so commits are
made by writing a manifest last, never by moving folders.
"""

from __future__ import annotations

import os
import posixpath
import threading
import time
import uuid
from typing import Any, Callable, TypeVar

import fsspec
from fsspec.core import url_to_fs

from dtrain.config.secrets import redact, redact_text
from dtrain.config.uris import uri_problems

T = TypeVar("T")

# scheme -> the extra that installs its fsspec backend
BACKEND_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class StorageError(RuntimeError):
    """Storage is misconfigured or unreachable; the message says which and how to fix it.

    The message is redacted when the error is made: it quotes the URI, which may carry userinfo, and
    the error may reach the user through any path (ConfigError, ``dtrain ckpt``, a log, a traceback)."""

    def __init__(self, message: str):
        super().__init__(redact_text(message))


class TransientStorageError(StorageError):
    """A failure worth retrying (timeouts, throttling, connection resets)."""


def _is_transient(error: BaseException) -> bool:
    name = type(error).__name__
    text = str(error)
    return (isinstance(error, (TimeoutError, ConnectionError)) or "Timeout" in name or "Throttl" in text
            or "SlowDown" in text or "Connection reset" in text)


class Storage:
    """A root URI plus its filesystem. Paths passed in are relative to the root, '/'-separated."""

    def __init__(self, uri: str, options: dict[str, Any] | None = None, retries: int = 3):
        problems = uri_problems("checkpoint.uri", uri)
        if problems:
            raise StorageError(problems[0])
        self.uri = uri.rstrip("/")
        self.options = dict(options or {})
        self.retries = retries
        scheme = fsspec.utils.get_protocol(self.uri)
        try:
            self.fs, self.root = url_to_fs(self.uri, **self.options)
        except ImportError as e:
            extra = BACKEND_EXTRAS.get(scheme)
            hint = f"pip install 'dtrain[{extra}]'" if extra else f"install the fsspec backend for {scheme}://"
            raise StorageError(f"checkpoint.uri={self.uri} uses {scheme}:// but its fsspec backend is not "
                               f"installed ({e}); {hint}") from None
        except ValueError as e:
            raise StorageError(f"checkpoint.uri={self.uri}: {e}; use a local path, file://, s3://, gs:// "
                               "or memory://") from None
        self.root = self.root.rstrip("/") or "/"
        self.protocol = scheme
        if scheme in ("file", "local"):
            self.uri = self.root  # absolute, so every tool resolves it the same whatever its cwd

    def __repr__(self) -> str:
        return f"Storage({redact_text(self.uri)!r}, options={redact(self.options)})"

    # -- paths ---------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        """Backend path (no scheme) of a relative path, for fsspec calls."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def url(self, *parts: str) -> str:
        """Full URL of a relative path, for tools that open their own filesystem (DCP's fsspec writer)."""
        return posixpath.join(self.uri, *parts) if parts else self.uri

    # -- calls ---------------------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """Run ``fn``, retrying transient failures with backoff; permanent ones surface at once."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except Exception as e:
                if not _is_transient(e) or attempt == self.retries:
                    if _is_transient(e):
                        raise TransientStorageError(f"{what} on {self.uri} kept failing: {e}") from e
                    raise
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def listdir(self, relative: str = "") -> list[str]:
        """Names (not paths) directly under a folder; empty when it does not exist."""
        target = self.path(relative) if relative else self.root
        self.fs.invalidate_cache(target)
        try:
            entries = self._call("list", lambda: self.fs.ls(target, detail=False))
        except FileNotFoundError:
            return []
        return sorted({posixpath.basename(e.rstrip("/")) for e in entries} - {""})

    def exists(self, relative: str) -> bool:
        self.fs.invalidate_cache(self.path(relative))
        return self._call("exists", lambda: self.fs.exists(self.path(relative)))

    def size(self, relative: str) -> int:
        self.fs.invalidate_cache(self.path(relative))
        return int(self._call("size", lambda: self.fs.size(self.path(relative))))

    def read_bytes(self, relative: str) -> bytes:
        return self._call("read", lambda: self.fs.cat_file(self.path(relative)))

    @property
    def has_directories(self) -> bool:
        """Local disk has directories whose entries need their own fsync; object stores have none."""
        return self.protocol in ("file", "local")

    def write_bytes(self, relative: str, data: bytes) -> None:
        """One object written in one call (a single PUT on object stores). On local disk the file is
        fsynced before this returns: a commit must never point at bytes still in the page cache."""
        if not self.has_directories:
            self._call("write", lambda: self.fs.pipe_file(self.path(relative), data))
            return
        path = self.path(relative)
        os.makedirs(posixpath.dirname(path), exist_ok=True)
        with open(path, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())

    def sync_dir(self, relative: str = "") -> None:
        """Make a directory's entries durable (local disk; a no-op on object stores): the files created
        in it, or the directory itself when called on its parent."""
        if not self.has_directories:
            return
        fd = os.open(self.path(relative) if relative else self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def open(self, relative: str, mode: str = "rb"):
        return self.fs.open(self.path(relative), mode)

    def remove(self, relative: str, recursive: bool = False) -> None:
        try:
            self._call("remove", lambda: self.fs.rm(self.path(relative), recursive=recursive))
        except FileNotFoundError:
            pass

    def preflight(self, timeout_s: float = 30.0) -> float:
        """Write, read back and delete a probe object: catches a missing bucket, missing credentials or
        an unreachable endpoint before any training. Returns the measured write bandwidth (bytes/s).

        Bounded by ``timeout_s``: an endpoint that never answers would otherwise hold the job for the
        storage client's whole retry schedule (minutes of connect timeouts and backoff)."""
        outcome: dict[str, Any] = {}

        def probe() -> None:
            try:
                outcome["bandwidth"] = self._probe()
            except BaseException as e:  # handed to the caller's thread
                outcome["error"] = e

        thread = threading.Thread(target=probe, name="dtrain-storage-probe", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            raise StorageError(f"checkpoint.uri={self.uri}: the store did not answer within {timeout_s:.0f} s "
                               f"(checkpoint.storage_timeout_s); check the endpoint and the network, or raise the "
                               f"timeout for a slow store")
        if "error" in outcome:
            error = outcome["error"]
            if isinstance(error, StorageError):
                raise error
            raise StorageError(f"checkpoint.uri={self.uri} is not usable: {describe_storage_error(error)}") from None
        return outcome["bandwidth"]

    def _probe(self) -> float:
        name = f".dtrain-probe-{uuid.uuid4().hex[:12]}"
        payload = b"\0" * (4 * 2**20)
        start = time.perf_counter()
        self.write_bytes(name, payload)
        elapsed = time.perf_counter() - start
        if self.size(name) != len(payload):
            raise StorageError(f"checkpoint.uri={self.uri}: a probe object was written but reads back "
                               "with the wrong size; the storage is not usable")
        self.remove(name)
        return len(payload) / max(elapsed, 1e-9)


def describe_storage_error(error: BaseException) -> str:
    """One line that says what is wrong with the storage and how to fix it (no secrets)."""
    name, text = type(error).__name__, str(error).splitlines()[0] if str(error) else type(error).__name__
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower() or (
            isinstance(error, FileNotFoundError) and "bucket" in text.lower()):
        return f"the bucket does not exist ({text}); create it or fix the bucket name in checkpoint.uri"
    if "NoCredentials" in name or "Unable to locate credentials" in text or "credentials" in text.lower():
        return ("no credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (S3), "
                "GOOGLE_APPLICATION_CREDENTIALS (GCS), or checkpoint.storage_options")
    if isinstance(error, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"access denied ({text}); check the credentials' permissions on this bucket/prefix"
    if "EndpointConnection" in name or "Could not connect" in text or isinstance(error, (ConnectionError, OSError)) \
            and "connect" in text.lower():
        return f"the storage endpoint is unreachable ({text}); check checkpoint.storage_options.endpoint_url"
    if isinstance(error, (NotADirectoryError, IsADirectoryError, FileNotFoundError, PermissionError, OSError)):
        return f"{name}: {text}; check that the path exists and is writable"
    return f"{name}: {text}"
