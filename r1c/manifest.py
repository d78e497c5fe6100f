"""The engine bundle's `manifest.json`: what was built, for which target, from what, with which libraries.

A runtime refuses a bundle whose schema, target, file hashes, library versions or device do not match,
with a `BundleError` that says which.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import r1c
from r1c.config import ModelConfig
from r1c.errors import BundleError
from r1c.jsonfile import read_json_object

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
TARGETS = ("onnxruntime", "tensorrt", "tensorrt-rtx")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class Manifest:
    target: str
    precision: str
    model_config: dict[str, Any]
    config_hash: str
    graph_io: dict[str, Any]
    files: dict[str, str]  # relative path -> sha256
    libraries: dict[str, str]  # name -> version the bundle was built with
    device: dict[str, Any]
    target_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    optimization_profiles: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    r1c_version: str = r1c.__version__

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_hf_dict(self.model_config)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, bundle_dir: Path) -> None:
        (bundle_dir / MANIFEST_FILE).write_text(self.to_json())


def host_device() -> dict[str, Any]:
    return {"kind": "cpu", "machine": platform.machine(), "system": platform.system()}


def read_manifest(bundle_dir: str | Path, *, verify_hashes: bool = True) -> Manifest:
    """Load and check a bundle's manifest; every mismatch is a one-line `BundleError`."""
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"bundle: {bundle} is not a directory")
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"bundle: {bundle} has no {MANIFEST_FILE} (was it built with `r1c build`?)")
    raw = read_json_object(path, BundleError, "bundle")
    schema = raw.get("schema_version")
    if schema != SCHEMA_VERSION:
        raise BundleError(f"bundle: manifest schema {schema} is not supported (this r1c reads {SCHEMA_VERSION})")
    names = {f.name for f in dataclasses.fields(Manifest)}
    missing = [f.name for f in dataclasses.fields(Manifest)
               if f.name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise BundleError(f"bundle: manifest lacks {', '.join(missing)}")
    m = Manifest(**{k: v for k, v in raw.items() if k in names})
    if m.target not in TARGETS:
        raise BundleError(f"bundle: unknown target {m.target!r}")
    if m.config.hash() != m.config_hash:
        raise BundleError("bundle: model config does not match its hash in the manifest")
    if verify_hashes:
        for rel, digest in m.files.items():
            f = bundle / rel
            if not f.is_file():
                raise BundleError(f"bundle: file {rel} listed in the manifest is missing")
            if sha256_file(f) != digest:
                raise BundleError(f"bundle: file {rel} does not match its sha256 in the manifest (corrupt or edited)")
    return m
