"""Compose the config with Hydra's Compose API: no output-dir side effects, no cwd change, per process.

Why not ``@hydra.main``: under torchrun each rank would resolve ``${now:}`` itself and create its
own output folder (Hydra #2070). Here every rank composes the same files with the same overrides,
the run name comes from a resolver that only uses ids the whole job shares, and the trainer checks
a hash of the resolved config across ranks once the process group exists.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Sequence

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dtrain.config.errors import ConfigError
from dtrain.config.schema import register_schemas
from dtrain.config.secrets import redact_override, redacted_container, redacted_yaml
from dtrain.distributed.env import discover_env, run_id


def config_dir() -> Path:
    """``configs/`` of a source checkout (editable install) or ``dtrain/configs`` inside a wheel."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return candidate
    raise ConfigError(f"cannot find the dtrain configs folder next to {here}; reinstall dtrain")


def group_options(group: str) -> list[str]:
    """Names a user can pick for a config group (the YAML files of ``configs/<group>/``)."""
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def _run_name() -> str:
    shared = run_id()
    if shared is not None:
        return shared
    env = discover_env()
    if env.world_size > 1:
        raise ConfigError(f"the {env.source} launcher gives the {env.world_size} ranks no shared job id, so they "
                          "cannot agree on a run directory; pass run.name=NAME (or run.dir=PATH)")
    return time.strftime("local-%Y%m%d-%H%M%S")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("dtrain_run_name"):
        # use_cache: resolve once per process, so run.dir and everything derived from it agree
        OmegaConf.register_new_resolver("dtrain_run_name", _run_name, use_cache=True)


def _unknown_group_choice(message: str) -> str | None:
    """Turn Hydra's 'Could not find model/foo' into a one-liner that lists the valid names."""
    marker = "Could not find '"
    if marker not in message:
        return None
    path = message.split(marker, 1)[1].split("'", 1)[0]
    group, _, choice = path.rpartition("/")
    if not group:
        return None
    valid = ", ".join(o for o in group_options(group) if not o.endswith("_schema"))
    return f"unknown {group} '{choice}'; choose one of: {valid} (e.g. {group}={valid.split(', ')[0]})"


def _one_line(error: BaseException) -> str:
    """Hydra wraps the useful part (e.g. "could not be converted to Integer") in ``__cause__``."""
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    cause = error.__cause__
    if cause is not None and str(cause).strip():
        text = f"{text.rstrip('.')}: {str(cause).strip().splitlines()[0]}"
    return text.replace("\n", " ")


def _compose_once(overrides: list[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        OmegaConf.resolve(cfg)
        return cfg
    finally:
        GlobalHydra.instance().clear()


def compose_config(overrides: Sequence[str]) -> tuple[DictConfig | None, list[str]]:
    """Compose and resolve the config, collecting problems instead of stopping at the first.

    An unknown group choice (``model=foo``) is reported and that override dropped, so the rest of
    the config is still composed and validated in the same run.
    """
    register_schemas()
    _register_resolvers()
    remaining, problems = list(overrides), []
    while True:
        try:
            return _compose_once(remaining), problems
        except ConfigError as e:
            return None, problems + e.problems
        except (HydraException, OmegaConfBaseException, ValueError) as e:
            friendly = _unknown_group_choice(str(e))
            if friendly is None:
                return None, problems + [f"invalid config: {_one_line(e)}"]
            problems.append(friendly)
            group = friendly.split()[1]
            kept = [o for o in remaining if o.split("=", 1)[0].lstrip("+~") != group]
            if kept == remaining:
                return None, problems
            remaining = kept


def config_hash(cfg: DictConfig) -> str:
    """Short hash of the resolved config; equal on every rank of a healthy job.

    Computed over the redacted config: the hash is printed, stored in every manifest and exported
    with the weights, so it must not be a fingerprint of a credential (a short hash of a config that
    differs from a known one only in a password lets anyone test guesses offline). The cost: ranks
    that differ only in a credential pass the rank check.
    """
    text = OmegaConf.to_yaml(OmegaConf.create(redacted_container(cfg)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def diff_keys(a: DictConfig, b: DictConfig) -> list[str]:
    """Dotted keys whose resolved values differ between two configs (for rank-mismatch errors)."""
    flat_a = _flatten(OmegaConf.to_container(a, resolve=True))
    flat_b = _flatten(OmegaConf.to_container(b, resolve=True))
    return sorted(k for k in flat_a.keys() | flat_b.keys() if flat_a.get(k) != flat_b.get(k))


def _flatten(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): node}


def write_resolved(cfg: DictConfig, run_dir: str, overrides: Sequence[str]) -> None:
    """Keep what was run next to its results: the resolved config (credentials redacted) and the overrides."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(redacted_yaml(cfg))
    (path / "overrides.txt").write_text("".join(redact_override(o) + "\n" for o in overrides))
