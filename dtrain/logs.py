"""Python logging set up once per process: rank in every line, only rank 0 chatty."""

from __future__ import annotations

import logging
import sys

from dtrain.config.secrets import redact_text
from dtrain.distributed.env import DistEnv


class RedactingFormatter(logging.Formatter):
    """Every line dtrain logs, exception text included, with credentials masked: messages quote storage
    URLs (``s3://user:pass@host``) and options, and a formatter sees the finished line whatever logged it."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


# Storage clients log every retry they make, with a traceback (gcsfs: "_request out of retries on
# exception"). dtrain turns their final failure into one line that says what to fix, so their own logs
# are only shown when logging.level=DEBUG.
STORAGE_CLIENT_LOGGERS = ("gcsfs", "s3fs", "aiobotocore", "botocore", "aiohttp", "urllib3", "fsspec", "google")


def setup_logging(env: DistEnv, level: str = "INFO") -> None:
    prefix = f"[rank{env.rank}] " if env.world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("dtrain")
    root.handlers[:] = [handler]
    root.propagate = False
    # other ranks only speak when something is wrong
    root.setLevel(level if env.is_rank_zero else max(logging.WARNING, logging.getLevelName(level)))
    for name in STORAGE_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if level == "DEBUG" else logging.CRITICAL)
