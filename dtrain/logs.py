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


def setup_logging(env: DistEnv, level: str = "INFO") -> None:
    prefix = f"[rank{env.rank}] " if env.world_size > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("dtrain")
    root.handlers[:] = [handler]
    root.propagate = False
    # other ranks only speak when something is wrong
    root.setLevel(level if env.is_rank_zero else max(logging.WARNING, logging.getLevelName(level)))
