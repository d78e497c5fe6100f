"""Launch plans: the kernels an r1c op runs for given shapes, as data.

One plan serves every way the kernels are launched, so the launch sequence has one definition:
  * `TritonRunner` runs it through Triton's JIT (CUDA tensors) or its interpreter (CPU tensors): the Python
    wrappers (`moe_experts_triton`, ...), the kernel tests, the GPU check;
  * `r1c.plugins.kernel_library.DriverRunner` launches the same launches from ahead-of-time cubins through the
    CUDA driver: the TensorRT plugins' `enqueue`.
A plan is computed from shapes when they change (TensorRT's `configure_plugin` / `on_shape_change`), never in
`enqueue`; its scratch buffers are regions of one workspace whose size the plugin declares to TensorRT
(`get_workspace_size`), so nothing is allocated and nothing waits for the GPU when the plan runs.

Buffers: `Buf("in", i)` / `Buf("out", i)` are the op's i-th input / output, `Buf("ws", r)` the plan's r-th
workspace region (256-byte aligned, `Region` gives its dtype and shape).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from r1c.plugins._triton import KernelSpec

ALIGN = 256  # bytes: workspace regions (TensorRT's own buffers are at least this aligned)

# torch dtype name -> (Triton pointer type, bytes per element)
DTYPES: dict[str, tuple[str, int]] = {
    "float32": ("*fp32", 4),
    "float16": ("*fp16", 2),
    "bfloat16": ("*bf16", 2),
    "float8_e4m3fn": ("*fp8e4nv", 1),
    "int32": ("*i32", 4),
    "int64": ("*i64", 8),
    "uint8": ("*u8", 1),
}


@dataclasses.dataclass(frozen=True)
class Buf:
    """A buffer argument: the op's input or output `index`, or workspace region `index`, of element type `dtype`."""

    kind: str  # "in" | "out" | "ws"
    index: int
    dtype: str  # torch dtype name (see DTYPES)


@dataclasses.dataclass(frozen=True)
class Region:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the workspace

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype][1]


