"""What the r1c TensorRT plugins share: attribute fields, the IPluginV3 / IPluginCreatorV3One classes, registration,
and the one place where a plugin finds its kernels.

Each op module (`moe_router/tensorrt.py`, `moe_experts/tensorrt.py`, `fp8_linear/tensorrt.py`, `all_reduce/` and
`all_gather/tensorrt.py`) describes its plugin as a `PluginOp`: dtypes, output shapes, accepted formats, shape checks,
and how it runs (workspace, preparation when shapes change, enqueue). This module turns a `PluginOp` into Python
plugin and creator classes of whichever TensorRT module it is given (full `tensorrt` or TensorRT-RTX's
`tensorrt_rtx_bindings`), so one code path serves both. The plugin's name, namespace, version and attribute names
and types all come from the op's `OpSpec`.

Production path of a `KernelOp` (r1c's kernels): `get_workspace_size` declares the plan's scratch memory for the
profile's largest shapes (TensorRT plans it with the rest of the engine's memory); `on_shape_change` computes the plan
for the new shapes and resolves its kernels in the bundle's ahead-of-time kernel library (`kernel_runner()`, set by
`use_kernel_library`); `enqueue` only fills device pointers into the prepared launches and launches them on
TensorRT's stream: no allocation, no synchronization, no shape logic, no Triton. Without a kernel library a plugin
cannot run: the error says so; there is no fallback to a slow reference. The collectives (`CollectiveOp`) launch no
kernel of r1c's: NCCL through torch.distributed's process group, on the same stream.

TensorRT's ONNX parser binds an `r1c` node to a plugin when the node carries `plugin_namespace="r1c"` and a
creator with the node's op type, that namespace and version "1" is registered; it passes the node's other
attributes as plugin fields: ints as INT32, floats as FLOAT32, strings as CHAR (seen with TensorRT-RTX 1.7's
parser; decoding also takes INT64/FLOAT64); the fields serialized into an engine use the same types.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from r1c.errors import BuildError, BundleError
from r1c.plugins import PLUGIN_NAMESPACE, OpSpec
from r1c.plugins._triton import KernelSpec
from r1c.plugins.launch import Plan, specs_up_to, workspace_up_to

logger = logging.getLogger(__name__)

# Should a parser pass the namespace/version attributes as fields: they select the creator, not op attributes.
BINDING_FIELDS = frozenset({"plugin_namespace", "plugin_version"})

# TensorRT DataType name -> torch dtype name (looked up by name so that any TensorRT module works).
_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "FP8": "float8_e4m3fn",
}
_INT_FIELDS = ("INT32", "INT64", "INT16", "INT8")
_FLOAT_FIELDS = ("FLOAT32", "FLOAT64", "FLOAT16")


def version_string(spec: OpSpec) -> str:
    """The plugin version TensorRT matches against (the parser's default `plugin_version` is "1")."""
    return str(spec.version)


# ---- attributes <-> plugin fields -----------------------------------------------------------------------------
def _field_kind(trt: types.ModuleType, default: Any) -> tuple[Any, Any]:
    """(PluginFieldType, numpy dtype) of an attribute, from the Python type of its default in the spec."""
    if isinstance(default, bool) or not isinstance(default, int | float | str):
        raise TypeError(f"unsupported attribute default {default!r}")
    if isinstance(default, int):
        return trt.PluginFieldType.INT32, np.int32
    if isinstance(default, float):
        return trt.PluginFieldType.FLOAT32, np.float32
    return trt.PluginFieldType.CHAR, np.int8


def _field_data(trt: types.ModuleType, default: Any, value: Any) -> tuple[np.ndarray, Any]:
    kind, dtype = _field_kind(trt, default)
    if isinstance(default, str):
        return np.frombuffer(str(value).encode(), dtype=np.int8).copy(), kind
    return np.array([value], dtype=dtype), kind


def field_collection(trt: types.ModuleType, spec: OpSpec, attrs: dict[str, Any]) -> tuple[Any, list[np.ndarray]]:
    """A `PluginFieldCollection` holding `attrs` (every attribute of `spec`) with the spec's field types.

    Returns the collection and the arrays it points into: TensorRT's `PluginField` keeps a raw pointer, not a
    reference, so the caller keeps the arrays alive for as long as the collection is in use.
    """
    fields, arrays = [], []
    for name, default in spec.attributes.items():
        data, kind = _field_data(trt, default, attrs[name])
        arrays.append(data)
        fields.append(trt.PluginField(name, data, kind))
    return trt.PluginFieldCollection(fields), arrays


def field_names(trt: types.ModuleType, spec: OpSpec) -> tuple[Any, list[np.ndarray]]:
    """The creator's `field_names` (each attribute with its type and no data), and the arrays to keep alive."""
    fields, arrays = [], []
    for name, default in spec.attributes.items():
        kind, dtype = _field_kind(trt, default)
        arrays.append(np.array([], dtype=dtype))
        fields.append(trt.PluginField(name, arrays[-1], kind))
    return trt.PluginFieldCollection(fields), arrays


def _decode(spec: OpSpec, name: str, kind: str, data: np.ndarray) -> Any:
    default = spec.attributes[name]
    flat = np.asarray(data).reshape(-1)
    if isinstance(default, str):
        if kind not in ("CHAR", "INT8", "UINT8"):
            raise ValueError(f"{spec.plugin_id}: attribute {name} must be a string, got a {kind} field")
        return flat.astype(np.uint8).tobytes().split(b"\0", 1)[0].decode()
    if flat.size != 1:
        raise ValueError(f"{spec.plugin_id}: attribute {name} must be one value, got {flat.size}")
    if isinstance(default, int):
        if kind not in _INT_FIELDS:
            raise ValueError(f"{spec.plugin_id}: attribute {name} must be an int, got a {kind} field")
        return int(flat[0])
    if kind not in _FLOAT_FIELDS + _INT_FIELDS:
        raise ValueError(f"{spec.plugin_id}: attribute {name} must be a float, got a {kind} field")
    return float(flat[0])


def attrs_from_fields(spec: OpSpec, fields: Any) -> dict[str, Any]:
    """The op's attribute dict from a field collection: spec defaults, overridden by the fields given.

    Unknown field names are an error (a misspelt attribute must not silently fall back to its default).
    """
    given: dict[str, Any] = {}
    for f in fields if fields is not None else ():
        name = str(f.name)
        if name in BINDING_FIELDS:
            continue
        if name not in spec.attributes:
            raise ValueError(f"{spec.plugin_id}: unknown attribute {name!r} (expected {sorted(spec.attributes)})")
        given[name] = _decode(spec, name, f.type.name, f.data)
    return spec.attrs(**given)


# ---- the kernels: one factory for every plugin ------------------------------------------------------------------
def dtype_name(trt_dtype: Any) -> str:
    """The torch dtype name of a TensorRT DataType (by name, so that any TensorRT module works)."""
    try:
        return _TORCH_DTYPES[trt_dtype.name]
    except KeyError:
        raise ValueError(f"no torch dtype for TensorRT {trt_dtype}") from None


_LIBRARY: list[Any] = []  # the active KernelLibrary's DriverRunner (at most one)


def use_kernel_library(directory: str | Path | None) -> None:
    """Make the kernel library at `directory` (a bundle's `kernels/`) the one every r1c plugin launches from;
    None clears it. Raises BundleError when the directory holds no library."""
    from r1c.plugins.kernel_library import DriverRunner, KernelLibrary

    _LIBRARY.clear()
    if directory is not None:
        _LIBRARY.append(DriverRunner(KernelLibrary(directory)))


def kernel_runner() -> Any:
    """The runner of the active kernel library; a BundleError when none is loaded (never a fallback)."""
    if not _LIBRARY:
        raise BundleError("kernels: no r1c kernel library is loaded, so the r1c plugins cannot run: load the bundle "
                          "with r1c.runtime.load (its kernels/ directory holds them) or call "
                          "r1c.plugins.tensorrt_common.use_kernel_library(dir)")
    return _LIBRARY[0]


# ---- the op description the plugin classes are made from -------------------------------------------------------
class PluginOp(abc.ABC):
    """One r1c op as a TensorRT plugin; subclasses hold no per-instance state (attributes are passed in).

    Two halves. What TensorRT's builder asks about the layer: `validate`, `num_inputs`, `output_dtypes`,
    `output_shapes`, `supports`, `check_shapes`. How the layer runs, in the plugin's life cycle:
        workspace_bytes   get_workspace_size (build): scratch bytes at the profile's largest shapes
        require_runtime   the engine is loaded (create_plugin, RUNTIME phase): what enqueue needs is at hand
        prepare           on_shape_change: everything that depends on shapes (plans, group lookups, checks)
        enqueue           enqueue: launch on TensorRT's stream; no allocation, no synchronization, no shape logic
    Two kinds implement the second half: `KernelOp` (r1c's Triton kernels, as launch plans from the bundle's kernel
    library) and `r1c.plugins.tensorrt_collective.CollectiveOp` (NCCL through torch.distributed: no kernels of
    r1c's, so nothing in the kernel library).

    `shapes` below are concrete dims (at run time, or the profile's maxima at build time), `dtypes` torch dtype
    names, both for every input in order.
    """

    spec: ClassVar[OpSpec]
    # TensorRT's builder times a plugin by running it on made-up inputs (on a GPU); an op that cannot run then
    # (a collective has no peers while one process builds) sets this False: its build-phase enqueue does nothing.
    runs_while_building: ClassVar[bool] = True

    def validate(self, attrs: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Raise ValueError for attribute values the op does not support."""

    def num_inputs(self, attrs: dict[str, Any]) -> tuple[int, ...]:
        """The accepted numbers of inputs."""
        return (len(self.spec.inputs),)

    @abc.abstractmethod
    def output_dtypes(self, trt: types.ModuleType, attrs: dict[str, Any], input_types: Sequence[Any]) -> list[Any]:
        """Output DataTypes for the given input DataTypes."""

    @abc.abstractmethod
    def output_shapes(
        self, trt: types.ModuleType, attrs: dict[str, Any], inputs: Sequence[Any], exprs: Any
    ) -> list[Any]:
        """Output `DimsExprs` from the inputs' `DimsExprs` (dynamic dims stay symbolic, via `exprs`)."""

    @abc.abstractmethod
    def supports(
        self, trt: types.ModuleType, attrs: dict[str, Any], pos: int, types_: Sequence[Any], num_inputs: int
    ) -> bool:
        """Whether the DataType at in/out position `pos` is accepted, given those at positions < pos."""

    def check_shapes(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]]) -> None:  # noqa: B027
        """Raise ValueError for input shapes (-1: dynamic) that the op cannot take."""

    @abc.abstractmethod
    def workspace_bytes(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> int:
        """Bytes of scratch memory for every shape up to `shapes` (TensorRT allocates it with the engine)."""

    @abc.abstractmethod
    def require_runtime(self, attrs: dict[str, Any]) -> None:
        """Raise BundleError when what `enqueue` needs is missing (called when the engine loads, not later)."""

    @abc.abstractmethod
    def prepare(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> Any:
        """What `enqueue` needs for these shapes (computed when they change, never in enqueue)."""

    @abc.abstractmethod
    def enqueue(self, prepared: Any, inputs: Sequence[int], outputs: Sequence[int], workspace: int,
                stream: int) -> None:
        """Run on `stream` with the device pointers of the inputs, outputs and workspace."""


class KernelOp(PluginOp):
    """An op whose plugin launches r1c's kernels: a launch plan (`r1c.plugins.launch`) per shapes, launched from the
    bundle's ahead-of-time kernel library (`kernel_runner()`); `r1c build` compiles `kernel_specs`."""

    @abc.abstractmethod
    def problem(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> Any:
        """The kernels' problem description (sizes and dtypes) for these input shapes."""

    @abc.abstractmethod
    def plan(self, attrs: dict[str, Any], problem: Any) -> Plan:
        """The launch plan for `problem` (inputs and outputs in the op's order)."""

    @abc.abstractmethod
    def config_boundaries(self, problem: Any) -> list[int]:
        """The largest token count of each of the plan's config buckets (the op's `plan.config_boundaries`)."""

    def _plan_at(self, attrs: dict[str, Any], problem: Any, tokens: int) -> Plan:
        return self.plan(attrs, dataclasses.replace(problem, tokens=tokens))

    def workspace_size(self, attrs: dict[str, Any], problem: Any) -> int:
        """Bytes of workspace for every token count up to the problem's (`problem.tokens`)."""
        return workspace_up_to(lambda t: self._plan_at(attrs, problem, t), problem.tokens,
                               self.config_boundaries(problem))

    def kernel_specs(self, attrs: dict[str, Any], problem: Any) -> list[KernelSpec]:
        """Every kernel a plan may launch for token counts up to the problem's (what `r1c build` compiles)."""
        return specs_up_to(lambda t: self._plan_at(attrs, problem, t), problem.tokens,
                           self.config_boundaries(problem))

    def workspace_bytes(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> int:
        return int(self.workspace_size(attrs, self.problem(attrs, shapes, dtypes)))

    def require_runtime(self, attrs: dict[str, Any]) -> None:
        kernel_runner()  # a plugin that cannot launch its kernels fails when the engine loads

    def prepare(self, attrs: dict[str, Any], shapes: Sequence[tuple[int, ...]], dtypes: Sequence[str]) -> Any:
        """The plan for these shapes, its kernels resolved in the kernel library."""
        return kernel_runner().prepare(self.plan(attrs, self.problem(attrs, shapes, dtypes)))

    def enqueue(self, prepared: Any, inputs: Sequence[int], outputs: Sequence[int], workspace: int,
                stream: int) -> None:
        kernel_runner().run(prepared, inputs, outputs, workspace, stream)

    def execute(self, attrs: dict[str, Any], inputs: Sequence[Any], outputs: Sequence[Any]) -> None:
        """The enqueue body on torch tensors through Triton (JIT on CUDA, the interpreter on CPU): the same plan the
        plugin launches from the kernel library. For tests and the GPU check; the plugin itself never uses it."""
        from r1c.plugins.launch import TritonRunner

        shapes = [tuple(t.shape) for t in inputs]
        dtypes = [str(t.dtype).removeprefix("torch.") for t in inputs]
        self.check_shapes(attrs, shapes)
        TritonRunner().run(self.plan(attrs, self.problem(attrs, shapes, dtypes)), list(inputs), list(outputs))


def _static_shape(desc: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in desc.dims)


class _PluginLogic:
    """Behaviour of an r1c IPluginV3 (core, build and runtime capabilities in one object).

    Mixed into TensorRT's pybind classes by `plugin_classes`; `_trt` and `_op` are set there.
    """

    _trt: ClassVar[types.ModuleType]
    _op: ClassVar[PluginOp]
    _trt_bases: ClassVar[tuple[type, ...]]

    def __init__(self, attrs: dict[str, Any], phase: Any = None) -> None:
        for base in self._trt_bases:  # pybind11 bases must each be initialized explicitly
            base.__init__(self)  # type: ignore[misc]
        spec = self._op.spec
        self.attrs = dict(attrs)
        self.phase = phase
        self.num_outputs = len(spec.outputs)
        self.plugin_name = spec.name
        self.plugin_namespace = PLUGIN_NAMESPACE
        self.plugin_version = version_string(spec)
        self.timing_cache_id = ""  # one tactic: nothing to time per instance
        self.input_shapes: list[tuple[int, ...]] = []
        self._prepared: Any = None

    # core / lifetime
    def get_capability_interface(self, type: Any) -> Any:
        return self

    def clone(self) -> Any:
        twin = type(self)(self.attrs, self.phase)
        twin.input_shapes = list(self.input_shapes)
        twin._prepared = self._prepared
        return twin

    # build
    def get_output_data_types(self, input_types: Sequence[Any]) -> list[Any]:
        return self._op.output_dtypes(self._trt, self.attrs, input_types)

    def get_output_shapes(self, inputs: Sequence[Any], shape_inputs: Sequence[Any], expr_builder: Any) -> list[Any]:
        return self._op.output_shapes(self._trt, self.attrs, inputs, expr_builder)

    def supports_format_combination(self, pos: int, in_out: Sequence[Any], num_inputs: int) -> bool:
        desc = in_out[pos].desc
        if desc.format != self._trt.TensorFormat.LINEAR:
            return False
        return self._op.supports(self._trt, self.attrs, pos, [d.desc.type for d in in_out], num_inputs)

    def configure_plugin(self, inp: Sequence[Any], out: Sequence[Any]) -> None:
        spec = self._op.spec
        if len(inp) not in self._op.num_inputs(self.attrs):
            raise ValueError(f"{spec.plugin_id}: {len(inp)} inputs, expected {self._op.num_inputs(self.attrs)}")
        self.input_shapes = [_static_shape(d.desc) for d in inp]
        self._op.check_shapes(self.attrs, self.input_shapes)

    def get_workspace_size(self, inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
        """The op's scratch bytes at the profile's largest shapes (TensorRT allocates it, once)."""
        shapes = [tuple(int(d) for d in t.max) for t in inputs]
        dtypes = [dtype_name(t.desc.type) for t in inputs]
        return int(self._op.workspace_bytes(self.attrs, shapes, dtypes))

    # runtime
    def _idle(self) -> bool:
        """A build-phase run of an op that cannot run while building (see `PluginOp.runs_while_building`)."""
        return not self._op.runs_while_building and self.phase != self._trt.TensorRTPhase.RUNTIME

    def on_shape_change(self, inp: Sequence[Any], out: Sequence[Any]) -> None:
        """New shapes: the op prepares its launches for them (not in enqueue)."""
        self.input_shapes = [_static_shape(d) for d in inp]
        if not self._idle():
            self._prepared = self._op.prepare(self.attrs, self.input_shapes, [dtype_name(d.type) for d in inp])

    def attach_to_context(self, resource_context: Any) -> Any:
        return self.clone()

    def get_fields_to_serialize(self) -> Any:
        # kept on the plugin: TensorRT reads the collection after this returns
        self._serialized = field_collection(self._trt, self._op.spec, self.attrs)
        return self._serialized[0]

    def enqueue(
        self,
        input_desc: Sequence[Any],
        output_desc: Sequence[Any],
        inputs: Sequence[int],
        outputs: Sequence[int],
        workspace: int,
        stream: int,
    ) -> None:
        if not self._idle():
            self._op.enqueue(self._prepared, inputs, outputs, workspace, stream)


class _CreatorLogic:
    """Behaviour of an r1c IPluginCreatorV3One: builds plugins from parser/serialized fields."""

    _trt: ClassVar[types.ModuleType]
    _op: ClassVar[PluginOp]
    _plugin_class: ClassVar[type]

    def __init__(self) -> None:
        self._trt.IPluginCreatorV3One.__init__(self)
        spec = self._op.spec
        self.name = spec.name
        self.plugin_namespace = PLUGIN_NAMESPACE
        self.plugin_version = version_string(spec)
        self.field_names, self._field_arrays = field_names(self._trt, spec)

    def create_plugin(self, name: str, field_collection: Any, phase: Any) -> Any:
        attrs = attrs_from_fields(self._op.spec, field_collection)
        self._op.validate(attrs)
        if phase == self._trt.TensorRTPhase.RUNTIME:
            self._op.require_runtime(attrs)  # a plugin that cannot run fails when the engine loads, not later
        return self._plugin_class(attrs, phase)


def plugin_classes(trt: types.ModuleType, op: PluginOp) -> tuple[type, type]:
    """(plugin class, creator class) of `op` for the TensorRT module `trt`."""
    bases = (trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime)
    name = op.spec.name
    plugin = type(f"{name}Plugin", (_PluginLogic, *bases), {"_trt": trt, "_op": op, "_trt_bases": bases})
    creator = type(
        f"{name}PluginCreator",
        (_CreatorLogic, trt.IPluginCreatorV3One),
        {"_trt": trt, "_op": op, "_plugin_class": plugin},
    )
    return plugin, creator


def plugin_ops() -> list[PluginOp]:
    """Every r1c op that has a TensorRT plugin: the compute ops (`KernelOp`) and the collectives."""
    from r1c.plugins.all_gather.tensorrt import AllGatherOp
    from r1c.plugins.all_reduce.tensorrt import AllReduceOp
    from r1c.plugins.fp8_linear.tensorrt import FP8LinearOp
    from r1c.plugins.moe_experts.tensorrt import MoEExpertsOp
    from r1c.plugins.moe_router.tensorrt import MoERouterOp

    return [MoERouterOp(), MoEExpertsOp(), FP8LinearOp(), AllReduceOp(), AllGatherOp()]


# Creators stay referenced here for the life of the process: TensorRT holds only a pointer to each.
_REGISTERED: dict[int, dict[str, Any]] = {}


def register_plugins(trt: types.ModuleType) -> dict[str, Any]:
    """Register the r1c plugin creators with `trt`'s plugin registry (idempotent); returns id -> creator.

    `trt` is the TensorRT Python module in use: `tensorrt`, or TensorRT-RTX's `tensorrt_rtx_bindings`.
    """
    done = _REGISTERED.setdefault(id(trt), {})
    registry = trt.get_plugin_registry()
    for op in plugin_ops():
        spec = op.spec
        if spec.plugin_id in done:
            continue
        if registry.get_creator(spec.name, version_string(spec), PLUGIN_NAMESPACE) is not None:
            raise BuildError(
                f"tensorrt: another plugin creator is already registered as {spec.plugin_id} "
                f"version {version_string(spec)}"
            )
        _, creator_class = plugin_classes(trt, op)
        creator = creator_class()
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise BuildError(f"tensorrt: could not register the plugin creator {spec.plugin_id}")
        done[spec.plugin_id] = creator
        logger.debug("registered TensorRT plugin %s with %s", spec.plugin_id, trt.__name__)
    return dict(done)
