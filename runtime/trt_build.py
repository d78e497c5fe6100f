"""Build a TensorRT engine from the lowered r1c model, with the r1c ops bound to the r1c plugins.

`build_tensorrt(work_dir, config, module=...)` is what `r1c build --target tensorrt | tensorrt-rtx` runs (for
TensorRT for RTX in a child process, `r1c.runtime.trt_rtx`): it compiles the r1c kernel library for the target
compute capability into work_dir/kernels/ (`r1c.runtime.trt_kernels`), parses work_dir/model.onnx (weights as
external data), requires every `r1c` node to have become a plugin layer, sets one optimization profile over batch,
new tokens and cache capacity, and streams the serialized plan into work_dir/model.engine
(`build_serialized_network_to_stream`: R1-size plans are hundreds of GB, never held whole in Python bytes).

`parse_and_build` is the shared core; `NetworkReport` is what it saw (layers, plugin layers and their attributes,
I/O, timings), which the tests and `scripts/trt_rtx_check.py` read.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import types
from pathlib import Path
from typing import Any

from r1c.config import ModelConfig
from r1c.errors import BuildError
from r1c.runtime.trt_lib import (
    RTX_LIBRARY,
    is_rtx,
    library_key,
    make_logger,
    module_version,
    parser_version,
    rtx_library_dir,
    rtx_parser_library_reachable,
)
from r1c.runtime.trt_profiles import (
    PROFILE_OPTIONS,
    arch_name,
    has_fp8,
    max_tokens,
    parse_compute_capability,
    profile_shapes,
)

logger = logging.getLogger(__name__)

ENGINE_FILE = "model.engine"
MODEL_FILE = "model.onnx"
KERNELS_DIR = "kernels"
FLOAT8E4M3FN = 17  # onnx.TensorProto.FLOAT8E4M3FN
BUILD_OPTIONS = {"keep_onnx": False}


# ---- the model ---------------------------------------------------------------------------------------------------
def drop_function_bodies(model_path: Path) -> list[str]:
    """Run `DropR1CFunctionBodiesPass` on `model_path` (in place; the weights stay where they are); returns the
    dropped bodies. Parsers before TensorRT 10.15 inline a local function instead of looking for a plugin; the
    `tensorrt` pipeline already drops them, this is the same pass for a model that still has them."""
    import onnx_ir as ir

    from r1c.passes.drop_r1c_function_bodies import DropR1CFunctionBodiesPass
    from r1c.plugins import R1C_DOMAIN

    model = ir.load(model_path)
    dropped = sorted(f"{d}::{n}" for d, n, _ in model.functions if d == R1C_DOMAIN)
    if not DropR1CFunctionBodiesPass()(model).modified:
        return []
    tmp = model_path.with_name(model_path.name + ".partial")
    ir.save(model, tmp)  # external tensors keep pointing at the data file beside it
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


# ---- parse, check, build -------------------------------------------------------------------------------------
@dataclasses.dataclass
class NetworkReport:
    """What TensorRT made of the model: layers, the r1c plugin layers and the network's I/O."""

    tensorrt: str  # module and version, e.g. "tensorrt_rtx_bindings 1.7.1.116"
    onnx_nodes: int
    layers: int
    plugin_layers: list[dict[str, Any]]  # name, plugin id, output shapes and dtypes, attributes
    inputs: dict[str, dict[str, Any]]  # name -> {"shape", "dtype"} (-1: dynamic)
    outputs: dict[str, dict[str, Any]]
    dropped_function_bodies: list[str]
    parser: str = ""
    compute_capability: str | None = None
    fp8: bool = False
    profile: dict[str, dict[str, list[int]]] = dataclasses.field(default_factory=dict)
    engine_bytes: int | None = None
    parse_seconds: float = 0.0
    build_seconds: float | None = None
    build_error: str | None = None
    strongly_typed: bool = True


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


def _set_compute_capability(trt: types.ModuleType, cfg: Any, cc: tuple[int, int]) -> None:
    """Target `cc` in builder config `cfg` (None: only check that this TensorRT can target it)."""
    if not hasattr(trt, "ComputeCapability"):
        raise BuildError(f"build: {trt.__name__} builds for the GPU it runs on; an explicit compute capability "
                         "needs TensorRT for RTX (--target tensorrt-rtx)")
    name = f"SM{cc[0]}{cc[1]}"
    member = getattr(trt.ComputeCapability, name, None)
    if member is None:
        known = [m for m in trt.ComputeCapability.__members__ if m.startswith("SM")]
        raise BuildError(f"build: {trt.__name__} cannot target {arch_name(cc)} (it knows {', '.join(known)})")
    if cfg is None:
        return
    cfg.num_compute_capabilities = 1
    if not cfg.set_compute_capability(member, 0):
        raise BuildError(f"build: {trt.__name__} refused compute capability {name}")


