"""What the Triton kernel modules share: interpreter detection and ahead-of-time compilation for CUDA."""

from __future__ import annotations

from typing import Any, NamedTuple

import triton


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` runs in Triton's interpreter (triton was imported with TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


class AotSpec(NamedTuple):
    """One kernel instance to compile ahead of time: its runtime argument types and its constexpr values."""

    name: str
    kernel: Any  # a @triton.jit kernel
    signature: dict[str, str]  # runtime arguments: "*fp8e4nv", "*fp32", "i32", ...
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] = ()  # integer arguments that are multiples of 16 (as the JIT would see them)


def compile_aot(spec: AotSpec, capability: int = 90) -> Any:
    """Compile `spec` for CUDA sm_<capability> on any machine (no GPU or driver needed: Triton's own LLVM and the
    ptxas it ships). Returns the `CompiledKernel`; `.asm` holds "ttir", "ttgir", "llir", "ptx" and "cubin".

    Needs a process that imported triton without TRITON_INTERPRET=1 (see the module docstring). Pointers and the
    integers of `spec.divisible_by_16` get the 16-divisibility hint that a JIT launch derives from the values (it
    decides whether loads vectorize, and so whether they can be pipelined with cp.async).
    """
    from triton.backends.compiler import GPUTarget

    if is_interpreted(spec.kernel):
        raise RuntimeError("compile_aot: triton was imported with TRITON_INTERPRET=1 in this process")
    fn = spec.kernel
    signature = {name: ("constexpr" if name in spec.constexprs else spec.signature[name]) for name in fn.arg_names}
    hinted = [i for i, n in enumerate(fn.arg_names) if signature[n].startswith("*") or n in spec.divisible_by_16]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
