"""The r1c kernel library: the kernels a bundle's plugins launch, compiled ahead of time to cubins for one compute
capability at `r1c build`, stored in the bundle, and launched at run time through the CUDA driver (no Triton, no
JIT, no compiler on the serving machine).

Layout: `<bundle>/kernels/index.json` + one `<key>.cubin` per kernel. index.json:
    {"format": 1, "compute_capability": "9.0", "triton": "3.9.0",
     "kernels": {key: {"name", "function", "cubin", "sha256", "num_warps", "shared", "params", "args"}}}
`key` is `KernelSpec.key` (a hash of the kernel's source, argument types, constexprs, hints and options), so a
library built from other kernel sources cannot be used by mistake; `params` are the PTX types of the function's
parameters (read back from the PTX: Triton appends scratch-pointer parameters after the kernel's own `args`,
launched as NULL since r1c kernels use no global scratch).

`DriverRunner` runs a launch plan (`r1c.plugins.launch.Plan`) from a library: `prepare(plan)` resolves every launch
to a loaded function and a parameter template (done when shapes change), `run(prepared, inputs, outputs,
workspace, stream)` fills in the device pointers and launches (the plugins' enqueue). A kernel missing from the
library is a BundleError naming it, never a fallback.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from r1c.errors import BuildError, BundleError
from r1c.plugins._triton import KernelSpec
from r1c.plugins.launch import Buf, Plan

logger = logging.getLogger(__name__)

LIBRARY_DIR = "kernels"
INDEX_FILE = "index.json"
FORMAT = 1
_CTYPES = {"u64": ctypes.c_uint64, "b64": ctypes.c_uint64, "s64": ctypes.c_int64, "u32": ctypes.c_uint32,
           "b32": ctypes.c_uint32, "s32": ctypes.c_int32, "f32": ctypes.c_float, "f64": ctypes.c_double}


def _capability(cc: str | int | tuple[int, int]) -> int:
    if isinstance(cc, tuple):
        return cc[0] * 10 + cc[1]
    text = str(cc).lower().removeprefix("sm").lstrip("_")
    if "." in text:
        major, minor = text.split(".", 1)
        return int(major) * 10 + int(minor)
    return int(text)


def build_library(specs: Iterable[KernelSpec], out_dir: str | Path, compute_capability: str | int | tuple[int, int],
                  *, progress: bool = False, index_name: str = INDEX_FILE) -> dict[str, Any]:
    """Compile every distinct spec for `compute_capability` into `out_dir` (cubins + `index_name`); returns the index.

    Several processes may compile parts of one library into one directory, each with its own `index_name`
    (`merge_indexes` joins them). Raises BuildError when a kernel does not compile or needs global scratch memory.
    """
    import triton

    from r1c.plugins._triton import compile_aot, ptx_params

    cap = _capability(compute_capability)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unique = {s.key: s for s in specs}
    kernels: dict[str, Any] = {}
    items = sorted(unique.items())
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=f"kernels for sm_{cap}", unit="kernel", leave=False)
    for key, spec in items:
        try:
            compiled = compile_aot(spec, cap)
        except Exception as e:
            raise BuildError(f"build: kernel {spec.name} does not compile for sm_{cap}: {type(e).__name__}: "
                             f"{str(e)[-800:]}") from e
        md = compiled.metadata
        function, params = ptx_params(compiled.asm["ptx"])
        n_args = len(spec.arg_names())
        scratch = [int(getattr(md, f, 0) or 0) for f in ("global_scratch_size", "profile_scratch_size")]
        if any(scratch) or any(p not in ("u64", "b64") for p in params[n_args:]):
            raise BuildError(f"build: kernel {spec.name} needs scratch memory or has unexpected parameters "
                             f"({params[n_args:]}, scratch {scratch}); the kernel library cannot launch it")
        cubin = compiled.asm["cubin"]
        (out / f"{key}.cubin").write_bytes(cubin)
        kernels[key] = {
            "name": spec.name,
            "function": function,
            "cubin": f"{key}.cubin",
            "sha256": hashlib.sha256(cubin).hexdigest(),
            "num_warps": spec.num_warps,
            "shared": int(md.shared),
            "params": params,
            "args": n_args,
        }
    index = {"format": FORMAT, "compute_capability": f"{cap // 10}.{cap % 10}", "triton": triton.__version__,
             "kernels": kernels}
    (out / index_name).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    logger.info("compiled %d kernels for sm_%d into %s", len(kernels), cap, out)
    return index


def merge_indexes(out_dir: str | Path, parts: Iterable[str]) -> dict[str, Any]:
    """Join the part indexes (`build_library(..., index_name=part)`) of `out_dir` into its index.json."""
    out = Path(out_dir)
    merged: dict[str, Any] = {}
    for part in parts:
        index = json.loads((out / part).read_text())
        if merged and (index["compute_capability"], index["triton"]) != (merged["compute_capability"],
                                                                          merged["triton"]):
            raise BuildError(f"build: kernel library parts of {out} were built for different targets")
        kernels = {**merged.get("kernels", {}), **index["kernels"]}
        merged = {**index, "kernels": kernels}
        (out / part).unlink()
    (out / INDEX_FILE).write_text(json.dumps(merged, indent=1, sort_keys=True) + "\n")
    return merged


class KernelLibrary:
    """A kernel library read from disk: index and cubins (checked against their sha256)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        path = self.directory / INDEX_FILE
        if not path.is_file():
            raise BundleError(f"kernels: no kernel library at {self.directory} (missing {INDEX_FILE}); rebuild the "
                              "bundle with `r1c build`")
        try:
            index = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise BundleError(f"kernels: {path} is not valid JSON ({e})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise BundleError(f"kernels: {path} has format {index.get('format') if isinstance(index, dict) else '?'}"
                              f", this r1c reads {FORMAT}")
        self.compute_capability: str = index["compute_capability"]
        self.triton: str = index.get("triton", "")
        self.entries: dict[str, dict[str, Any]] = index["kernels"]

    def entry(self, spec: KernelSpec) -> dict[str, Any]:
        found = self.entries.get(spec.key)
        if found is None:
            raise BundleError(f"kernels: the bundle's kernel library has no kernel {spec.key} ({spec.name} with "
                              f"{spec.constexprs}); it was built for other shapes or by another r1c: rebuild it")
        return found

    def cubin(self, spec: KernelSpec) -> bytes:
        e = self.entry(spec)
        data = (self.directory / e["cubin"]).read_bytes()
        if hashlib.sha256(data).hexdigest() != e["sha256"]:
            raise BundleError(f"kernels: {e['cubin']} does not match its sha256 (corrupt or edited)")
        return data