def current_compute_capability() -> tuple[int, int] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return int(major), int(minor)


def _file_writer(trt: types.ModuleType, path: Path) -> Any:
    """An IStreamWriter that appends what TensorRT serializes to `path`, chunk by chunk; `.bytes` counts them."""

    def __init__(self: Any) -> None:
        trt.IStreamWriter.__init__(self)
        self.file = path.open("wb")
        self.bytes = 0

    def write(self: Any, data: Any) -> int:
        n = self.file.write(data)
        self.bytes += n
        return n

    return type("R1CEngineFileWriter", (trt.IStreamWriter,), {"__init__": __init__, "write": write})()


def _serialize(trt: types.ModuleType, parsed: _Parsed, cfg: Any, engine_path: Path) -> int | None:
    """Build and stream the plan into `engine_path`; its size, or None when the build failed."""
    tmp = engine_path.with_name(engine_path.name + ".partial")
    if hasattr(parsed.builder, "build_serialized_network_to_stream"):
        writer = _file_writer(trt, tmp)
        try:
            ok = parsed.builder.build_serialized_network_to_stream(parsed.network, cfg, writer)
        finally:
            writer.file.close()
        size = writer.bytes if ok else None
    else:  # TensorRT before 10.x's stream writer: the plan is in TensorRT's host memory, written out in chunks
        host = parsed.builder.build_serialized_network(parsed.network, cfg)
        size = None
        if host is not None:
            view = memoryview(host)
            with tmp.open("wb") as f:
                for start in range(0, len(view), 1 << 26):
                    f.write(view[start:start + (1 << 26)])
            size = len(view)
    if size is None:
        tmp.unlink(missing_ok=True)
        return None
    tmp.replace(engine_path)
    return size


def parse_and_build(trt: types.ModuleType, model_path: Path, config: ModelConfig, *,
                    compute_capability: str | int | tuple[int, int] | None = None, fp8: bool | None = None,
                    profile_options: dict[str, Any] | None = None, engine_path: Path | None = None,
                    strongly_typed: bool = True) -> NetworkReport:
    """Register the plugins, drop r1c function bodies, parse, check the plugin layers, and build into `engine_path`
    (when given; else parse only).

    `compute_capability`: the target (TensorRT for RTX only); None builds for the current GPU. `fp8`: None follows
    the model (FP8 weights or not); FP8 needs a target of SM89 or newer.
    """
    from r1c.plugins.tensorrt_common import register_plugins

    if is_rtx(trt) and not rtx_parser_library_reachable(rtx_library_dir()):
        # checked here because the parser aborts the whole process when the library is missing
        raise BuildError(f"build: TensorRT for RTX's ONNX parser needs {RTX_LIBRARY} on LD_LIBRARY_PATH when the "
                         "process starts (r1c.runtime.trt_rtx arranges that in a child process)")
    register_plugins(trt)
    dropped = drop_function_bodies(model_path)
    r1c_nodes, n_nodes, model_fp8 = _model_facts(model_path)
    use_fp8 = model_fp8 if fp8 is None else fp8
    if model_fp8 and not use_fp8:
        raise BuildError("build: the model has FP8 weights; fp8=False cannot build it (export with --precision fp32)")
    cc = parse_compute_capability(compute_capability) if compute_capability is not None else None
    target_cc = cc or current_compute_capability()
    if use_fp8 and target_cc is not None and not has_fp8(target_cc):
        raise BuildError(f"build: the model has FP8 weights and {arch_name(target_cc)} has no FP8 tensor cores "
                         "(FP8 needs sm89 or newer: Ada, Hopper, Blackwell); export with --precision fp32 for it")

    t0 = time.perf_counter()
    parsed = _Parsed(trt, model_path, strongly_typed)
    plugin_layers = parsed.plugin_layers()
    require_plugin_layers(r1c_nodes, plugin_layers)
    inputs = parsed.io(inputs=True)
    profile = profile_shapes(config, list(inputs), profile_options)
    report = NetworkReport(
        tensorrt=f"{trt.__name__} {module_version(trt)}", onnx_nodes=n_nodes, layers=parsed.network.num_layers,
        plugin_layers=plugin_layers, inputs=inputs, outputs=parsed.io(inputs=False), dropped_function_bodies=dropped,
        parser=parser_version(trt), compute_capability=f"{target_cc[0]}.{target_cc[1]}" if target_cc else None,
        fp8=use_fp8, profile=profile, parse_seconds=round(time.perf_counter() - t0, 3), strongly_typed=strongly_typed)
    logger.info("TensorRT parsed %d ONNX nodes into %d layers (%d r1c plugin layers)", n_nodes, report.layers,
                len(plugin_layers))
    if engine_path is None:
        return report

    cfg = parsed.builder.create_builder_config()
    if cc is not None:
        _set_compute_capability(trt, cfg, cc)
    prof = parsed.builder.create_optimization_profile()
    for name, shapes in profile.items():
        prof.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    if cfg.add_optimization_profile(prof) < 0:
        raise BuildError(f"build: TensorRT rejected the optimization profile: {'; '.join(parsed.logger.errors)}")
    t0 = time.perf_counter()
    report.engine_bytes = _serialize(trt, parsed, cfg, engine_path)
    report.build_seconds = round(time.perf_counter() - t0, 3)
    if report.engine_bytes is None:
        report.build_error = "; ".join(parsed.logger.errors) or "no detail"
    return report


