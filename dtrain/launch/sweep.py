"""``dtrain launch sweep [overrides with sweeps] hydra/launcher=submitit_slurm``: a Hydra multirun.

dtrain composes its config with the Compose API (one run directory per job, no ``@hydra.main``), so
sweeps get their own small Hydra app here: Hydra expands the sweep, its launcher plugin (e.g.
hydra-submitit-launcher: ``pip install 'dtrain[slurm]'``) places each point, and each point runs
``python -m dtrain <its overrides>`` as a child process, so a point is exactly a normal dtrain run
(run.name ``slurm-<job id>`` under submitit, exit codes as everywhere). A point that does not exit 0
raises, which the launcher reports as that job's failure.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Sequence

from dtrain import exit_codes


def train_point(cfg) -> int:
    """Hydra's task function: one sweep point, as a child process (runs on the node the launcher chose)."""
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra")]
    code = subprocess.run([sys.executable, "-m", "dtrain", *overrides]).returncode
    if code != exit_codes.OK:
        raise RuntimeError(f"dtrain {' '.join(overrides)} exited {code} ({exit_codes.meaning(code)})")
    return code


def cmd_sweep(argv: Sequence[str]) -> int:
    import hydra

    from dtrain.config.compose import config_dir
    from dtrain.config.schema import register_schemas

    register_schemas()
    args = [a for a in argv if a not in ("-m", "--multirun")]
    app = hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(train_point)
    saved = sys.argv
    sys.argv = ["dtrain-launch-sweep", "--multirun", *args]
    try:
        app()
    except SystemExit as e:  # Hydra exits 1 on an error it already printed
        return int(e.code or 0)
    finally:
        sys.argv = saved
    return exit_codes.OK