@dataclasses.dataclass(frozen=True)
class PreparedLaunch:
    function: Any
    grid: tuple[int, int, int]
    block: int
    shared: int
    template: tuple[tuple[Any, Buf | int | float], ...]  # (ctypes type, value or buffer) per parameter


@dataclasses.dataclass(frozen=True)
class PreparedPlan:
    launches: tuple[PreparedLaunch, ...]
    offsets: tuple[int, ...]  # byte offset of each workspace region


def parameter_template(entry: dict[str, Any], args: Sequence[Buf | int | float]) -> tuple[tuple[Any, Any], ...]:
    """(ctypes type, value) of every kernel parameter: the launch's arguments, then NULL scratch pointers."""
    params = entry["params"]
    if len(args) != entry["args"] or len(params) < len(args):
        raise BundleError(f"kernels: {entry['name']} takes {entry['args']} arguments, the plan gives {len(args)}")
    out: list[tuple[Any, Any]] = []
    for i, ptype in enumerate(params):
        ctype = _CTYPES.get(ptype)
        if ctype is None:
            raise BundleError(f"kernels: {entry['name']}: parameter {i} has PTX type {ptype}")
        out.append((ctype, args[i] if i < len(args) else 0))
    return tuple(out)


class DriverRunner:
    """Runs launch plans from a `KernelLibrary` through the CUDA driver (`r1c.plugins.cuda_driver`)."""

    def __init__(self, library: KernelLibrary, driver: Any = None) -> None:
        self.library = library
        self._driver = driver
        self._functions: dict[str, Any] = {}

    @property
    def driver(self) -> Any:
        if self._driver is None:
            from r1c.plugins.cuda_driver import CudaDriver

            self._driver = CudaDriver()
        return self._driver

    def prepare(self, plan: Plan) -> PreparedPlan:
        """Load the plan's kernels (once each) and build each launch's parameter template."""
        launches = []
        for la in plan.launches:
            entry = self.library.entry(la.spec)
            key = la.spec.key
            if key not in self._functions:
                self._functions[key] = self.driver.load_function(self.library.cubin(la.spec), entry["function"],
                                                                 entry["shared"])
            launches.append(PreparedLaunch(self._functions[key], la.grid, 32 * entry["num_warps"], entry["shared"],
                                           parameter_template(entry, la.args)))
        return PreparedPlan(tuple(launches), tuple(r.offset for r in plan.regions))

    def run(self, prepared: PreparedPlan, inputs: Sequence[int], outputs: Sequence[int], workspace: int,
            stream: int) -> None:
        """Launch the prepared plan on `stream` with these device pointers (no allocation, no synchronization)."""
        self.driver.make_current()
        for la in prepared.launches:
            values = [ctype(resolve(v, inputs, outputs, workspace, prepared.offsets)) for ctype, v in la.template]
            params = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
                                                      for v in values])
            self.driver.launch(la.function, la.grid, la.block, la.shared, stream, params)


def resolve(value: Buf | int | float, inputs: Sequence[int], outputs: Sequence[int], workspace: int,
            offsets: Sequence[int]) -> int | float:
    """A parameter's value: a buffer's device address, or the number itself."""
    if not isinstance(value, Buf):
        return value
    if value.kind == "in":
        return int(inputs[value.index])
    if value.kind == "out":
        return int(outputs[value.index])
    return int(workspace) + offsets[value.index]
