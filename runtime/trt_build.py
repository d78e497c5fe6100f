"""Build a TensorRT engine from the lowered r1c model, with the r1c ops bound to the r1c plugins.

`build_tensorrt(work_dir, config)` is what `r1c build --target tensorrt` calls: it parses
work_dir/model.onnx (weights as external data), requires every `r1c` node to have become a plugin layer,
sets one optimization profile over batch, new tokens and cache capacity, and writes work_dir/model.engine.

`check_with_tensorrt_rtx(model_path, config)` parses and builds the same model with TensorRT for RTX, whose
builder runs without a GPU when given an explicit compute capability: proof, on any machine, that what r1c
feeds TensorRT imports with every r1c op as a plugin and builds. Its ONNX parser dlopen()s
`libtensorrt_rtx.so`, which the wheel ships only as `libtensorrt_rtx.so.1` (and aborts the process when the
name is missing), so unless that name is already reachable the check runs in a child process whose
LD_LIBRARY_PATH holds a temporary directory with the symlink (the loader reads LD_LIBRARY_PATH only at
process start). Nothing is written into site-packages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from r1c.config import ModelConfig
from r1c.errors import BuildError

logger = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
MODEL_FILE = "model.onnx"
RTX_MODULE = "tensorrt_rtx_bindings"
RTX_LIBS_MODULE = "tensorrt_rtx_libs"
RTX_LIBRARY = "libtensorrt_rtx.so"
DEFAULT_RTX_COMPUTE_CAPABILITY = "SM89"  # Ada: the oldest architecture with FP8
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)
FLOAT8E4M3FN = 17  # onnx.TensorProto.FLOAT8E4M3FN

# Optimization profile: every dimension runs from 1 up to max_*; TensorRT tunes for opt_* (default: decode,
# one new token per row at full batch and capacity). None means "derived from the model config".
PROFILE_OPTIONS: dict[str, int | None] = {
    "max_batch": 8,
    "max_seq": None,  # min(1024, max_position_embeddings)
    "max_capacity": None,  # min(4096, max_position_embeddings)
    "opt_batch": None,  # max_batch
    "opt_seq": 1,
    "opt_capacity": None,  # max_capacity
}
BUILD_OPTIONS = {"keep_onnx": False}


# ---- TensorRT modules ----------------------------------------------------------------------------------------
def import_tensorrt() -> types.ModuleType:
    """The full TensorRT Python module, or a BuildError that says what to do."""
    try:
        import tensorrt
    except ImportError as e:
        raise BuildError(f"TensorRT is not installed: `import tensorrt` failed ({e}); install TensorRT 10.x for "
                         "Hopper (pip install tensorrt-cu12), or use --target onnxruntime") from None
    return tensorrt


def import_tensorrt_rtx() -> types.ModuleType:
    """TensorRT for RTX's Python module (`pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings`)."""
    try:
        import tensorrt_rtx_bindings
    except ImportError as e:
        raise BuildError(f"TensorRT for RTX is not installed: `import {RTX_MODULE}` failed ({e}); "
                         "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings") from None
    return tensorrt_rtx_bindings