class WorkspaceBuilder:
    """Lays out scratch buffers one after the other, each 256-byte aligned."""

    def __init__(self) -> None:
        self.regions: list[Region] = []
        self.size = 0

    def add(self, name: str, dtype: str, shape: Sequence[int]) -> Buf:
        shape = tuple(int(d) for d in shape)
        region = Region(name, dtype, shape, self.size)
        self.regions.append(region)
        self.size += -(-region.nbytes // ALIGN) * ALIGN
        return Buf("ws", len(self.regions) - 1, dtype)


Arg = Buf | int | float


@dataclasses.dataclass(frozen=True)
class Launch:
    spec: KernelSpec
    grid: tuple[int, int, int]
    args: tuple[Arg, ...]  # runtime arguments in the kernel's parameter order (no constexprs)


@dataclasses.dataclass(frozen=True)
class Plan:
    launches: tuple[Launch, ...]
    regions: tuple[Region, ...]
    workspace_size: int  # bytes

    def specs(self) -> list[KernelSpec]:
        return [launch.spec for launch in self.launches]


def launch(name: str, kernel: Any, grid: Sequence[int], args: dict[str, Arg], constexprs: dict[str, Any], *,
           dynamic: Iterable[str] = (), num_warps: int = 4, num_stages: int = 3) -> Launch:
    """One launch of `kernel`: `args` holds every runtime argument by name; `dynamic` names the integer arguments
    that vary with the token count (no divisibility hint, so that one compiled kernel serves every count).

    The spec's types come from the arguments (Buf -> its pointer type, int -> i32, float -> fp32); static integers
    that are multiples of 16 get the divisibility hint, as a JIT launch would derive it.
    """
    names = [n for n in kernel.arg_names if n not in constexprs]
    missing, extra = set(names) - set(args), set(args) - set(names)
    if missing or extra:
        raise ValueError(f"launch {name}: missing arguments {sorted(missing)}, unknown {sorted(extra)}")
    dynamic = set(dynamic)
    signature: dict[str, str] = {}
    hints = []
    for n in names:
        v = args[n]
        if isinstance(v, Buf):
            signature[n] = DTYPES[v.dtype][0]
        elif isinstance(v, bool) or not isinstance(v, int | float):
            raise TypeError(f"launch {name}: argument {n}={v!r} is not a buffer, int or float")
        elif isinstance(v, int):
            signature[n] = "i32"
            if not -(2**31) <= v < 2**31:
                raise ValueError(f"launch {name}: argument {n}={v} does not fit in int32")
            if n not in dynamic and v % 16 == 0:
                hints.append(n)
        else:
            signature[n] = "fp32"
    spec = KernelSpec(name, kernel, signature, dict(constexprs), num_warps, num_stages, tuple(hints))
    g = tuple(int(x) for x in grid) + (1,) * (3 - len(grid))
    return Launch(spec, g, tuple(args[n] for n in names))  # type: ignore[arg-type]


def make_plan(launches: Iterable[Launch | None], workspace: WorkspaceBuilder) -> Plan:
    """A plan of the launches that have work (None and empty grids are dropped)."""
    kept = tuple(la for la in launches if la is not None and min(la.grid) > 0)
    return Plan(kept, tuple(workspace.regions), workspace.size)


def workspace_up_to(plan_at: Callable[[int], Plan], max_tokens: int, boundaries: Sequence[int]) -> int:
    """Bytes of workspace for any token count up to `max_tokens`: the largest of each config bucket's largest plan
    (`boundaries`: the largest token count of each bucket; workspace sizes grow with the count inside a bucket)."""
    counts = sorted({t for t in boundaries if 0 < t < max_tokens} | {max_tokens})
    return max(plan_at(t).workspace_size for t in counts)


def specs_up_to(plan_at: Callable[[int], Plan], max_tokens: int, boundaries: Sequence[int]) -> list[KernelSpec]:
    """The specs of the plans at every config bucket's edges up to `max_tokens` (a bucket's plans share specs)."""
    counts = {1, max_tokens}
    for b in boundaries:
        counts |= {b, b + 1}
    specs: dict[str, KernelSpec] = {}
    for t in sorted(c for c in counts if 1 <= c <= max_tokens):
        for s in plan_at(t).specs():
            specs.setdefault(s.key, s)
    return list(specs.values())


# ---- running a plan through Triton (JIT on CUDA tensors, or the interpreter on CPU tensors) ------------------------
def region_views(plan: Plan, workspace: Any, init: Callable[[Any], None] | None = None) -> list[Any]:
    """Typed torch views of the plan's workspace regions in `workspace` (a uint8 tensor of >= workspace_size)."""
    import torch

    if workspace.numel() < plan.workspace_size or workspace.dtype != torch.uint8:
        raise ValueError(f"workspace: need {plan.workspace_size} bytes of uint8, got {workspace.numel()} "
                         f"{workspace.dtype}")
    views = []
    for r in plan.regions:
        view = workspace[r.offset:r.offset + r.nbytes].view(getattr(torch, r.dtype)).view(r.shape)
        if init is not None:
            init(view)
        views.append(view)
    return views


class TritonRunner:
    """Runs plans with the `@triton.jit` kernels (compiled on the first call of each spec, or interpreted)."""

    def __init__(self, empty: Callable[..., Any] | None = None, init: Callable[[Any], None] | None = None) -> None:
        self.empty = empty  # workspace allocator (default torch.empty); tests poison regions through `init`
        self.init = init

    def run(self, plan: Plan, inputs: Sequence[Any], outputs: Sequence[Any], workspace: Any = None) -> None:
        import torch

        device = (list(inputs) + list(outputs))[0].device
        if workspace is None:
            alloc = self.empty or (lambda n, dt, dev: torch.empty(n, dtype=dt, device=dev))
            workspace = alloc((max(plan.workspace_size, 1),), torch.uint8, device)
        views = region_views(plan, workspace, self.init)
        table = {"in": list(inputs), "out": list(outputs), "ws": views}
        for la in plan.launches:
            s = la.spec
            args = {n: table[a.kind][a.index] if isinstance(a, Buf) else a for n, a in zip(s.arg_names(), la.args)}
            s.kernel[la.grid](**args, **s.constexprs, num_warps=s.num_warps, num_stages=s.num_stages)
