"""The engine bundle's `manifest.json`: what was built, for which target, from what, with which libraries.

A runtime refuses a bundle whose schema, r1c release, target, file hashes, library versions or device do not
match, or whose manifest holds a field of the wrong type, with a `BundleError` that says which. Files are
hashed once, at build (sha256 of every byte); a load checks each file's size and a cheap fingerprint (sha256
of its size and FINGERPRINT_SAMPLES blocks of FINGERPRINT_BLOCK bytes at fixed, evenly spaced offsets, first
and last block included: ~1 MiB read per file whatever its size), so that a 690 GB bundle opens in
milliseconds; `verify_bundle` (`r1c verify`) re-hashes every byte. Bundles written before fingerprints
existed get the full check at load.
A bundle built from a foreign model (`r1c optimize` output) has no r1c model config (`model_config` null); its
`config_hash` is then the hash of its graph I/O description (r1c/graph_io.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import platform
import types
import typing
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

import r1c
from r1c import graph_io as gio
from r1c.config import ModelConfig
from r1c.errors import BundleError, R1CError
from r1c.jsonfile import read_json_object
from r1c.targets import SESSION_OPTIONS, WEIGHTS_MEMORY

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
TARGETS = ("onnxruntime", "tensorrt", "tensorrt-rtx")


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


def file_records(directory: Path, progress: bool = False) -> tuple[dict[str, str], dict[str, int], dict[str, str]]:
    """(sha256, size, fingerprint) of every file under `directory` (subdirectories too, e.g. a TensorRT bundle's
    kernels/), by relative path: what `r1c build` records, once. Hidden files (r1c/outdir.py's mark of a
    directory being written) are not part of a bundle. `progress`: a bar over the bytes hashed, on stderr."""
    from tqdm import tqdm

    files = {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*"))
             if p.is_file() and not p.name.startswith(".")}
    sizes = {n: p.stat().st_size for n, p in files.items()}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024, desc="build: hashing",
              leave=False, disable=not progress) as bar:
        hashes = {n: sha256_file(p, progress=bar.update) for n, p in files.items()}
    return hashes, sizes, {n: fingerprint_file(p) for n, p in files.items()}


@dataclasses.dataclass
class Manifest:
    target: str
    precision: str
    model_config: dict[str, Any] | None  # None: a foreign model
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
        """r1c's model config; BundleError for a bundle of a foreign model, which has none."""
        if self.model_config is None:
            raise BundleError("bundle: built from a foreign model, it has no r1c model config")
        try:
            return ModelConfig.from_hf_dict(self.model_config)
        except R1CError as e:
            raise BundleError(f"bundle: the manifest's model config is not valid: {e}") from None

    @property
    def is_foreign(self) -> bool:
        return self.model_config is None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    def write(self, bundle_dir: Path) -> None:
        (bundle_dir / MANIFEST_FILE).write_text(self.to_json())


def host_device() -> dict[str, Any]:
    return {"kind": "cpu", "machine": platform.machine(), "system": platform.system()}


def _allowed(annotation: Any) -> tuple[type, ...]:
    """The runtime types a field's annotation allows (dict[str, Any] -> dict; X | None -> X, NoneType)."""
    if isinstance(annotation, (types.UnionType,)) or typing.get_origin(annotation) is typing.Union:
        return tuple(t for arg in typing.get_args(annotation) for t in _allowed(arg))
    origin = typing.get_origin(annotation)
    return (origin if origin is not None else annotation,)


def _check_types(raw: dict[str, Any]) -> None:
    """Every manifest field holds the type its annotation says, and every file is a plain relative path."""
    hints = typing.get_type_hints(Manifest)
    for name, annotation in hints.items():
        if name not in raw:
            continue
        allowed = _allowed(annotation)
        value = raw[name]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise BundleError(f"bundle: manifest field {name!r} must be {names}, got {type(value).__name__} "
                              f"{json.dumps(value)[:60]}")
    for rel, digest in raw.get("files", {}).items():
        parts = PurePosixPath(rel).parts
        if not isinstance(digest, str) or not parts or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise BundleError(f"bundle: manifest lists file {rel!r} with {digest!r}; expected a relative path and "
                              "its sha256")


SESSION_COUNTS = ("intra_op_num_threads", "inter_op_num_threads")  # ONNX Runtime thread counts (0: its default)


def check_session(session: dict[str, Any], error_cls: type[R1CError], where: str) -> None:
    """The one rule for ONNX Runtime session options: every name one of `r1c.targets.SESSION_OPTIONS` (a misspelt
    option is refused, naming the closest), each of `SESSION_COUNTS` an integer >= 0 (0: ONNX Runtime picks, one
    thread per physical core), weights_memory, when present, one of `WEIGHTS_MEMORY`, and native_decode a bool.
    `r1c build` checks what it will write, `read_manifest` what a (hand-edited) manifest holds, `load` the options
    it is given, so that a bad value is refused naming its field, not by ONNX Runtime blaming the model or by
    being silently ignored. Raises `error_cls` with "`where`.FIELD must be ..." / "... is not a session option".
    """
    for name in session:
        if name not in SESSION_OPTIONS:
            close = difflib.get_close_matches(str(name).lower(), SESSION_OPTIONS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else f"; r1c reads {', '.join(SESSION_OPTIONS)}"
            raise error_cls(f"{where}.{name} is not a session option r1c knows{hint}")
    for name in SESSION_COUNTS:
        value = session.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise error_cls(f"{where}.{name} must be an integer >= 0 (0: ONNX Runtime picks), got "
                            f"{json.dumps(value, default=repr)[:60]}")
    memory = session.get("weights_memory", WEIGHTS_MEMORY[0])
    if memory not in WEIGHTS_MEMORY:
        raise error_cls(f"{where}.weights_memory must be one of {', '.join(WEIGHTS_MEMORY)}, got "
                        f"{json.dumps(memory, default=repr)[:60]}")
    if not isinstance(session.get("native_decode", True), bool):
        raise error_cls(f"{where}.native_decode must be true or false, got "
                        f"{json.dumps(session['native_decode'], default=repr)[:60]}")


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
    _check_types(raw)
    m = Manifest(**{k: v for k, v in raw.items() if k in names})
    if m.r1c_version.split("+")[0] != r1c.__version__.split("+")[0]:
        raise BundleError(f"bundle: built by r1c {m.r1c_version}, this is r1c {r1c.__version__} (rebuild it with "
                          "`r1c build`)")
    if m.target not in TARGETS:
        raise BundleError(f"bundle: unknown target {m.target!r}")
    gio.check_graph_io(m.graph_io, BundleError, "bundle: manifest")
    if m.is_foreign != gio.is_foreign(m.graph_io):
        raise BundleError("bundle: the manifest's model_config and graph_io disagree on whether the model is foreign")
    want = gio.foreign_hash(m.graph_io) if m.is_foreign else m.config.hash()
    if want != m.config_hash:
        raise BundleError("bundle: model config does not match its hash in the manifest")
    model_file = m.target_options.get("model", "")  # one-rank onnxruntime bundles; sharded ones name files per rank
    if not isinstance(model_file, str) or (model_file and model_file not in m.files) \
            or not isinstance(m.target_options.get("session", {}), dict):
        raise BundleError("bundle: target_options must name the model (one of the manifest's files) and a session "
                          "object")
    check_session(m.target_options.get("session", {}), BundleError,
                  f"bundle: {MANIFEST_FILE}: target_options.session")
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
