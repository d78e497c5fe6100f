"""What the kernels-tier test modules share: importing the Triton kernel modules for the interpreter or natively,
the device the tests run on, seeds, scratch poisoning, and the rerun of a module in a fresh interpreter process.

Where the kernels run: natively on CUDA tensors when a GPU is present (and TRITON_INTERPRET is not set), otherwise in
Triton's interpreter on the CPU. Triton 3.9 decides interpreter-or-compiler when a function is decorated with
`@triton.jit`, reading TRITON_INTERPRET through `triton.knobs.runtime.interpret` — and its own `tl.max`, `tl.sum`,
`tl.sigmoid`, ... are `@triton.jit` functions decorated when `triton` is first imported. So `import_kernels` sets
TRITON_INTERPRET=1 around the first import of triton and of the kernel modules and the `interpreter_env` fixture
sets it while each test runs (the interpreter reads it again at launch), and restores it otherwise: nothing leaks
into the environment of other tests or of subprocesses. If triton was already imported compiled in this process
(`import torch.onnx` imports it through torch._dynamo, so an earlier test module may have), the kernels cannot be
interpreted here: the tests skip, and `rerun_in_interpreter` runs the module again in a child pytest.

Inputs are fresh random every run; the seed is printed and quoted in failures, and R1C_TEST_SEED=<n> replays it.
Outputs and scratch (the workspace regions of a launch plan, and stage outputs) start as NaN (float and fp8) or
2**30 (int32), so an element that a kernel does not write fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = "R1C_KERNEL_TESTS_CHILD"


def native_requested() -> bool:
    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")


def import_kernels(*names: str) -> tuple[list[ModuleType | None], str | None]:
    """(the modules, why the kernels cannot run in this process or None)."""
    if importlib.util.find_spec("triton") is None:
        return [None] * len(names), "triton is not installed"
    native = native_requested()
    # Triton's own jit functions (tl.max, tl.sigmoid, ...) take the mode of triton's first import; kernels
    # decorated later must match it: interpreted if triton is not imported yet or was imported interpreted.
    interpreter_mode = "triton" not in sys.modules or _triton_interpreted()
    previous = os.environ.get("TRITON_INTERPRET")
    if not native and interpreter_mode:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        modules: list[ModuleType | None] = [importlib.import_module(n) for n in names]
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
    from r1c.plugins._triton import is_interpreted

    kernels = [v for m in modules for v in vars(m).values() if hasattr(v, "arg_names") and hasattr(v, "fn")]
    kernels += [v for n in ("r1c.plugins.fp8_triton",) for v in vars(sys.modules[n]).values()
                if hasattr(v, "arg_names") and hasattr(v, "fn")]
    modes = {is_interpreted(k) for k in kernels}
    if len(modes) > 1:
        return modules, "the kernel modules were imported partly for the interpreter, partly compiled"
    interpreted = modes == {True}
    if native and interpreted:
        return modules, "the kernels were imported for the interpreter but CUDA tensors are wanted"
    if not native and not interpreted:
        return modules, ("triton was imported without TRITON_INTERPRET=1 earlier in this process, so its kernels "
                         "cannot run in the interpreter here (the module reruns in a child process)")
    return modules, None


def _triton_interpreted() -> bool:
    """Whether triton was first imported with TRITON_INTERPRET=1 (its own jit functions are interpreter functions)."""
    import triton.language as tl

    from r1c.plugins._triton import is_interpreted

    return is_interpreted(tl.sigmoid)


def poisoned(t: torch.Tensor) -> None:
    """Fill scratch with values no kernel result can be: NaN (float, fp8) or 2**30 (int)."""
    if t.dtype.is_floating_point:
        t.view(torch.uint8).fill_(0xFF) if t.dtype == torch.float8_e4m3fn else t.fill_(float("nan"))
    else:
        t.fill_(2**30)


def poisoned_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    poisoned(t)
    return t


def draw_seed() -> int:
    value = int(os.environ.get("R1C_TEST_SEED") or random.SystemRandom().randrange(2**31))
    torch.manual_seed(value)
    print(f"[kernels] seed={value} (replay: R1C_TEST_SEED={value})")
    return value


def rerun_in_interpreter(test_file: str, problem: str | None) -> None:
    """Run `test_file`'s kernels tests in a child pytest with TRITON_INTERPRET=1 (when they could not run here)."""
    if problem is None:
        pytest.skip("the kernels ran in this process")
    if os.environ.get(CHILD_ENV) or importlib.util.find_spec("triton") is None:
        pytest.skip(problem)
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_ENV: "1"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "pytest", test_file, "-m", "kernels", "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"child pytest failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"


def aot_env() -> dict[str, str]:
    """The environment of a child process that compiles kernels ahead of time (no interpreter)."""
    env = {name: v for name, v in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env
