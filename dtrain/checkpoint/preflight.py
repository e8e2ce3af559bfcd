"""Storage, resume and writer checks before any model is built: bad input costs seconds, not a job.

Rank 0 alone probes the store, lists it, reads the manifests and looks for another live writer (at
1024 ranks, 1024 listings of one bucket would be the expensive part); every rank gets its verdict.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from dtrain.checkpoint.lease import WriterLease, this_writer
from dtrain.checkpoint.manager import committed_steps
from dtrain.checkpoint.manifest import ManifestError, parse_step, read_manifest, step_dir
from dtrain.checkpoint.storage import Storage, StorageError, describe_storage_error
from dtrain.config.errors import ConfigError
from dtrain.distributed import collectives
from dtrain.distributed.env import DistEnv


def preflight(cfg: DictConfig, env: DistEnv) -> float | None:
    """Raise ConfigError on every rank when the checkpoint storage, ``checkpoint.resume`` or the writer
    lease cannot work (rank 0 checks; needs the process group when there are several ranks).

    Returns the write bandwidth the probe measured.
    """
    return collectives.on_rank_zero(lambda: _check(cfg, env))


def _check(cfg: DictConfig, env: DistEnv) -> float | None:
    c = cfg.checkpoint
    try:
        storage = Storage(c.uri, OmegaConf.to_container(c.storage_options, resolve=True))
        bandwidth = storage.preflight(c.storage_timeout_s)
        committed = committed_steps(storage)
    except StorageError as e:
        raise ConfigError(str(e)) from None
    except Exception as e:  # listing can fail like the probe (credentials, endpoint)
        raise ConfigError(f"checkpoint.uri={c.uri} is not usable: {describe_storage_error(e)}") from None
    resume = str(c.resume)
    if resume == "never" and committed:
        raise ConfigError(f"checkpoint.uri={storage.uri} already holds committed steps {committed[-3:]} and "
                          "checkpoint.resume=never would save over them; use checkpoint.resume=auto to continue, "
                          "or a new checkpoint.uri (nothing was deleted)")
    if resume.isdigit():
        step = int(resume)
        if step not in committed:
            raise ConfigError(f"checkpoint.resume={step}: no committed step {step} under {storage.uri} "
                              f"(committed: {committed[-5:] or 'none'})")
        newer = [s for s in committed if s > step]
        if newer:
            raise ConfigError(f"checkpoint.resume={step} but {storage.uri} holds newer committed steps {newer[:3]} "
                              "that this run would collide with; resume into a new checkpoint.uri "
                              f"(checkpoint.resume={storage.url(step_dir(step))}) or use checkpoint.resume=auto")
    elif resume not in ("auto", "never") and not committed:
        parent, _, name = resume.rstrip("/").rpartition("/")
        if parse_step(name) is None:
            raise ConfigError(f"checkpoint.resume={resume} is not a step_<8 digits> folder")
        try:
            read_manifest(Storage(parent, storage.options), name)
        except (ManifestError, StorageError) as e:
            raise ConfigError(f"checkpoint.resume={resume}: {e}") from None
    if c.lease_ttl_s > 0:
        # wait for (or refuse) another live writer now, before the model is built; the checkpoint
        # manager then takes the lease
        WriterLease(storage, this_writer(env), c.lease_ttl_s, wait_s=c.grace_period_s).wait_for_others()
    return bandwidth
