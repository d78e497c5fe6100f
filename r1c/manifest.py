"""The engine bundle's `manifest.json`: what was built, for which target, from what, with which libraries.

A runtime refuses a bundle whose schema, target, file hashes, library versions or device do not match,
with a `BundleError` that says which. Files are hashed once, at build (sha256 of every byte); a load checks
each file's size and a cheap fingerprint (sha256 of its size and FINGERPRINT_SAMPLES blocks of
FINGERPRINT_BLOCK bytes at fixed, evenly spaced offsets, first and last block included: ~1 MiB read per
file whatever its size), so that a 690 GB bundle opens in milliseconds; `verify_bundle` (`r1c verify`)
re-hashes every byte. Bundles written before fingerprints existed get the full check at load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import r1c
from r1c.config import ModelConfig
from r1c.errors import BundleError
from r1c.jsonfile import read_json_object

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
TARGETS = ("onnxruntime", "tensorrt")


FINGERPRINT_SAMPLES = 16
FINGERPRINT_BLOCK = 1 << 16


def sha256_file(path: Path, chunk: int = 1 << 22, progress: Callable[[int], None] | None = None) -> str:
    """sha256 of every byte of `path`; `progress(n)` is called with the bytes of each chunk read."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if progress is not None:
                progress(len(block))
    return h.hexdigest()


def fingerprint_file(path: Path) -> str:
    """sha256 of the file's size and FINGERPRINT_SAMPLES evenly spaced blocks (see the module docstring)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    last = max(size - FINGERPRINT_BLOCK, 0)
    offsets = sorted({last * i // (FINGERPRINT_SAMPLES - 1) for i in range(FINGERPRINT_SAMPLES)})
    with path.open("rb") as f:
        for offset in offsets:
            f.seek(offset)
            h.update(f.read(FINGERPRINT_BLOCK))
    return h.hexdigest()


def file_records(directory: Path) -> tuple[dict[str, str], dict[str, int], dict[str, str]]:
    """(sha256, size, fingerprint) of every file in `directory`, by name: what `r1c build` records, once."""
    files = sorted(p for p in directory.iterdir() if p.is_file())
    return ({p.name: sha256_file(p) for p in files}, {p.name: p.stat().st_size for p in files},
            {p.name: fingerprint_file(p) for p in files})


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
    file_sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # relative path -> bytes
    file_fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)  # see fingerprint_file
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
    """Load and check a bundle's manifest; every mismatch is a one-line `BundleError`.

    `verify_hashes`: check every listed file's size and fingerprint (the full sha256 when the manifest
    has no fingerprints); `verify_bundle` checks every byte.
    """
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
            size, fingerprint = m.file_sizes.get(rel), m.file_fingerprints.get(rel)
            if size is None or fingerprint is None:  # a bundle from before fingerprints: the full check
                if sha256_file(f) != digest:
                    raise BundleError(f"bundle: file {rel} does not match its sha256 in the manifest "
                                      "(corrupt or edited)")
                continue
            if f.stat().st_size != size:
                raise BundleError(f"bundle: file {rel} is {f.stat().st_size} bytes, the manifest says {size} "
                                  "(truncated or edited)")
            if fingerprint_file(f) != fingerprint:
                raise BundleError(f"bundle: file {rel} does not match its fingerprint (sha256 of sampled blocks) "
                                  "in the manifest (corrupt or edited)")
    return m


def verify_bundle(bundle_dir: str | Path, progress: bool = False) -> Manifest:
    """Re-hash every byte of every file the manifest lists against its sha256; BundleError names the first
    mismatch. `progress`: a bar over the bytes on stderr."""
    from tqdm import tqdm

    bundle = Path(bundle_dir)
    m = read_manifest(bundle, verify_hashes=False)
    paths = {rel: bundle / rel for rel in m.files}
    missing = [rel for rel, p in paths.items() if not p.is_file()]
    if missing:
        raise BundleError(f"bundle: file {missing[0]} listed in the manifest is missing")
    total = sum(p.stat().st_size for p in paths.values())
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=not progress) as bar:
        for rel, digest in m.files.items():
            if sha256_file(paths[rel], progress=bar.update) != digest:
                raise BundleError(f"bundle: file {rel} does not match its sha256 in the manifest (corrupt or edited)")
    return m
