"""What the Triton kernel modules share: interpreter detection, kernel specs and ahead-of-time compilation for CUDA.

A `KernelSpec` names one compiled instance of a `@triton.jit` kernel: the types of its runtime arguments, its
constexpr values, the 16-divisibility hints of its integer arguments and its launch options. Launch plans
(`r1c.plugins.launch`) are made of specs; `compile_aot` turns a spec into a cubin on any machine (Triton's own
LLVM and the ptxas it ships: no GPU or driver needed), and `r1c.plugins.kernel_library` stores the cubins in a
bundle and launches them through the CUDA driver with no Triton at run time.

Works with Triton 3.6 (the H200 image) and 3.9 (this project's pin): only `ASTSource`, `triton.compile`,
`GPUTarget` and `CompiledKernel.asm`/`.metadata` are used, and the kernel's parameter list is read back from
the PTX (`ptx_params`), so the scratch-pointer parameters newer Triton releases append are found, not assumed.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import triton


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` runs in Triton's interpreter (triton was imported with TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def _is_kernel_function(obj: Any) -> bool:
    """A `@triton.jit` function, compiled or interpreted (both wrap the Python function as `.fn`)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(obj, (JITFunction, InterpretedFunction))


@functools.cache
def _source(kernel: Any) -> str:
    """The source of `kernel` and of every `@triton.jit` function it calls, transitively (found by the global names
    each body uses: a callee reached as `module.fn(...)` is not found), the kernel first, then its callees by name:
    an edit to a helper changes the key of every kernel that inlines it. Cached per kernel (a module global): keys are
    taken on every plan change of a plugin.

    Not `JITFunction.cache_key`: that also hashes the Triton version, and the library built with one Triton must be
    found by a serving machine with another."""
    root = getattr(kernel, "fn", kernel)  # JITFunction / InterpretedFunction -> the Python function
    callees: dict[str, str] = {}
    todo = [root]
    seen = {id(root)}
    while todo:
        fn = todo.pop()
        for name in fn.__code__.co_names:
            obj = fn.__globals__.get(name)
            if _is_kernel_function(obj) and id(obj.fn) not in seen:
                seen.add(id(obj.fn))
                callees[f"{obj.fn.__module__}.{obj.fn.__qualname__}"] = inspect.getsource(obj.fn)
                todo.append(obj.fn)
    return "\n".join([inspect.getsource(root), *(callees[k] for k in sorted(callees))])


class KernelSpec(NamedTuple):
    """One kernel instance: its runtime argument types, its constexpr values and its launch options.

    `signature`: runtime argument name -> Triton type ("*fp8e4nv", "*fp32", "i32", "fp32", ...), every
    non-constexpr parameter of the kernel. `divisible_by_16`: the integer arguments whose value is always a
    multiple of 16 (pointers always get the hint: every buffer r1c launches on is 256-byte aligned).
    """

    name: str
    kernel: Any  # a @triton.jit kernel
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    divisible_by_16: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """A stable identity (kernel source, types, constexprs, hints, options): the kernel library's lookup key."""
        blob = json.dumps({
            "source": _source(self.kernel),
            "signature": self.signature,
            "constexprs": {k: repr(v) for k, v in sorted(self.constexprs.items())},
            "divisible_by_16": sorted(self.divisible_by_16),
            "num_warps": self.num_warps,
            "num_stages": self.num_stages,
        }, sort_keys=True)
        return f"{self.name}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"

    def arg_names(self) -> list[str]:
        """The runtime arguments in the kernel's parameter order (constexprs left out)."""
        return [n for n in self.kernel.arg_names if n not in self.constexprs]


def compile_aot(spec: KernelSpec, capability: int = 90) -> Any:
    """Compile `spec` for CUDA sm_<capability>; returns the `CompiledKernel` (`.asm`: "ttir", "ttgir", "llir",
    "ptx", "cubin"; `.metadata`: name, shared memory, num_warps, scratch sizes).

    Needs a process that imported triton without TRITON_INTERPRET=1. Pointers and the integers of
    `spec.divisible_by_16` get the 16-divisibility hint that a JIT launch derives from the values (it decides
    whether loads vectorize, and so whether they can be pipelined with cp.async).
    """
    from triton.backends.compiler import GPUTarget

    if is_interpreted(spec.kernel):
        raise RuntimeError("compile_aot: triton was imported with TRITON_INTERPRET=1 in this process")
    fn = spec.kernel
    missing = [n for n in fn.arg_names if n not in spec.constexprs and n not in spec.signature]
    if missing:
        raise ValueError(f"compile_aot: {spec.name}: no type or constexpr value for {missing}")
    signature = {name: ("constexpr" if name in spec.constexprs else spec.signature[name]) for name in fn.arg_names}
    hinted = [i for i, n in enumerate(fn.arg_names) if signature[n].startswith("*") or n in spec.divisible_by_16]
    attrs = {(i,): [["tt.divisibility", 16]] for i in hinted}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=dict(spec.constexprs), attrs=attrs)
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.S)
_PARAM = re.compile(r"\.param\s+\.(\w+)")


def ptx_params(ptx: str) -> tuple[str, list[str]]:
    """(entry function name, PTX type of each kernel parameter in order: "u64" for pointers, "u32", "f32", ...)."""
    m = _ENTRY.search(ptx)
    if m is None:
        raise ValueError("ptx_params: no .entry in the PTX")
    return m.group(1), _PARAM.findall(m.group(2))


def ptxas_resources(ptx: str, capability: int = 90) -> dict[str, int]:
    """Registers, spill bytes and stack of the PTX's kernel as `ptxas -v` reports them (Triton's bundled ptxas).

    Spills in a GEMM's main loop cost an order of magnitude in throughput; this is the CPU-side check for them.
    """
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(capability).path
    except TypeError:  # Triton < 3.7: get_ptxas() takes no architecture
        ptxas = get_ptxas().path  # type: ignore[call-arg]
    arch = f"sm_{capability}a" if capability == 90 else f"sm_{capability}"
    with tempfile.TemporaryDirectory(prefix="r1c-ptxas-") as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True, check=False)
    text = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {text.strip()[-500:]}")

    def num(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    return {
        "registers": num(r"Used (\d+) registers"),
        "spill_stores": num(r"(\d+) bytes spill stores"),
        "spill_loads": num(r"(\d+) bytes spill loads"),
        "stack_frame": num(r"(\d+) bytes stack frame"),
    }
