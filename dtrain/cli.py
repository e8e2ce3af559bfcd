"""``dtrain [overrides]`` trains; ``dtrain validate [overrides]`` only checks the config.

Order matters: compose and validate on every rank before any process group exists, so bad input
costs nothing and every rank exits with the same one-line message.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Sequence

from dtrain import exit_codes
from dtrain.config.compose import config_hash, write_resolved
from dtrain.config.errors import ConfigError
from dtrain.config.validate import load_config
from dtrain.distributed import collectives
from dtrain.distributed.env import DistEnv, discover_env
from dtrain.logs import setup_logging

USAGE = f"""usage: dtrain [hydra overrides...]            train (e.g. dtrain model=gpt_tiny trainer.max_steps=50)
       dtrain validate [hydra overrides...]   check a config without training
       dtrain plan --world-size N [--rank R] [overrides...]   mesh, shards and memory of N ranks, in one process
       dtrain ckpt ls|verify|inspect|export|latest   look at checkpoints (dtrain ckpt --help)
       dtrain launch torchrun|slurm|k8s [--nodes N] [--nproc-per-node P] [--out PATH] [--submit] [overrides...]
       dtrain goodput RUN_DIR [--json]        where a run's wall time went, across restarts
       dtrain scale project|validate|measure|calibrate|projections|plot|spot   scaling studies (dtrain scale --help)
       torchrun --nproc-per-node=N -m dtrain [overrides...]

exit codes: {exit_codes.OK} done | {exit_codes.CONFIG_ERROR} bad config or storage (nothing was started) |
{exit_codes.PREEMPTED} preempted after a committed checkpoint (requeue me) | other: a crash"""

EXIT_CONFIG_ERROR = exit_codes.CONFIG_ERROR


def _report(error: ConfigError, env: DistEnv) -> int:
    """One message per node (local rank 0). The others linger a moment before exiting, because torchrun
    kills the surviving workers as soon as the first one exits, which could swallow the message."""
    if env.local_rank == 0:
        where = f"[rank{env.rank}] " if env.world_size > 1 else ""
        print(where + error.render(), file=sys.stderr, flush=True)
    else:
        time.sleep(2.0)
    return EXIT_CONFIG_ERROR


def _env_or_report() -> DistEnv | None:
    """The launcher's view of this process, or None after printing why its variables are unusable."""
    try:
        return discover_env()
    except ValueError as e:
        print(ConfigError(f"the launcher environment is inconsistent: {e}").render(), file=sys.stderr, flush=True)
        return None


def cmd_validate(overrides: Sequence[str]) -> int:
    env = _env_or_report()
    if env is None:
        return EXIT_CONFIG_ERROR
    try:
        cfg = load_config(overrides, env.world_size)
    except ConfigError as e:
        return _report(e, env)
    print(f"config OK for world size {env.world_size}: model={cfg.model._target_} strategy={cfg.strategy.name} "
          f"run.dir={cfg.run.dir} hash={config_hash(cfg)}")
    return 0


def _agree_on_config(cfg) -> None:
    """Every rank must have resolved the identical config; name the ranks that differ."""
    hashes = collectives.all_gather_object(config_hash(cfg))
    if len(set(hashes)) > 1:
        groups: dict[str, list[int]] = {}
        for rank, value in enumerate(hashes):
            groups.setdefault(value, []).append(rank)
        detail = "; ".join(f"ranks {ranks} have hash {value}" for value, ranks in groups.items())
        raise ConfigError(f"ranks resolved different configs ({detail}); give every rank the same overrides "
                          "and set run.name explicitly")


def cmd_train(overrides: Sequence[str]) -> int:
    env = _env_or_report()
    if env is None:
        return EXIT_CONFIG_ERROR
    setup_logging(env)
    try:
        cfg = load_config(overrides, env.world_size)
    except ConfigError as e:
        return _report(e, env)
    setup_logging(env, cfg.logging.level)

    import torch.distributed as dist

    from dtrain.checkpoint.preemption import EXIT_PREEMPTED, Preempted
    from dtrain.checkpoint.preflight import preflight
    from dtrain.distributed.process_group import destroy_process_group, init_process_group, pick_backend, pick_device
    from dtrain.trainer import Trainer

    from dtrain.metrics.hang import enable_flight_recorder

    enable_flight_recorder(cfg.run.dir, cfg.monitor.flight_recorder_entries)  # before any process group
    device = pick_device(cfg.trainer.device, env)
    if env.source == "torchrun":
        from dtrain.distributed.watchdog import watch_parent

        watch_parent()
    try:
        if cfg.strategy.name != "single":
            init_process_group(env, pick_backend(cfg.dist.backend, device), device, cfg.dist.timeout_s)
        _agree_on_config(cfg)
        write_bandwidth = preflight(cfg, env)
        trainer = Trainer.build(cfg, env, device, write_bandwidth)
        if env.is_rank_zero:  # only once nothing refused the run: a refused run leaves the folder as it was
            write_resolved(cfg, cfg.run.dir, overrides)
        collectives.barrier()
        trainer.fit()
    except ConfigError as e:
        return _report(e, env)
    except Preempted as e:
        print(f"dtrain: {e}; exiting with {EXIT_PREEMPTED} so the launcher requeues", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    finally:
        if dist.is_initialized():
            destroy_process_group()
    return 0


def run(argv: Sequence[str]) -> int:
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv and argv[0] == "validate":
        return cmd_validate(argv[1:])
    if argv and argv[0] == "ckpt":
        from dtrain.checkpoint.cli import main as ckpt_main

        return ckpt_main(argv[1:])
    if argv and argv[0] == "launch":
        from dtrain.launch.cli import main as launch_main

        return launch_main(argv[1:])
    if argv and argv[0] == "goodput":
        from dtrain.metrics.goodput_cli import main as goodput_main

        return goodput_main(argv[1:])
    if argv and argv[0] == "scale":
        from dtrain.scaling.cli import main as scale_main

        return scale_main(argv[1:])
    if argv and argv[0] == "plan":
        from dtrain.dryrun import cmd_plan

        return cmd_plan(argv[1:])
    return cmd_train(argv)


def _several_ranks() -> bool:
    try:
        return discover_env().world_size > 1
    except ValueError:
        return False


def main() -> None:
    code = run(sys.argv[1:])
    exit_codes.write_marker(code)  # for `dtrain launch run`, which cannot learn it through torchrun
    sys.stdout.flush()
    sys.stderr.flush()
    if _several_ranks():
        # gloo + DDP can deadlock in destructors at interpreter exit; everything is saved and torn down by now
        os._exit(code)
    sys.exit(code)
