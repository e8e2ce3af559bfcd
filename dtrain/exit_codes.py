"""dtrain's exit-code contract: what every dtrain process, launcher and scheduler rule agrees on.

| code | meaning | what a launcher does |
|---|---|---|
| 0 | done | nothing |
| 2 | bad config or unusable storage | never retry: the same input fails the same way |
| 75 | preempted after a committed checkpoint (EX_TEMPFAIL) | requeue; it is not a failure |
| other | a crash | retry a bounded number of times, and stop when retries make no checkpoint progress |

torchrun exits 1 whatever its workers returned, so the numbers cannot travel through it. Instead each
worker that ends through dtrain's entry point writes its code to a *marker* in a folder the launcher
names (``DTRAIN_EXIT_DIR``), and ``dtrain launch run`` (the wrapper around torchrun) turns the
markers into its own exit code with :func:`verdict`. A crash writes no marker (it never reaches the
end of ``main``), which is exactly what makes it a crash.

A leaf module with no dtrain imports: the CLI, the checkpoint package (preemption) and the launch
package all read the numbers from here, and the renderers write them into every sbatch script and
Kubernetes manifest.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

OK = 0
CONFIG_ERROR = 2
PREEMPTED = 75
CRASH = 1  # what the wrapper returns for any failure that is neither of the above

EXIT_DIR_VAR = "DTRAIN_EXIT_DIR"

CONTRACT: tuple[tuple[str, str, str], ...] = (
    (str(OK), "done", "nothing"),
    (str(CONFIG_ERROR), "bad config or unusable storage", "never retried"),
    (str(PREEMPTED), "preempted after a committed checkpoint", "requeued; not counted as a failure"),
    ("other", "a crash", "retried a bounded number of times, and not when retries make no checkpoint progress"),
)


def meaning(code: int) -> str:
    """One phrase for a code, for log lines such as ``training exited 75 (preempted ...)``."""
    if code == OK:
        return "done"
    if code == CONFIG_ERROR:
        return "bad config or unusable storage"
    if code == PREEMPTED:
        return "preempted after a committed checkpoint"
    return "a crash"


def _marker_name(environ: Mapping[str, str]) -> str:
    # one file per worker and torchrun restart: a restarted worker group writes new markers, and the
    # verdict reads the newest restart only
    restart = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"restart{int(restart):04d}-rank{int(environ.get('RANK', '0')):06d}.code"


def write_marker(code: int, environ: Mapping[str, str] | None = None) -> None:
    """Record this worker's exit code where the launcher looks (a no-op outside ``dtrain launch run``)."""
    env = os.environ if environ is None else environ
    folder = env.get(EXIT_DIR_VAR)
    if not folder:
        return
    path = Path(folder) / _marker_name(env)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(f"{code}\n")
    tmp.replace(path)  # a reader never sees half a number


def read_markers(folder: str | Path) -> dict[int, dict[int, int]]:
    """``{restart: {rank: code}}`` of the markers in ``folder``; unreadable files are skipped."""
    found: dict[int, dict[int, int]] = {}
    for path in Path(folder).glob("restart*-rank*.code"):
        try:
            restart_part, rank_part = path.stem.split("-")
            found.setdefault(int(restart_part[7:]), {})[int(rank_part[4:])] = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return found


def verdict(markers: dict[int, dict[int, int]], torchrun_code: int) -> int:
    """The contract's code for one node, from its workers' markers and torchrun's own exit code.

    - any worker said 2 (in any restart): 2. A config or storage verdict is agreed by every rank, and
      torchrun may have killed the others before they could write theirs.
    - a worker of the newest restart said 75: 75. Workers exit 75 only after the checkpoint is
      committed, which is a collective, so every rank got there; a missing marker is a rank that
      torchrun killed after the first one left.
    - torchrun exited 0 and no marker says otherwise: 0.
    - anything else is a crash.
    """
    if any(CONFIG_ERROR in codes.values() for codes in markers.values()):
        return CONFIG_ERROR
    newest = markers[max(markers)] if markers else {}
    if PREEMPTED in newest.values():
        return PREEMPTED
    if torchrun_code == OK and set(newest.values()) <= {OK}:
        return OK
    return CRASH
