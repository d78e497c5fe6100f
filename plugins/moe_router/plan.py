"""`r1c::MoERouter` launch plan: the float32 gate GEMM, then the routing kernel of `triton_kernel.py`.

Buffers: inputs 0 hidden [T, H] (float32/bf16/fp16), 1 gate_weight [E, H] float32, 2 correction_bias [E] float32;
outputs 0 topk_weights [T, K] float32, 1 topk_ids [T, K] int32; workspace: the logits [T, E] float32.

The gate GEMM is its own kernel (`_router_logits_kernel`, IEEE float32: no TF32, as the reference) so that the
plugin runs with no PyTorch call at all. Fusing it into the routing kernel would make every program read the whole
[E, H] gate weight (7.3 MB at R1 shapes); apart, its programs split the experts: at T <= 8 one program per
(token, 8 experts) on CUDA cores, the weight read once from HBM (32 programs per token at E = 256), beyond that
32 x 64 tiles through `tl.dot`.
"""

from __future__ import annotations

import dataclasses

import triton
import triton.language as tl

from r1c.plugins.launch import Buf, Plan, WorkspaceBuilder, launch, make_plan

SMALL_T = 8  # up to this many tokens: the CUDA-core path of the gate GEMM


@triton.jit
def _router_logits_kernel(
    x_ptr,  # [T, H]
    w_ptr,  # [E, H] float32
    out_ptr,  # [T, E] float32
    T,
    E,
    H,
    stride_x,
    stride_w,
    stride_o,
    USE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    t_ok = offs_t < T
    e_ok = offs_e < E
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < H
        x = tl.load(x_ptr + offs_t.to(tl.int64)[:, None] * stride_x + kk[None, :],
                    mask=t_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_e.to(tl.int64)[:, None] * stride_w + kk[None, :],
                    mask=e_ok[:, None] & k_ok[None, :], other=0.0)
        if USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * stride_o + offs_e[None, :], acc,
             mask=t_ok[:, None] & e_ok[None, :])


@dataclasses.dataclass(frozen=True)
class RouterProblem:
    tokens: int
    hidden: int
    experts: int
    hidden_dtype: str
    attrs: tuple[tuple[str, object], ...]  # the op's attributes (sorted items)


def router_plan(p: RouterProblem, *, block_t: int = 1, num_warps: int = 4) -> Plan:
    """The whole op for `p` (buffers as in the module docstring)."""
    from r1c.plugins.moe_router.triton_kernel import routing_launch

    ws = WorkspaceBuilder()
    t, e, h = p.tokens, p.experts, p.hidden
    if t == 0:
        return make_plan([], ws)
    logits = ws.add("logits", "float32", (t, e))
    if t <= SMALL_T:
        tiles: dict[str, object] = {"USE_DOT": False, "BLOCK_T": 1, "BLOCK_E": 8, "BLOCK_K": 256}
    else:
        tiles = {"USE_DOT": True, "BLOCK_T": 32, "BLOCK_E": 64, "BLOCK_K": 32}
    gemm = launch("router_logits", _router_logits_kernel,
                  (triton.cdiv(t, tiles["BLOCK_T"]), triton.cdiv(e, tiles["BLOCK_E"])),  # type: ignore[arg-type]
                  {"x_ptr": Buf("in", 0, p.hidden_dtype), "w_ptr": Buf("in", 1, "float32"), "out_ptr": logits,
                   "T": t, "E": e, "H": h, "stride_x": h, "stride_w": h, "stride_o": e},
                  tiles, dynamic=["T"], num_warps=4)
    route = routing_launch(logits, Buf("in", 2, "float32"), Buf("out", 0, "float32"), Buf("out", 1, "int32"), t, e,
                           dict(p.attrs), block_t=block_t, num_warps=num_warps)
    return make_plan([gemm, route], ws)


def config_boundaries() -> list[int]:
    return [SMALL_T]


def workspace_size(p: RouterProblem) -> int:
    """Bytes of workspace for any token count up to p.tokens."""
    return router_plan(p).workspace_size
