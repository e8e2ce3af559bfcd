"""The commit record of one checkpoint step: ``step_<8 digits>/manifest.json``, written last, by one rank.

A step folder without a valid manifest does not exist for resume. The manifest lists every file with
its size and CRC32C checksum, so a truncated or corrupted shard is found before anything is loaded.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from dtrain.checkpoint.dcp_io import checksum_of_stream
from dtrain.checkpoint.storage import Storage

FORMAT = "dtrain-checkpoint/1"
MANIFEST = "manifest.json"
STEP_PATTERN = re.compile(r"^step_(\d{8})$")


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    match = STEP_PATTERN.match(name)
    return int(match.group(1)) if match else None


class ManifestError(ValueError):
    """A step is not a usable checkpoint; the message says what is wrong with it."""


@dataclass
class Manifest:
    step: int
    world_size: int
    strategy: str
    config_hash: str
    files: list[dict[str, Any]]
    save_seconds: float = 0.0
    created_unix: float = 0.0
    writer: str = ""  # the launch that committed it (see dtrain.checkpoint.lease)
    lineage: str = ""  # one id for a run and every run that resumed from it: retention counts only these
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files)

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        try:
            raw = json.loads(data)
            manifest = cls(**raw)
        except (ValueError, TypeError) as e:
            raise ManifestError(f"{where}/{MANIFEST} is unreadable ({e}); the save was interrupted") from None
        if manifest.format != FORMAT:
            raise ManifestError(f"{where}/{MANIFEST} has format {manifest.format!r}, this dtrain reads {FORMAT!r}")
        for entry in manifest.files:
            check_relative_path(entry.get("path", ""), where)
        return manifest


def check_relative_path(path: str, where: str) -> None:
    """Manifest paths must stay inside the step folder: no absolute paths, no '..', no backslashes."""
    if (not path or path.startswith(("/", "\\")) or "\\" in path or re.match(r"^[a-zA-Z]+:", path)
            or posixpath.normpath(path) != path or path.split("/")[0] == ".."):
        raise ManifestError(f"{where}/{MANIFEST} lists an unsafe path {path!r}; refusing to use this checkpoint")


def read_manifest(storage: Storage, step_name: str) -> Manifest:
    if not storage.exists(posixpath.join(step_name, MANIFEST)):
        raise ManifestError(f"{storage.url(step_name)} has no {MANIFEST}: it was never committed "
                            "(an interrupted save)")
    manifest = Manifest.from_json(storage.read_bytes(posixpath.join(step_name, MANIFEST)), storage.url(step_name))
    if step_dir(manifest.step) != step_name:
        raise ManifestError(f"{storage.url(step_name)}/{MANIFEST} describes step {manifest.step}, not this folder")
    return manifest


def verify_files(storage: Storage, step_name: str, files: list[dict[str, Any]], checksums: bool) -> list[str]:
    """Problems with the given manifest entries: missing, wrong size, or (optionally) wrong checksum."""
    problems = []
    for entry in files:
        relative = posixpath.join(step_name, entry["path"])
        if not storage.exists(relative):
            problems.append(f"{entry['path']} is missing")
            continue
        size = storage.size(relative)
        if size != entry["size"]:
            problems.append(f"{entry['path']} has {size} bytes, the manifest says {entry['size']} (truncated?)")
            continue
        if checksums:
            with storage.open(relative, "rb") as stream:
                _, digest = checksum_of_stream(stream)
            if digest != entry["crc32c"]:
                problems.append(f"{entry['path']} fails its CRC32C check (corrupted)")
    return problems
