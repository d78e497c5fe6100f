"""The pass pipelines: one explicit, ordered list per target, and the functions that run them.

- `r1c`: a foreign ONNX (e.g. the stock torch.onnx export) -> the r1c form that `r1c export` writes:
  standard ONNX plus r1c ops carrying their function bodies. Runnable by ONNX Runtime as it is.
- `onnxruntime`: the same fusions, then ONNX Runtime's fused kernels (RMSNorm, SwiGLU activation, MoE),
  the remaining r1c bodies inlined, the MoE split for balanced threads (or, with `--cpu-moe r1c`, r1c's CPU MoE
  kernel, passes/use_cpu_moe_kernel.py, its Linear kernel for float32 MatMuls by a constant,
  passes/use_cpu_linear_kernel.py, and its MLA attention kernel, passes/use_cpu_attention_kernel.py), weights
  quantized at the build's precision; float32 casts around the bfloat16/float16 nodes ORT's CPU cannot run.
- `tensorrt` (and `tensorrt-rtx`): the same MoE fusions, FP8 linear layers (blocked DequantizeLinear + MatMul) into
  `r1c::FP8Linear`, r1c nodes kept as plugin nodes without bodies, every other node checked against TensorRT's
  ONNX parser.
A pass's name is its module's name (`fuse_moe_router`); `r1c passes --target T` prints a pipeline.
A pass class that sets `uses_build_options = True` is constructed with the `BuildOptions` fields its
constructor names (e.g. `threads`), so `r1c build --threads N` reaches the passes that depend on it.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import time
from pathlib import Path
from typing import Any

import onnx_ir as ir
from onnx_ir.passes.common import ClearMetadataAndDocStringPass, CommonSubexpressionEliminationPass
from tqdm import tqdm

from r1c.errors import PassError, R1CError
from r1c.passes.cast_for_ort_kernels import CastForOrtKernelsPass
from r1c.passes.check_tensorrt_ops import CheckTensorRTOpsPass
from r1c.passes.deduplicate_small_initializers import DeduplicateSmallInitializersPass
from r1c.passes.drop_r1c_function_bodies import DropR1CFunctionBodiesPass
from r1c.passes.fold_constants import FoldConstantsPass
from r1c.passes.fold_moe_output_scale import FoldMoEOutputScalePass
from r1c.passes.fuse_cpu_mla_block import FuseCpuMLABlockPass
from r1c.passes.fuse_fp8_linear import FuseFP8LinearPass
from r1c.passes.fuse_moe_experts import FuseMoEExpertsPass
from r1c.passes.fuse_moe_router import FuseMoERouterPass
from r1c.passes.fuse_rmsnorm import FuseRMSNormPass
from r1c.passes.fuse_rotary_embedding import FuseRotaryEmbeddingPass
from r1c.passes.fuse_skip_rmsnorm import FuseSkipRMSNormPass
from r1c.passes.fuse_swiglu import FuseSwiGLUPass
from r1c.passes.infer_shapes import InferShapesPass
from r1c.passes.inline_r1c_functions import InlineR1CFunctionsPass
from r1c.passes.lower_moe_to_ort import LowerMoEToOrtPass
from r1c.passes.model_file import read_model
from r1c.passes.name_deterministically import NameDeterministicallyPass
from r1c.passes.quantize_weights import PRECISIONS, QuantizeWeightsPass
from r1c.passes.remove_dead_code import RemoveDeadCodePass
from r1c.passes.split_moe_experts import SplitMoEExpertsPass
from r1c.passes.use_cpu_attention_kernel import UseCpuAttentionKernelPass
from r1c.passes.use_cpu_linear_kernel import UseCpuLinearKernelPass
from r1c.passes.use_cpu_moe_kernel import UseCpuMoEKernelPass
from r1c.passes.widen_experts import WidenExpertsPass
from r1c.targets import CPU_MOE_CHOICES

logger = logging.getLogger(__name__)

PassFactory = type[ir.passes.PassBase]

PIPELINES: dict[str, tuple[PassFactory, ...]] = {
    "r1c": (
        InferShapesPass, FoldConstantsPass, RemoveDeadCodePass,
        FuseMoERouterPass, FuseMoEExpertsPass,
        RemoveDeadCodePass, CommonSubexpressionEliminationPass, InferShapesPass,
        ClearMetadataAndDocStringPass, NameDeterministicallyPass,
    ),
    "onnxruntime": (
        InferShapesPass, FoldConstantsPass, RemoveDeadCodePass,
        FuseMoERouterPass, FuseMoEExpertsPass, FuseRMSNormPass, FuseSwiGLUPass, FuseRotaryEmbeddingPass,
        FuseSkipRMSNormPass, RemoveDeadCodePass, WidenExpertsPass, LowerMoEToOrtPass, QuantizeWeightsPass,
        SplitMoEExpertsPass, FoldMoEOutputScalePass, UseCpuMoEKernelPass, InlineR1CFunctionsPass,
        FoldConstantsPass, UseCpuAttentionKernelPass, UseCpuLinearKernelPass, FuseCpuMLABlockPass, RemoveDeadCodePass,
        CommonSubexpressionEliminationPass, DeduplicateSmallInitializersPass, InferShapesPass, CastForOrtKernelsPass,
        ClearMetadataAndDocStringPass, NameDeterministicallyPass,
    ),
    "tensorrt": (
        InferShapesPass, FoldConstantsPass, RemoveDeadCodePass,
        FuseMoERouterPass, FuseMoEExpertsPass, FuseFP8LinearPass,
        RemoveDeadCodePass, CommonSubexpressionEliminationPass, InferShapesPass,
        DropR1CFunctionBodiesPass, CheckTensorRTOpsPass,
        ClearMetadataAndDocStringPass, NameDeterministicallyPass,
    ),
}
TARGETS = tuple(PIPELINES)
MODEL_FILE = "model.onnx"


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """What a build asks of the passes that depend on it (`r1c build` fills it from its options).

    precision: the weights of an `onnxruntime` bundle: "fp32", "int8", "int4", or "auto": the export's, with
    FP8 weights as int8 blocks (1 byte a weight, as in the checkpoint; ORT has no CPU FP8 kernels) — see
    `quantize_weights`. `report` collects what passes want the build to say, under each pass's name.
    """

    threads: int = 0  # intra-op threads the bundle is built for (0: one per core)
    precision: str = "auto"
    cpu_moe: str = "ort"  # "r1c": float MoE on r1c's CPU kernel (passes/use_cpu_moe_kernel.py); "ort": ORT's MoE
    report: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise PassError(f"passes: unknown precision {self.precision!r} (choose from auto, {', '.join(PRECISIONS)})")
        if self.cpu_moe not in CPU_MOE_CHOICES[1:]:
            raise PassError(f"passes: cpu_moe must be one of {', '.join(CPU_MOE_CHOICES[1:])} (resolve auto first)")


@dataclasses.dataclass(frozen=True)
class PassStats:
    name: str
    seconds: float
    modified: bool
    nodes: int  # main-graph nodes after the pass


def pass_name(pass_: ir.passes.PassBase | PassFactory) -> str:
    """A pass's name: the module it lives in (one pass per module)."""
    cls = pass_ if isinstance(pass_, type) else type(pass_)
    return cls.__module__.rsplit(".", 1)[-1]


