"""``dtrain ckpt ls|verify|inspect|export|latest``: look at checkpoints without starting a job.

Works on any fsspec URI; storage options (e.g. an S3 endpoint) via ``-o endpoint_url=http://...``;
credentials from the environment, never printed.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
import sys
import time
from typing import Any, Sequence

from dtrain.checkpoint.manifest import Manifest, ManifestError, parse_step, read_manifest, verify_files
from dtrain.checkpoint.storage import Storage, StorageError
from dtrain.config.errors import ArgumentParser, ConfigError
from dtrain.config.secrets import redact_text

EXIT_BAD = 1  # a checkpoint that fails verification: a finding, not bad input
EXIT_BAD_INPUT = 2  # a bad command line, URI or path (ConfigError), as everywhere in dtrain


def _say(text: str, file=None) -> None:
    """Print with credentials masked: lines quote URIs (``s3://user:pass@host``) and config values."""
    print(redact_text(text), file=file)


def _options(pairs: Sequence[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ConfigError(f"dtrain ckpt: -o expects KEY=VALUE, got {pair!r}")
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
    return options


def _split_step(uri: str) -> tuple[str, str | None]:
    """``s3://b/run/step_00000100`` -> (``s3://b/run``, ``step_00000100``); a root URI -> (uri, None)."""
    parent, _, name = uri.rstrip("/").rpartition("/")
    return (parent, name) if parse_step(name) is not None else (uri.rstrip("/"), None)


def _open_step(args: argparse.Namespace, command: str) -> tuple[Storage, str, Manifest]:
    """The storage, step folder name and manifest of a command that works on one step."""
    root, step = _split_step(args.uri)
    if step is None:
        raise ConfigError(f"dtrain ckpt {command}: give the URI of one step folder (…/step_XXXXXXXX), not {args.uri}")
    storage = Storage(root, _options(args.option))
    return storage, step, read_manifest(storage, step)


def cmd_ls(args: argparse.Namespace) -> int:
    storage = Storage(args.uri, _options(args.option))
    rows = []
    for name in storage.listdir():
        if parse_step(name) is None:
            continue
        try:
            m = read_manifest(storage, name)
            rows.append((name, "committed", m.world_size, m.strategy, f"{m.total_bytes / 1e6:.1f} MB",
                         time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created_unix))))
        except ManifestError as e:
            rows.append((name, "INCOMPLETE", "-", "-", "-", str(e).split(": ", 1)[-1][:60]))
    if not rows:
        _say(f"no checkpoint steps under {storage.uri}")
        return 0
    print(f"{'step':<15} {'state':<11} {'world':>5} {'strategy':<9} {'size':>10}  saved")
    for row in rows:
        _say(f"{row[0]:<15} {row[1]:<11} {row[2]!s:>5} {row[3]:<9} {row[4]:>10}  {row[5]}")
    return 0


def cmd_latest(args: argparse.Namespace) -> int:
    """The newest committed step (or ``none``): what a launcher compares to see whether retries make progress.

    ``--config [overrides]`` reads ``checkpoint.uri`` from the config as the job resolves it (its run name
    comes from the job's id, e.g. ``slurm-<id>``), so a batch script need not know the resolved URI."""
    from dtrain.checkpoint.manager import committed_steps

    if args.config:
        from omegaconf import OmegaConf

        from dtrain.config.compose import compose_config

        cfg, problems = compose_config(args.target)
        if cfg is None or problems:
            _say(f"dtrain ckpt latest: {'; '.join(problems)}", file=sys.stderr)
            return EXIT_BAD
        options = OmegaConf.to_container(cfg.checkpoint.storage_options, resolve=True)
        storage = Storage(cfg.checkpoint.uri, {**options, **_options(args.option)})
    else:
        if len(args.target) != 1:
            raise SystemExit("dtrain ckpt latest: give one URI, or --config [overrides...]")
        storage = Storage(args.target[0], _options(args.option))
    steps = committed_steps(storage)
    print(steps[-1] if steps else "none")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    root, step = _split_step(args.uri)
    storage = Storage(root, _options(args.option))
    names = [step] if step else [n for n in storage.listdir() if parse_step(n) is not None]
    if not names:
        raise ConfigError(f"dtrain ckpt verify: no checkpoint steps under {storage.uri}")
    failed = 0
    for name in names:
        try:
            manifest = read_manifest(storage, name)
            problems = verify_files(storage, name, manifest.files, checksums=not args.sizes_only)
        except ManifestError as e:
            problems = [str(e)]
        if problems:
            failed += 1
            _say(f"FAIL {storage.url(name)}: " + "; ".join(problems))
        else:
            _say(f"OK   {storage.url(name)} ({len(manifest.files)} files, {manifest.total_bytes / 1e6:.1f} MB, "
                  f"{'sizes' if args.sizes_only else 'sizes and CRC32C'} verified)")
    return EXIT_BAD if failed else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    storage, step, manifest = _open_step(args, "inspect")
    _say(storage.url(step))
    print(f"  step {manifest.step} | world size {manifest.world_size} | strategy {manifest.strategy} | "
          f"config hash {manifest.config_hash} | saved in {manifest.save_seconds:.2f} s | "
          f"{manifest.total_bytes / 1e6:.1f} MB")
    for entry in manifest.files:
        print(f"  {entry['size']:>14,d}  {entry['crc32c']}  {entry['path']}")
    trainer_state = json.loads(storage.read_bytes(posixpath.join(step, "trainer_state.json")))
    print(f"  data position: global sample {trainer_state['loader']['next_sample']} | lr "
          f"{trainer_state['scheduler'].get('_last_lr')}")
    if args.overrides is not None:
        from dtrain.config.compose import diff_keys
        from dtrain.config.secrets import redacted_container
        from dtrain.config.validate import load_config

        saved = OmegaConf.create(storage.read_bytes(posixpath.join(step, "config.yaml")).decode())
        # the saved config is redacted; redact the current one too, so a current secret is never printed
        current = OmegaConf.create(redacted_container(load_config(args.overrides, manifest.world_size)))
        ignored = ("run.", "checkpoint.", "logging.", "launcher.")  # how a run is stored or launched
        differing = [k for k in diff_keys(saved, current) if not k.startswith(ignored)]
        _say(f"  config diff against `{' '.join(args.overrides)}` ({len(differing)} keys):")
        for key in differing:
            _say(f"    {key}: {OmegaConf.select(saved, key)} (checkpoint) -> {OmegaConf.select(current, key)}")
    return 0


def load_model_weights(storage: Storage, step: str) -> dict[str, Any]:
    """Full (unsharded) model tensors of one step, in one process, with no process group."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from dtrain.checkpoint.dcp_io import FsspecReader

    metadata = FsspecReader(storage.url(step), **storage.options).read_metadata()
    weights = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in metadata.state_dict_metadata.items()
               if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    state = {"model": weights}
    dcp.load(state, storage_reader=FsspecReader(storage.url(step), **storage.options), no_dist=True)
    return state["model"]


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise ConfigError(f"dtrain ckpt export: the output folder {folder} does not exist")
    storage, step, manifest = _open_step(args, "export")
    problems = verify_files(storage, step, manifest.files, checksums=True)
    if problems:
        _say(f"refusing to export {storage.url(step)}: " + "; ".join(problems), file=sys.stderr)
        return EXIT_BAD
    weights = {k: v.detach().contiguous().clone() for k, v in load_model_weights(storage, step).items()
               if isinstance(v, torch.Tensor)}
    fmt = args.format or ("safetensors" if args.out.endswith(".safetensors") else "torch")
    metadata = {"dtrain_step": str(manifest.step), "dtrain_config_hash": manifest.config_hash}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(weights, args.out, metadata=metadata)
    else:
        torch.save({"model": weights, "metadata": metadata}, args.out)
    total = sum(t.numel() for t in weights.values())
    print(f"exported {len(weights)} tensors ({total / 1e6:.2f}M parameters) of step {manifest.step} to {args.out} "
          f"({fmt})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="dtrain ckpt", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("uri")
        p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                       help="fsspec storage option, e.g. endpoint_url=http://127.0.0.1:9000")
        return p

    add("ls", "list steps and whether each is committed").set_defaults(fn=cmd_ls)
    verify = add("verify", "check sizes and CRC32C checksums of one step or all steps")
    verify.add_argument("--sizes-only", action="store_true", help="skip checksums (fast)")
    verify.set_defaults(fn=cmd_verify)
    inspect = add("inspect", "manifest, files, data position; config diff against overrides")
    inspect.add_argument("overrides", nargs="*", default=None,
                         help="hydra overrides of the config to compare with (e.g. model=gpt_small)")
    inspect.set_defaults(fn=cmd_inspect)
    export = add("export", "write the model weights of one step as one consolidated file")
    export.add_argument("out", help="output file (.safetensors or .pt)")
    export.add_argument("--format", choices=("safetensors", "torch"), default=None)
    export.set_defaults(fn=cmd_export)
    latest = sub.add_parser("latest", help="print the newest committed step (or none)")
    latest.add_argument("target", nargs="*", help="a checkpoint URI, or with --config the overrides of a config")
    latest.add_argument("--config", action="store_true", help="take checkpoint.uri from the config")
    latest.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE")
    latest.set_defaults(fn=cmd_latest)
    return parser


def main(argv: Sequence[str]) -> int:
    try:
        args = build_parser().parse_args(list(argv))
        if getattr(args, "overrides", None) == []:
            args.overrides = None
        return args.fn(args)
    except ConfigError as e:
        _say(e.render(), file=sys.stderr)
        return EXIT_BAD_INPUT
    except (StorageError, ManifestError) as e:
        _say(f"dtrain: ckpt: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except FileNotFoundError as e:
        _say(f"dtrain: ckpt: not found: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