def rtx_library_dir() -> Path:
    """The directory of the TensorRT-RTX wheel's shared libraries (libtensorrt_rtx.so.1, the ONNX parser)."""
    import importlib.util

    spec = importlib.util.find_spec(RTX_LIBS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise BuildError(f"TensorRT for RTX's libraries are not installed (no module {RTX_LIBS_MODULE}): "
                         "pip install tensorrt-rtx-cu13-libs")
    return Path(next(iter(spec.submodule_search_locations)))


def _rtx_parser_library_reachable(lib_dir: Path) -> bool:
    """Whether dlopen("libtensorrt_rtx.so") can succeed in this process (beside the parser or on LD_LIBRARY_PATH)."""
    dirs = [lib_dir, *(Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p)]
    return any((d / RTX_LIBRARY).exists() for d in dirs)


def link_rtx_library(lib_dir: Path, into: Path) -> None:
    """Symlink the RTX libraries into `into` under the names the ONNX parser dlopen()s."""
    for real in sorted(lib_dir.glob("libtensorrt_rtx.so.*")):
        for name in (real.name, RTX_LIBRARY):
            link = into / name
            if not link.exists():
                link.symlink_to(real)


def make_logger(trt: types.ModuleType) -> Any:
    """A TensorRT ILogger that forwards to Python logging and keeps the error messages (for BuildError)."""

    def __init__(self: Any) -> None:
        trt.ILogger.__init__(self)
        self.errors = []

    def log(self: Any, severity: Any, msg: str) -> None:
        if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
            self.errors.append(msg)
            logger.error("TensorRT: %s", msg)
        elif severity == trt.ILogger.Severity.WARNING:
            logger.info("TensorRT warning: %s", msg)  # advisory (e.g. int64 bindings); shown with -v
        else:
            logger.debug("TensorRT: %s", msg)

    cls = type("R1CTensorRTLogger", (trt.ILogger,), {"__init__": __init__, "log": log})
    return cls()


def module_version(trt: types.ModuleType) -> str:
    return str(trt.__version__)


def library_key(trt: types.ModuleType) -> str:
    """The manifest's `libraries` key for this TensorRT module."""
    return "tensorrt_rtx" if trt.__name__.startswith("tensorrt_rtx") else "tensorrt"


# ---- the model ---------------------------------------------------------------------------------------------------
def r1c_plugin_specs() -> dict[str, Any]:
    from r1c.plugins.tensorrt_common import plugin_ops

    return {op.spec.name: op.spec for op in plugin_ops()}


def drop_function_bodies(model_path: Path) -> list[str]:
    """Remove the model-local function bodies of the r1c plugin ops from `model_path` (in place); returns them.

    Parsers before TensorRT 10.15 inline a local function instead of looking for a plugin; without the
    bodies every parser version binds the plugin. The `tensorrt` lowering already drops them; this is the
    same step for a model that still has them. External data files are untouched.
    """
    import onnx

    from r1c.plugins import R1C_DOMAIN

    model = onnx.load(str(model_path), load_external_data=False)
    names = set(r1c_plugin_specs())
    keep = [f for f in model.functions if not (f.domain == R1C_DOMAIN and f.name in names)]
    dropped = sorted(f"{f.domain}::{f.name}" for f in model.functions if f not in keep)
    if dropped:
        del model.functions[:]
        model.functions.extend(keep)
        tmp = model_path.with_name(model_path.name + ".partial")
        onnx.save(model, str(tmp))
        tmp.replace(model_path)
        logger.info("dropped the function bodies of %s from %s", ", ".join(dropped), model_path)
    return dropped


def _model_facts(model_path: Path) -> tuple[list[tuple[str, str]], int, bool]:
    """(the r1c nodes as (name, op type), the number of graph nodes, whether any initializer is FP8)."""
    import onnx

    from r1c.plugins import R1C_DOMAIN

    model = onnx.load(str(model_path), load_external_data=False)
    r1c_nodes = [(n.name, n.op_type) for n in model.graph.node if n.domain == R1C_DOMAIN]
    fp8 = any(t.data_type == FLOAT8E4M3FN for t in model.graph.initializer)
    return r1c_nodes, len(model.graph.node), fp8


def profile_shapes(config: ModelConfig, input_names: list[str], options: dict[str, Any] | None = None
                   ) -> dict[str, dict[str, list[int]]]:
    """The optimization profile: input name -> {"min", "opt", "max"} shapes.

    input_ids [batch, seq]; past_lengths [batch]; past_c.{l} [batch, kv_lora_rank, capacity];
    past_pe.{l} [batch, qk_rope_head_dim, capacity]. Capacity 1 is the "no cache" call (`Engine.forward`).
    """
    opts = {**PROFILE_OPTIONS, **(options or {})}
    unknown = set(opts) - set(PROFILE_OPTIONS)
    if unknown:
        raise BuildError(f"build: unknown TensorRT profile options {sorted(unknown)} "
                         f"(known: {sorted(PROFILE_OPTIONS)})")
    mpe = config.max_position_embeddings
    max_batch = int(opts["max_batch"] or 1)
    max_seq = int(opts["max_seq"] or min(1024, mpe))
    max_cap = int(opts["max_capacity"] or min(4096, mpe))
    opt_batch = int(opts["opt_batch"] or max_batch)
    opt_seq = int(opts["opt_seq"] or 1)
    opt_cap = int(opts["opt_capacity"] or max_cap)
    for name, v, top in (("batch", opt_batch, max_batch), ("seq", opt_seq, max_seq), ("capacity", opt_cap, max_cap)):
        if not 1 <= v <= top:
            raise BuildError(f"build: TensorRT profile needs 1 <= opt_{name} ({v}) <= max_{name} ({top})")
    if max_seq > mpe or max_cap > mpe:
        raise BuildError(f"build: max_seq ({max_seq}) and max_capacity ({max_cap}) must not exceed the model's "
                         f"max_position_embeddings ({mpe})")

    def dims(batch: int, seq: int, cap: int) -> dict[str, list[int]]:
        d = {"input_ids": [batch, seq], "past_lengths": [batch]}
        for layer in range(config.num_hidden_layers):
            d[f"past_c.{layer}"] = [batch, config.kv_lora_rank, cap]
            d[f"past_pe.{layer}"] = [batch, config.qk_rope_head_dim, cap]
        return d

    low, opt, high = dims(1, 1, 1), dims(opt_batch, opt_seq, opt_cap), dims(max_batch, max_seq, max_cap)
    missing = [n for n in input_names if n not in low]
    if missing:
        raise BuildError(f"build: no optimization profile rule for graph inputs {missing}")
    return {n: {"min": low[n], "opt": opt[n], "max": high[n]} for n in input_names}


def parse_compute_capability(value: str | int | tuple[int, int]) -> tuple[int, int]:
    """(major, minor) from "SM89", "sm_89", "8.9", 89 or (8, 9)."""
    if isinstance(value, tuple):
        return int(value[0]), int(value[1])
    text = str(value).strip().lower().removeprefix("sm").lstrip("_")
    try:
        if "." in text:
            major, minor = text.split(".", 1)
            return int(major), int(minor)
        n = int(text)
    except ValueError:
        raise BuildError(f"build: cannot read compute capability {value!r} (write e.g. SM89 or 8.9)") from None
    return n // 10, n % 10


# ---- parse, check, build -------------------------------------------------------------------------------------
@dataclasses.dataclass
class NetworkReport:
    """What TensorRT made of the model: layers, the r1c plugin layers and the network's I/O."""

    tensorrt: str  # module and version, e.g. "tensorrt_rtx_bindings 1.7.1.116"
    onnx_nodes: int
    layers: int
    plugin_layers: list[dict[str, Any]]  # name, plugin id, output shapes and dtypes
    inputs: dict[str, dict[str, Any]]  # name -> {"shape", "dtype"} (-1: dynamic)
    outputs: dict[str, dict[str, Any]]
    dropped_function_bodies: list[str]
    compute_capability: str | None = None
    fp8: bool = False
    profile: dict[str, dict[str, list[int]]] = dataclasses.field(default_factory=dict)
    engine_bytes: int | None = None
    parse_seconds: float = 0.0
    build_seconds: float | None = None
    build_error: str | None = None


class _Parsed:
    def __init__(self, trt: types.ModuleType, model_path: Path, strongly_typed: bool) -> None:
        self.trt = trt
        self.logger = make_logger(trt)
        self.builder = trt.Builder(self.logger)
        if self.builder is None:
            raise BuildError(f"build: could not create a TensorRT builder: {'; '.join(self.logger.errors)}")
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        self.network = self.builder.create_network(flags)
        self.parser = trt.OnnxParser(self.network, self.logger)
        if not self.parser.parse_from_file(str(model_path)):
            errors = [self._describe(self.parser.get_error(i)) for i in range(self.parser.num_errors)]
            raise BuildError(f"build: TensorRT could not parse {model_path.name}: {'; '.join(errors) or 'no detail'}")

    @staticmethod
    def _describe(err: Any) -> str:
        where = f"node {err.node_name()} ({err.node_operator()}): " if err.node() >= 0 else ""
        return f"{where}{err.desc()}"

    def io(self, inputs: bool) -> dict[str, dict[str, Any]]:
        n = self.network.num_inputs if inputs else self.network.num_outputs
        get = self.network.get_input if inputs else self.network.get_output
        return {get(i).name: {"shape": list(get(i).shape), "dtype": get(i).dtype.name} for i in range(n)}

    def plugin_layers(self) -> list[dict[str, Any]]:
        trt = self.trt
        found = []
        for i in range(self.network.num_layers):
            layer = self.network.get_layer(i)
            if layer.type != trt.LayerType.PLUGIN_V3:
                continue
            layer.__class__ = trt.IPluginV3Layer  # the Python API's downcast
            plugin = layer.plugin
            outs = [layer.get_output(j) for j in range(layer.num_outputs)]
            found.append({
                "name": layer.name,
                "plugin": f"{plugin.plugin_namespace}::{plugin.plugin_name}",
                "version": str(plugin.plugin_version),
                "output_shapes": [list(t.shape) for t in outs],
                "output_dtypes": [t.dtype.name for t in outs],
                "attributes": dict(getattr(plugin, "attrs", {})),  # as the parser's fields decoded
            })
        return found


def require_plugin_layers(r1c_nodes: list[tuple[str, str]], plugin_layers: list[dict[str, Any]]) -> None:
    """BuildError unless every r1c node of the model became an r1c plugin layer."""
    from r1c.plugins import PLUGIN_NAMESPACE

    by_name = {p["name"]: p["plugin"] for p in plugin_layers}
    missing = [f"{name} ({op})" for name, op in r1c_nodes if by_name.get(name) != f"{PLUGIN_NAMESPACE}::{op}"]
    if missing:
        raise BuildError(f"build: r1c nodes that did not become TensorRT plugin layers: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} (is the plugin registered, and are the r1c "
                         "function bodies dropped?)")


def _set_compute_capability(trt: types.ModuleType, cfg: Any, cc: tuple[int, int]) -> str:
    if not hasattr(cfg, "set_compute_capability"):
        raise BuildError(f"build: {trt.__name__} builds for the GPU it runs on; an explicit compute capability "
                         "needs TensorRT for RTX")
    name = f"SM{cc[0]}{cc[1]}"
    member = getattr(trt.ComputeCapability, name, None)
    if member is None:
        known = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
        raise BuildError(f"build: {trt.__name__} cannot target {name} (it knows {', '.join(known)})")
    cfg.num_compute_capabilities = 1
    if not cfg.set_compute_capability(member, 0):
        raise BuildError(f"build: {trt.__name__} refused compute capability {name}")
    return name


def _current_compute_capability() -> tuple[int, int] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


def parse_and_build(trt: types.ModuleType, model_path: Path, config: ModelConfig, *,
                    compute_capability: str | int | tuple[int, int] | None = None, fp8: bool | None = None,
                    profile_options: dict[str, Any] | None = None, build: bool = True,
                    strongly_typed: bool = True) -> tuple[NetworkReport, bytes | None]:
    """Register the plugins, drop r1c function bodies, parse, check the plugin layers, build (if `build`).

    `compute_capability`: the target (TensorRT for RTX only); None builds for the current GPU.
    `fp8`: None follows the model (FP8 weights or not); the target must be SM89 or newer when FP8 is used.
    """
    from r1c.plugins.tensorrt_common import register_plugins

    if trt.__name__.startswith(RTX_MODULE) and not _rtx_parser_library_reachable(rtx_library_dir()):
        # checked here because the parser aborts the whole process when the library is missing
        raise BuildError(f"build: TensorRT for RTX's ONNX parser needs {RTX_LIBRARY} on LD_LIBRARY_PATH when the "
                         "process starts (check_with_tensorrt_rtx arranges that in a child process)")
    register_plugins(trt)
    dropped = drop_function_bodies(model_path)
    r1c_nodes, n_nodes, model_fp8 = _model_facts(model_path)
    use_fp8 = model_fp8 if fp8 is None else fp8
    if model_fp8 and not use_fp8:
        raise BuildError("build: the model has FP8 weights; fp8=False cannot build it (export with --precision fp32)")
    cc = parse_compute_capability(compute_capability) if compute_capability is not None else None
    target_cc = cc or _current_compute_capability()
    if use_fp8 and target_cc is not None and target_cc < FP8_MIN_COMPUTE_CAPABILITY:
        raise BuildError(f"build: FP8 needs compute capability 8.9 or newer (Ada, Hopper); the target is "
                         f"{target_cc[0]}.{target_cc[1]}")

    t0 = time.perf_counter()
    parsed = _Parsed(trt, model_path, strongly_typed)
    plugin_layers = parsed.plugin_layers()
    require_plugin_layers(r1c_nodes, plugin_layers)
    inputs = parsed.io(inputs=True)
    profile = profile_shapes(config, list(inputs), profile_options)
    report = NetworkReport(
        tensorrt=f"{trt.__name__} {module_version(trt)}", onnx_nodes=n_nodes, layers=parsed.network.num_layers,
        plugin_layers=plugin_layers, inputs=inputs, outputs=parsed.io(inputs=False), dropped_function_bodies=dropped,
        compute_capability=f"{target_cc[0]}.{target_cc[1]}" if target_cc else None, fp8=use_fp8, profile=profile,
        parse_seconds=round(time.perf_counter() - t0, 3))
    logger.info("TensorRT parsed %d ONNX nodes into %d layers (%d r1c plugin layers)", n_nodes, report.layers,
                len(plugin_layers))
    if not build:
        return report, None

    cfg = parsed.builder.create_builder_config()
    if cc is not None:
        _set_compute_capability(trt, cfg, cc)
    prof = parsed.builder.create_optimization_profile()
    for name, shapes in profile.items():
        prof.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    if cfg.add_optimization_profile(prof) < 0:
        raise BuildError(f"build: TensorRT rejected the optimization profile: {'; '.join(parsed.logger.errors)}")
    t0 = time.perf_counter()
    serialized = parsed.builder.build_serialized_network(parsed.network, cfg)
    report.build_seconds = round(time.perf_counter() - t0, 3)
    if serialized is None:
        report.build_error = "; ".join(parsed.logger.errors) or "no detail"
        return report, None
    engine = bytes(memoryview(serialized))
    report.engine_bytes = len(engine)
    return report, engine


def build_tensorrt(work_dir: str | Path, config: ModelConfig, *, module: types.ModuleType | None = None,
                   compute_capability: str | int | tuple[int, int] | None = None, fp8: bool | None = None,
                   **options: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Build work_dir/model.engine from work_dir/model.onnx; returns (target_options, libraries).

    `module`: the TensorRT module (default: `import tensorrt`, a BuildError when absent). Options: the
    profile's max_batch, max_seq, max_capacity, opt_batch, opt_seq, opt_capacity (see PROFILE_OPTIONS), and
    keep_onnx (default False: the bundle keeps only the engine; the ONNX files are removed from work_dir).
    """
    trt = module if module is not None else import_tensorrt()
    work = Path(work_dir)
    model_path = work / MODEL_FILE
    if not model_path.is_file():
        raise BuildError(f"build: {model_path} not found (the lowered model)")
    unknown = set(options) - set(PROFILE_OPTIONS) - set(BUILD_OPTIONS)
    if unknown:
        raise BuildError(f"build: unknown TensorRT options {sorted(unknown)} "
                         f"(known: {sorted([*PROFILE_OPTIONS, *BUILD_OPTIONS])})")
    keep_onnx = bool(options.pop("keep_onnx", BUILD_OPTIONS["keep_onnx"]))
    report, engine = parse_and_build(trt, model_path, config, compute_capability=compute_capability, fp8=fp8,
                                     profile_options=options)
    if engine is None:
        raise BuildError(f"build: TensorRT could not build the engine: {report.build_error}")
    tmp = work / (ENGINE_FILE + ".partial")
    tmp.write_bytes(engine)
    tmp.replace(work / ENGINE_FILE)
    if not keep_onnx:
        for path in [work / MODEL_FILE, *work.glob("*.onnx.data")]:  # one data file or several
            path.unlink(missing_ok=True)
    logger.info("built %s (%d bytes) in %.1f s", work / ENGINE_FILE, len(engine), report.build_seconds or 0.0)
    from r1c.plugins.tensorrt_common import plugin_ops

    target_options = {
        "engine": ENGINE_FILE,
        "profiles": [report.profile],
        "compute_capability": report.compute_capability,
        "fp8": report.fp8,
        "plugins": sorted(op.spec.plugin_id for op in plugin_ops()),
        "layers": report.layers,
        "plugin_layers": len(report.plugin_layers),
        "dropped_function_bodies": report.dropped_function_bodies,
    }
    return target_options, {library_key(trt): module_version(trt)}


# ---- TensorRT for RTX: prove that the model parses and builds, on a machine with no GPU ---------------------------
def check_with_tensorrt_rtx(model_path: str | Path, config: ModelConfig, *,
                            compute_capability: str | int | tuple[int, int] = DEFAULT_RTX_COMPUTE_CAPABILITY,
                            build: bool = True, timeout_s: float = 600.0, **profile_options: Any) -> NetworkReport:
    """Parse (and build, unless build=False) `model_path` with TensorRT for RTX for `compute_capability`.

    Works on a copy of the model file (the external data is read in place), so `model_path` is not changed.
    Raises BuildError when the model does not parse or an r1c node did not become a plugin layer; a failed
    build is reported in `build_error` (the caller decides).
    """
    src = Path(model_path)
    if not src.is_file():
        raise BuildError(f"build: {src} not found")
    import importlib.util

    if importlib.util.find_spec(RTX_MODULE) is None:  # a clear error before anything else
        raise BuildError(f"TensorRT for RTX is not installed (no module {RTX_MODULE}): "
                         "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings")
    lib_dir = rtx_library_dir()
    with tempfile.TemporaryDirectory(prefix="r1c-trt-rtx-") as tmp_name:
        tmp = Path(tmp_name)
        model_copy = _copy_model(src, tmp)
        if _rtx_parser_library_reachable(lib_dir):
            return _check_in_process(model_copy, config, compute_capability, build, profile_options)
        libs = tmp / "lib"
        libs.mkdir()
        link_rtx_library(lib_dir, libs)
        (tmp / "config.json").write_text(config.to_json())
        report_path = tmp / "report.json"
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        import r1c  # the child imports this same r1c, installed or not

        root = str(Path(r1c.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "r1c.runtime.trt_build", "rtx-check", str(model_copy),
               "--config", str(tmp / "config.json"), "--compute-capability", str(_cc_arg(compute_capability)),
               "--profile", json.dumps(profile_options), "--report", str(report_path)]
        if not build:
            cmd.append("--no-build")
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BuildError(f"build: the TensorRT for RTX check took more than {timeout_s:.0f} s") from None
        if not report_path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise BuildError(f"build: the TensorRT for RTX check exited with code {proc.returncode}: "
                             f"{' | '.join(tail) or 'no output'}")
        raw = json.loads(report_path.read_text())
        if "error" in raw:
            raise BuildError(raw["error"])
        return NetworkReport(**raw)


def _cc_arg(cc: str | int | tuple[int, int]) -> str:
    major, minor = parse_compute_capability(cc)
    return f"SM{major}{minor}"


def _copy_model(src: Path, into: Path) -> Path:
    """Copy the model file into `into`, with symlinks to its external data files (the weights are not copied)."""
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    for rel in sorted(locations):
        target, link = (src.parent / rel).resolve(), into / rel
        if not target.is_file() or not link.resolve().is_relative_to(into.resolve()):
            raise BuildError(f"build: external data {rel!r} of {src.name} is missing or outside its folder")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    dst = into / src.name
    dst.write_bytes(src.read_bytes())
    return dst


def _check_in_process(model_path: Path, config: ModelConfig, compute_capability: str | int | tuple[int, int],
                      build: bool, profile_options: dict[str, Any]) -> NetworkReport:
    trt = import_tensorrt_rtx()
    report, _ = parse_and_build(trt, model_path, config, compute_capability=compute_capability,
                                profile_options=profile_options, build=build)
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m r1c.runtime.trt_build rtx-check MODEL --config CONFIG --report OUT`: the child process."""
    ap = argparse.ArgumentParser(prog="python -m r1c.runtime.trt_build")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rc = sub.add_parser("rtx-check", help="parse and build MODEL with TensorRT for RTX; write a JSON report")
    rc.add_argument("model", type=Path)
    rc.add_argument("--config", type=Path, required=True)
    rc.add_argument("--compute-capability", default=DEFAULT_RTX_COMPUTE_CAPABILITY)
    rc.add_argument("--profile", default="{}", help="profile options as JSON")
    rc.add_argument("--no-build", action="store_true")
    rc.add_argument("--report", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = _check_in_process(args.model, ModelConfig.from_json(args.config), args.compute_capability,
                                   not args.no_build, json.loads(args.profile))
        args.report.write_text(json.dumps(dataclasses.asdict(report)))
    except BuildError as e:
        args.report.write_text(json.dumps({"error": str(e)}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
