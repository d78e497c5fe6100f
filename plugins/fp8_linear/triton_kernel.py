"""`r1c::FP8Linear` in Triton: the Python entry point over `plan.py`, run through Triton (JIT on CUDA tensors, the
interpreter on CPU tensors when TRITON_INTERPRET=1 was set before triton's first import). The TensorRT plugin
runs the same plan from ahead-of-time cubins.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from r1c.plugins._triton import is_interpreted
from r1c.plugins.fp8 import BLOCK
from r1c.plugins.fp8_linear.kernels import _fp8_linear_kernel
from r1c.plugins.fp8_linear.plan import LinearConfig, LinearProblem, linear_plan, select_config
from r1c.plugins.launch import TritonRunner

__all__ = ["LinearConfig", "LinearProblem", "fp8_linear_triton", "select_config"]

# Called on every workspace region before the kernels run (the tests poison scratch memory with it).
scratch_init: Callable[[torch.Tensor], None] | None = None


def fp8_linear_triton(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, *,
                      config: LinearConfig | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(weight [N, K] FP8, weight_scale [cdiv(N,128), cdiv(K,128)])^T, in x's
    dtype; activations quantized to FP8 per token and 128 channels. Raises ValueError on bad inputs."""
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"FP8Linear: x must be float32/bf16/fp16, got {x.dtype}")
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"FP8Linear: weight must be a float8_e4m3fn [N, K] matrix, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    want = (-(-n // BLOCK), -(-k // BLOCK))
    if x.shape[-1] != k or tuple(weight_scale.shape) != want or weight_scale.dtype != torch.float32:
        raise ValueError(f"FP8Linear: x {tuple(x.shape)} needs K={k} channels and weight_scale float32 {want}, got "
                         f"{weight_scale.dtype} {tuple(weight_scale.shape)}")
    if x.device.type != "cuda" and not is_interpreted(_fp8_linear_kernel):
        raise RuntimeError("FP8Linear (triton): tensors are on the CPU but triton was imported without "
                           "TRITON_INTERPRET=1")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if out is None:
        out = torch.empty(*lead, n, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (*lead, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("FP8Linear: out must be a contiguous [..., N] tensor in x's dtype")
    p = LinearProblem(m, k, n, str(x.dtype).removeprefix("torch."))
    TritonRunner(init=scratch_init).run(linear_plan(p, config), [x2, weight.contiguous(), weight_scale.contiguous()],
                                        [out.view(m, n)])
    return out
