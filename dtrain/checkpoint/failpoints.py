"""Named points where fault tests kill this process for real (SIGKILL), like etcd's failpoints.

``DTRAIN_FAILPOINT=<name>[@<rank>|@*][#<step>]``, e.g. ``after_shards@0#20`` kills rank 0 right after
its shards of step 20 are written and before the manifest. Unset (always, outside tests) a failpoint
costs one comparison. Names: ``mid_shard`` (64 KiB into a shard file), ``after_shards`` (all data
written, manifest not yet), ``mid_retention`` (an old step's manifest deleted, its files not yet),
``mid_restore`` (a resume verified the step's files and is about to load them; the step is the restored one).
"""

from __future__ import annotations

import os
import signal

_SPEC = os.environ.get("DTRAIN_FAILPOINT", "")
saving_step: int | None = None  # set by the checkpoint manager for points that do not know the step


def _matches(name: str, step: int | None) -> bool:
    spec, _, step_part = _SPEC.partition("#")
    point, _, rank_part = spec.partition("@")
    if point != name:
        return False
    if rank_part and rank_part != "*" and rank_part != os.environ.get("RANK", "0"):
        return False
    step = saving_step if step is None else step
    return not step_part or step is None or int(step_part) == step


def failpoint(name: str, step: int | None = None) -> None:
    if _SPEC and _matches(name, step):
        os.write(2, f"dtrain failpoint {name}: killing rank {os.environ.get('RANK', '0')} with SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def active(name: str) -> bool:
    """Whether a failpoint with this name is armed at all (to keep per-byte checks off the hot path)."""
    return bool(_SPEC) and _SPEC.partition("#")[0].partition("@")[0] == name