def build_tensorrt(work_dir: str | Path, config: ModelConfig, *, module: types.ModuleType | None = None,
                   compute_capability: str | int | tuple[int, int] | None = None, fp8: bool | None = None,
                   **options: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """Build work_dir/model.engine and work_dir/kernels/ from work_dir/model.onnx; returns (target_options,
    libraries) for the manifest.

    `module`: the TensorRT module (default: `import tensorrt`, a BuildError when absent). `compute_capability`:
    the target (required with TensorRT for RTX, which builds without a GPU; default: the current GPU). Options:
    the profile's max_batch, max_seq, max_capacity, opt_batch, opt_seq, opt_capacity (see PROFILE_OPTIONS), and
    keep_onnx (default False: the bundle keeps only the engine and kernels; the ONNX files are removed).
    """
    import triton

    from r1c.plugins.tensorrt_common import use_kernel_library
    from r1c.runtime.trt_kernels import build_kernel_library
    from r1c.runtime.trt_lib import import_tensorrt

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
    cc = parse_compute_capability(compute_capability) if compute_capability is not None else \
        current_compute_capability()
    if cc is None:
        raise BuildError("build: no GPU here to build for: name the target with --arch (TensorRT for RTX)")
    if compute_capability is not None:  # before compiling anything: does this TensorRT know the target?
        _set_compute_capability(trt, None, cc)
    if _model_facts(model_path)[2] and not has_fp8(cc) and fp8 is not False:
        raise BuildError(f"build: the model has FP8 weights and {arch_name(cc)} has no FP8 tensor cores (FP8 needs "
                         "sm89 or newer: Ada, Hopper, Blackwell); export with --precision fp32 for it")
    # the kernels first: a builder that times the plugins on a GPU launches them
    tokens = max_tokens(profile_shapes(config, ["input_ids"], options))
    t0 = time.perf_counter()
    index = build_kernel_library(model_path, work / KERNELS_DIR, cc, tokens)
    kernel_seconds = round(time.perf_counter() - t0, 3)
    use_kernel_library(work / KERNELS_DIR)
    try:
        report = parse_and_build(trt, model_path, config, compute_capability=compute_capability, fp8=fp8,
                                 profile_options=options, engine_path=work / ENGINE_FILE)
    finally:
        use_kernel_library(None)
    if report.build_error is not None:
        raise BuildError(f"build: TensorRT could not build the engine: {report.build_error}")
    if not keep_onnx:
        for path in [work / MODEL_FILE, *work.glob("*.onnx.data")]:  # one data file or several
            path.unlink(missing_ok=True)
    logger.info("built %s (%d bytes) in %.1f s", work / ENGINE_FILE, report.engine_bytes or 0,
                report.build_seconds or 0.0)
    target_options = {
        "engine": ENGINE_FILE,
        "kernels": KERNELS_DIR,
        "arch": arch_name(cc),
        "compute_capability": f"{cc[0]}.{cc[1]}",
        "profiles": [report.profile],
        "fp8": report.fp8,
        "strongly_typed": report.strongly_typed,
        "network_dtypes": {name: io["dtype"] for name, io in {**report.inputs, **report.outputs}.items()},
        "plugin_output_dtypes": {p["plugin"]: p["output_dtypes"] for p in report.plugin_layers},
        "plugins": sorted({p["plugin"] for p in report.plugin_layers}),
        "layers": report.layers,
        "plugin_layers": len(report.plugin_layers),
        "kernels_compiled": len(index["kernels"]),
        "dropped_function_bodies": report.dropped_function_bodies,
        "parser": report.parser,
        "seconds": {"kernels": kernel_seconds, "parse": report.parse_seconds, "build": report.build_seconds},
    }
    return target_options, {library_key(trt): module_version(trt), "triton": triton.__version__}