def pipeline(target: str, options: BuildOptions | None = None) -> list[ir.passes.PassBase]:
    """Fresh instances of the target's passes, in order (those that use build options get theirs)."""
    if target not in PIPELINES:
        raise PassError(f"passes: unknown target {target!r} (choose from {', '.join(TARGETS)})")
    return [_instantiate(factory, options or BuildOptions()) for factory in PIPELINES[target]]


def _instantiate(factory: PassFactory, options: BuildOptions) -> ir.passes.PassBase:
    if not getattr(factory, "uses_build_options", False):
        return factory()
    wanted = inspect.signature(factory).parameters
    kwargs = {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name in wanted}
    if "report" in kwargs:  # each pass reports under its own name
        kwargs["report"] = options.report.setdefault(pass_name(factory), {})
    return factory(**kwargs)


def save_model(model: ir.Model, path: str | Path, *, max_file_bytes: int | None = None) -> Path:
    """Write `path` and its weights beside it (same model -> same bytes).

    The weights go into `<name>.data` while they fit in `max_file_bytes` (default: the exporter's 16 GiB,
    exporter/onnx_graph.DEFAULT_MAX_FILE_BYTES), else into several files `<stem>-0000i-of-0000N.onnx.data` that
    onnx_ir names and fills in initializer order (a tensor larger than the limit gets a file of its own).
    Tensors of at least ALIGN_THRESHOLD bytes start at ALIGN-byte offsets, as in the export, so that runtimes
    can memory-map them. Tensors are written one at a time; each memory-mapped source tensor is let go once
    written, so memory stays about one tensor however large the model.
    """
    from r1c.exporter.onnx_graph import ALIGN, ALIGN_THRESHOLD, DEFAULT_MAX_FILE_BYTES

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    previous: list[ir.TensorProtocol] = []

    def release_previous(tensor: ir.TensorProtocol, _: object) -> None:
        if previous and isinstance(previous[0], ir.ExternalTensor):
            previous[0].release()
        previous[:] = [tensor]

    limit = max_file_bytes or DEFAULT_MAX_FILE_BYTES
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    ir.save(model, path, external_data=f"{path.name}.data", callback=release_previous,
            max_shard_size_bytes=limit if total > limit else None, alignment=ALIGN,
            align_threshold=ALIGN_THRESHOLD - 1)
    return path


