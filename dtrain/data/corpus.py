"""The built-in corpus: the Python standard library's own source files, as bytes.

Real text that nobody on this project wrote, present on every machine that runs dtrain, found at
run time. Files are read in sorted relative-path order, so the corpus (and its fingerprint) is the
same on every rank and every run of the same Python version.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from dtrain.data.windows import TokenWindows

SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = [p for p in base.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(base).parts)]
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def _read_files(max_bytes: int | None, root: Path | None) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for path in stdlib_source_files(root):
        data = path.read_bytes()
        if max_bytes is not None and total + len(data) > max_bytes:
            data = data[: max_bytes - total]
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if total == 0:
        raise FileNotFoundError(f"no .py files found under {root or sysconfig.get_paths()['stdlib']}")
    return b"".join(chunks)


def cache_dir() -> Path:
    return Path(os.environ.get("DTRAIN_CACHE", Path.home() / ".cache" / "dtrain"))


@functools.lru_cache(maxsize=2)  # train and val splits share one read
def read_corpus(max_bytes: int | None = None, root: Path | None = None) -> tuple[np.ndarray, str]:
    """All bytes (capped at ``max_bytes``) and a fingerprint of exactly what was read.

    The concatenation is cached as one file (memory-mapped on later runs): walking ~1,800 files costs
    seconds on a busy node at every start, and a restart after preemption should be quick. The cache key
    covers the Python build, the stdlib folder and the cap; writes are atomic, so concurrent ranks are safe.
    """
    base = str(root or sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(f"{sys.version}|{base}|{os.stat(base).st_mtime_ns}|{max_bytes}".encode()).hexdigest()
    path = cache_dir() / f"stdlib-corpus-{key[:16]}.bin"
    if not path.exists():
        data = _read_files(max_bytes, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    tokens = np.memmap(path, dtype=np.uint8, mode="r")
    digest = hashlib.sha256(tokens).hexdigest()[:16]
    return tokens, digest


class StdlibCorpus(TokenWindows):
    """Byte-level tokens (vocab 256). The last ``val_fraction`` of the bytes is the validation split."""

    def __init__(self, split: str, seq_len: int, vocab_size: int = 256, val_fraction: float = 0.05,
                 max_bytes: int | None = None):
        if vocab_size < 256:
            raise ValueError(f"byte-level corpus needs vocab_size >= 256, got {vocab_size}")
        tokens, self.fingerprint = read_corpus(max_bytes)
        cut = int(len(tokens) * (1.0 - val_fraction))
        super().__init__(tokens[:cut] if split == "train" else tokens[cut:], seq_len)

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    @staticmethod
    def decode(tokens: list[int]) -> str:
        return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")

    @staticmethod
    def check_config(cfg) -> list[str]:
        problems = []
        if not 0.0 < cfg.val_fraction < 1.0:
            problems.append(f"data.val_fraction={cfg.val_fraction} must be between 0 and 1 (e.g. 0.05)")
        if cfg.max_bytes is not None and cfg.max_bytes < 10 * (cfg.seq_len + 1):
            problems.append(f"data.max_bytes={cfg.max_bytes} is too small for seq_len={cfg.seq_len}; "
                            "raise it or set data.max_bytes=null")
        return problems