def save_model_in_place(model: ir.Model, path: Path) -> Path:
    """Write `path` over the model it was loaded from without rewriting its weights.

    Initializers still backed by the data files beside `path` keep their location, offset and length; a tensor
    a pass created (a folded constant) is appended to the first data file, or kept in the proto when it is
    smaller than INLINE_LIMIT bytes. The model file is replaced atomically.
    """
    from r1c.exporter.onnx_graph import ALIGN, DATA_FILE, INLINE_LIMIT

    data = path.parent / DATA_FILE
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < INLINE_LIMIT:
            continue
        with data.open("ab") as f:
            offset = f.tell()
            if offset % ALIGN:
                f.write(b"\0" * (ALIGN - offset % ALIGN))
                offset = f.tell()
            f.write(tensor.tobytes())
        shape = ir.Shape([int(d) for d in tensor.shape.numpy()])
        value.const_value = ir.ExternalTensor(DATA_FILE, offset, tensor.nbytes, tensor.dtype, shape=shape,
                                              name=value.name or "", base_dir=path.parent)
    tmp = path.with_name(path.name + ".partial")
    ir.save(model, tmp)
    tmp.replace(path)
    return path


def run_pipeline(model: ir.Model, target: str, *, dump_after: str | None = None, dump_dir: str | Path | None = None,
                 verbose: bool = False, stats: list[PassStats] | None = None, progress: bool = False,
                 options: BuildOptions | None = None) -> ir.Model:
    """Runs the target's pipeline on `model` (in place where the passes allow) and returns the result.

    `dump_after`: a pass name; the model after each run of that pass is written to
    `dump_dir/<index>_<name>.onnx`. A failing pass raises PassError naming itself (and, when a pass
    knows it, the node). `stats`, when given, receives one PassStats per pass. `progress`: a bar on stderr
    naming the pass that runs. `options` reach the passes that use build options.
    """
    passes = pipeline(target, options)
    names = [pass_name(p) for p in passes]
    if dump_after is not None:
        if dump_after not in names:
            raise PassError(f"passes: --dump-after {dump_after!r} is not a pass of the {target} pipeline "
                            f"({', '.join(dict.fromkeys(names))})")
        if dump_dir is None:
            raise PassError("passes: --dump-after needs a dump directory")
    level = logging.INFO if verbose else logging.DEBUG
    bar = tqdm(total=len(passes), desc=f"{target} passes", unit="pass", file=sys.stderr, leave=False,
               disable=not progress)
    for index, (name, pass_) in enumerate(zip(names, passes)):
        bar.set_postfix_str(name, refresh=True)
        start = time.perf_counter()
        try:
            result = pass_(model)
        except R1CError:
            raise
        except Exception as e:
            cause = _r1c_cause(e)  # e.g. a PassError raised in `ensures`, wrapped by onnx_ir
            if cause is not None:
                raise cause from e
            raise PassError(f"pass {name} ({index + 1}/{len(passes)} of {target}) failed: "
                            f"{type(e).__name__}: {e}") from e
        model = result.model
        seconds = time.perf_counter() - start
        logger.log(level, "%2d %-34s %6.2fs %5d nodes%s", index, name, seconds, len(model.graph),
                   "" if result.modified else " (unchanged)")
        bar.update()
        if stats is not None:
            stats.append(PassStats(name, seconds, result.modified, len(model.graph)))
        if name == dump_after:
            assert dump_dir is not None
            path = save_model(model, Path(dump_dir) / f"{index:02d}_{name}.onnx")
            logger.info("wrote %s", path)
    bar.close()
    return model


def _r1c_cause(error: BaseException) -> R1CError | None:
    """The r1c error that an exception chain carries, if any (onnx_ir wraps pre/postcondition errors)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, R1CError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def lower_file(src: str | Path, dst: str | Path, *, target: str, dump_after: str | None = None,
               dump_dir: str | Path | None = None, verbose: bool = False,
               stats: list[PassStats] | None = None, in_place: bool = False, progress: bool = False,
               options: BuildOptions | None = None, max_file_bytes: int | None = None) -> Path:
    """Loads `src`, runs the target's pipeline and writes `dst` (+ its data files, see `save_model` for
    `max_file_bytes`). Used by `r1c build`.

    Weights are never all in memory: onnx_ir keeps external tensors memory-mapped and reads one only when a
    pass needs its values. `in_place=True` (with `dst == src`) rewrites the model file and leaves its data
    files as they are (`save_model_in_place`): what `r1c export` does to canonicalize a fresh export.
    `progress`: a bar on stderr naming the pass that runs. A file that is no usable model is one PassError.
    `options` reach the passes that use build options.
    """
    src, dst = Path(src), Path(dst)
    same_dir = dst.resolve().parent == src.resolve().parent
    if in_place and dst.resolve() != src.resolve():
        raise PassError(f"passes: in_place lowering writes {src} itself, not {dst}")
    if not in_place and same_dir and (dst.name == src.name or dst.name + ".data" == src.name):
        raise PassError(f"passes: writing {dst} would overwrite the model being read")
    model = read_model(src, "passes")
    model = run_pipeline(model, target, dump_after=dump_after, dump_dir=dump_dir, verbose=verbose, stats=stats,
                         progress=progress, options=options)
    if in_place:
        return save_model_in_place(model, src)
    return save_model(model, dst, max_file_bytes=max_file_bytes)
