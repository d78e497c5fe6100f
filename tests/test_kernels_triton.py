"""kernels tier: the Triton kernels of `r1c::MoERouter` and `r1c::MoEExperts` against their PyTorch references.

Where they run (natively on CUDA tensors when a GPU is present, otherwise in Triton's interpreter), seeds and scratch
poisoning: see `kernels_support.py`. Every scratch buffer (the plan's workspace regions, through
`triton_kernel.scratch_init`, and stage outputs, through `triton_kernel._empty`) starts poisoned, so an element
that a kernel does not write fails.

Tolerances, and why:
* Router: the logits come from the same float32 matmul as the reference's, so ids must match exactly. Only the
  sigmoid may differ by an ulp or two (numpy's exp in the interpreter, ex2.approx on sm_90), so inputs are redrawn
  until every decision is robust: consecutive sorted selection scores (and group scores) differ by >= 1e-5 or are
  equal because the experts (groups) are exact twins — which the inputs always contain, to test the lower-index tie
  rule. Weights: rtol 1e-5 (a few ulps of sigmoid, sum order, division).
* Experts, FP8 sorted path: the kernels quantize activations (hidden, and the SwiGLU output) to e4m3 in 1x128
  groups; the reference uses them unquantized. e4m3 keeps 3 mantissa bits: round-to-nearest has relative error up to
  2^-4 (RMS ~2.5-3.5% depending on the position in the binade), and two quantized GEMM inputs add in quadrature to
  ~4% of the output's norm (measured 3.9-4.5%). Against the exact reference: relative Frobenius error <= 8% and per
  row <= 15%. Against a float64 reference that applies the same 1x128 quantization, elementwise: 1e-5 of the sum of
  |products| (float32 accumulation), plus one e4m3 step for every SwiGLU value that lies within float32 noise of a
  rounding midpoint (the kernel may round it the other way: rare, but one such flip moved an output by 1.6e-3 of
  max|out|), plus, for bf16 hidden, 2^-7 of the bf16-rounded slot outputs and sum.
  Stage by stage: hidden's FP8 codes and scales bitwise equal to `quantize_act_1x128_reference`; each kernel SwiGLU
  value within half an e4m3 step (+ 1e-5 of its group's max for float32 noise) of the float64 value computed from
  the same FP8 hidden; GEMM2 + combine from the kernel's own FP8 SwiGLU output within 1e-5 of the sum of |products|.
* Experts, decode path and quant="none" with float32 weights: no activation quantization: 1e-5 of max|ref|.
  bf16 weights and hidden: the SwiGLU output, each slot's output and the sum are rounded to bf16 — by truncation in
  the interpreter, whose float32 -> bf16 conversion rounds toward zero, so the errors do not average out: 3 x 2^-7,
  3e-2 relative Frobenius (measured ~1e-2; on a GPU the roundings are to nearest).
* Native GPU runs add FP8 tensor-core accumulation (about 14 bits kept inside a 128-deep block) and approximate
  exp/division in the sigmoid: the 1e-5 accumulation terms above become 2e-3, the exact-path 1e-5 becomes 1e-4
  (these native tolerances have not been run on a GPU yet).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from kernels_support import draw_seed, import_kernels, native_requested, poisoned, poisoned_empty, rerun_in_interpreter

from r1c.plugins.fp8 import dequantize, quantize
from r1c.plugins.moe_experts.reference import moe_experts_reference
from r1c.plugins.moe_router.reference import moe_router_reference

pytestmark = [
    pytest.mark.kernels,
    # the interpreter evaluates sigmoid as 1 / (1 + exp(-x)) in numpy: exp overflows to inf for very negative x,
    # which gives the right 0
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

(router_tk, experts_tk), _PROBLEM = import_kernels("r1c.plugins.moe_router.triton_kernel",
                                                   "r1c.plugins.moe_experts.triton_kernel")
NATIVE = native_requested() and _PROBLEM is None
DEVICE = torch.device("cuda" if NATIVE else "cpu")
needs_kernels = pytest.mark.skipif(_PROBLEM is not None, reason=str(_PROBLEM))


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """While a test of this module runs, TRITON_INTERPRET matches how the kernels were imported: the interpreter
    reads it again at launch time (e.g. its lazy import of triton.experimental.gluon asserts on it)."""
    if _PROBLEM is None and not NATIVE:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def seed() -> int:
    return draw_seed()


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every scratch buffer and stage output of the experts kernels starts poisoned."""
    assert experts_tk is not None
    monkeypatch.setattr(experts_tk, "_empty", poisoned_empty)
    monkeypatch.setattr(experts_tk, "scratch_init", poisoned)


def _nan(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


# ==============================================================================================================
# router

ROUTER_CASES = {
    # name: (T, H, E, n_group, topk_group, top_k, norm, scoring, bias, hidden dtype, block_t, topk_method)
    "r1-like": (33, 64, 64, 8, 4, 8, 1, "sigmoid", "mixed", torch.float32, 4, "noaux_tc"),
    "n_group-1": (9, 32, 16, 1, 1, 4, 1, "sigmoid", "mixed", torch.float32, 1, "noaux_tc"),
    "top_k-fills-kept-groups": (9, 32, 16, 4, 2, 8, 1, "sigmoid", "mixed", torch.float32, 2, "noaux_tc"),
    "negative-bias-no-norm": (17, 32, 32, 4, 2, 6, 0, "sigmoid", "negative", torch.float32, 4, "noaux_tc"),
    "group-size-6-E-24": (7, 24, 24, 4, 3, 5, 1, "sigmoid", "mixed", torch.float32, 1, "noaux_tc"),
    "one-expert-per-group": (7, 16, 8, 8, 4, 3, 1, "sigmoid", "mixed", torch.float32, 1, "noaux_tc"),
    "softmax": (9, 32, 16, 1, 1, 6, 0, "softmax", "zero", torch.float32, 2, "noaux_tc"),
    "bf16-hidden": (9, 64, 32, 4, 2, 4, 1, "sigmoid", "mixed", torch.bfloat16, 4, "noaux_tc"),
    "kimi-k2-384-experts": (5, 32, 384, 1, 1, 8, 1, "sigmoid", "mixed", torch.float32, 1, "noaux_tc"),
    # DeepSeek-V2 modes: no bias read (a mixed one is passed), max group score, dropped experts' s = 0
    "v2-greedy": (9, 32, 16, 4, 2, 6, 0, "softmax", "mixed", torch.float32, 2, "greedy"),
    "v2-group-limited-greedy": (17, 32, 32, 8, 3, 6, 0, "softmax", "mixed", torch.float32, 4, "group_limited_greedy"),
    "v2-glg-top_k-fills-kept": (9, 32, 16, 4, 2, 8, 0, "softmax", "zero", torch.float32, 1, "group_limited_greedy"),
    "v2-glg-group-size-6": (7, 24, 24, 4, 3, 5, 0, "softmax", "mixed", torch.float32, 1, "group_limited_greedy"),
    "sigmoid-greedy": (9, 32, 16, 4, 2, 4, 0, "sigmoid", "mixed", torch.float32, 1, "greedy"),
}
_TIE_GAP = 1e-5


def _draw_hidden(t: int, h: int) -> torch.Tensor:
    # multiples of 1/16 and 1/8: every logit is an exact float32 sum, whatever the matmul's order
    return torch.randint(-8, 9, (t, h)).float() / 16


def _router_inputs(t: int, h: int, e: int, n_group: int, bias_kind: str) -> tuple[torch.Tensor, ...]:
    gate = torch.randint(-8, 9, (e, h)).float() / 8 / math.sqrt(h / 16)
    gate = torch.round(gate * 64) / 64
    if bias_kind == "mixed":
        bias = torch.randn(e) * 0.1
    elif bias_kind == "negative":
        bias = -(torch.rand(e) * 0.5 + 0.1)
    else:
        bias = torch.zeros(e)
    per_group = e // n_group
    # exact twins: expert 2 := expert 0 (same group when groups are >= 3 wide), and the last group := group 0
    if e >= 3:
        gate[2], bias[2] = gate[0], bias[0]
    if n_group > 1:
        gate[e - per_group :], bias[e - per_group :] = gate[:per_group], bias[:per_group]
    return _draw_hidden(t, h), gate, bias


def _fragile_rows(hidden: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, cfg: tuple[Any, ...]) -> list[int]:
    """Rows whose routing could change if the scores moved by a few ulps (see the module docstring)."""
    _, _, e, n_group, topk_group, top_k, _, scoring, _, _, _, method = cfg
    v3 = method == "noaux_tc"
    if method == "greedy":
        n_group, topk_group = 1, 1
    logits = hidden.float() @ gate.float().t()
    s = logits.sigmoid() if scoring == "sigmoid" else logits.softmax(dim=-1)
    c = s + bias if v3 else s
    per_group = e // n_group
    fragile = []

    def unstable(d: float, same: bool) -> bool:
        return (0 < d < _TIE_GAP) or (d == 0 and not same)

    for r in range(c.shape[0]):
        key = [(float(logits[r, i]), float(bias[i])) for i in range(e)]
        cr = [float(v) for v in c[r]]
        bad = False
        masked = list(cr)
        if n_group > 1:
            scores, tops = [], []
            for g in range(n_group):
                members = sorted(range(g * per_group, (g + 1) * per_group), key=lambda i: (-cr[i], i))
                top = members[:2] if v3 else members[:1]
                tops.append(sorted(key[i] for i in top))
                scores.append(
                    float(torch.tensor(cr[top[0]]) + torch.tensor(cr[top[-1]])) if len(top) == 2 else cr[top[0]]
                )
                if len(members) > len(top):
                    n = len(top)
                    bad |= unstable(cr[members[n - 1]] - cr[members[n]], key[members[n - 1]] == key[members[n]])
            order = sorted(range(n_group), key=lambda g: (-scores[g], g))
            for a, b in itertools.pairwise(order[: topk_group + 1]):
                bad |= unstable(scores[a] - scores[b], tops[a] == tops[b])
            kept = set(order[:topk_group])
            masked = [v if i // per_group in kept else -math.inf if v3 else 0.0 for i, v in enumerate(cr)]
        order_e = sorted(range(e), key=lambda i: (-masked[i], i))
        for a, b in itertools.pairwise(order_e[: top_k + 1]):
            if masked[b] != -math.inf:
                bad |= unstable(masked[a] - masked[b], key[a] == key[b])
        if bad:
            fragile.append(r)
    return fragile


@needs_kernels
@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_router_matches_reference(case: str, seed: int) -> None:
    assert router_tk is not None
    cfg = ROUTER_CASES[case]
    t, h, e, n_group, topk_group, top_k, norm, scoring, bias_kind, dtype, block_t, method = cfg
    hidden, gate, bias = _router_inputs(t, h, e, n_group, bias_kind)
    for _ in range(200):
        rows = _fragile_rows(hidden, gate, bias, cfg)
        if not rows:
            break
        hidden[rows] = _draw_hidden(len(rows), h)
    else:
        pytest.fail(f"[seed {seed}] could not draw tie-robust router inputs")
    attrs: dict[str, Any] = dict(
        top_k=top_k, n_group=n_group, topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=norm,
        topk_method=method,
    )
    hidden = hidden.to(dtype)
    w_ref, ids_ref = moe_router_reference(hidden, gate, bias, **attrs, scoring=scoring)
    out = (_nan((t, top_k)), torch.full((t, top_k), -1, dtype=torch.int32, device=DEVICE))
    w, ids = router_tk.moe_router_triton(
        hidden.to(DEVICE), gate.to(DEVICE), bias.to(DEVICE), **attrs, scoring=scoring, block_t=block_t, out=out
    )
    assert w.data_ptr() == out[0].data_ptr() and ids.data_ptr() == out[1].data_ptr()
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    ids, w = ids.cpu(), w.cpu()
    bad_rows = (ids != ids_ref).any(dim=1).nonzero().flatten().tolist()
    assert not bad_rows, f"[seed {seed}] {case}: ids differ in rows {bad_rows}: {ids[bad_rows]} vs {ids_ref[bad_rows]}"
    torch.testing.assert_close(w, w_ref, rtol=1e-5, atol=1e-7, msg=lambda m: f"[seed {seed}] {case}: {m}")


@needs_kernels
def test_router_rejects_bad_attributes() -> None:
    assert router_tk is not None
    hidden, gate, bias = torch.zeros(2, 8), torch.zeros(16, 8), torch.zeros(16)
    good = dict(top_k=4, n_group=4, topk_group=2, routed_scaling_factor=1.0, norm_topk_prob=1)
    for bad in (dict(n_group=5), dict(topk_group=5), dict(top_k=9), dict(top_k=0)):
        with pytest.raises(ValueError):
            router_tk.moe_router_triton(hidden, gate, bias, **(good | bad))
    with pytest.raises(ValueError):
        router_tk.moe_router_triton(hidden, gate, bias, **good, scoring="tanh")
    with pytest.raises(ValueError, match="topk_method 'top_p'"):
        router_tk.moe_router_triton(hidden, gate, bias, **good, topk_method="top_p")
    with pytest.raises(ValueError, match="norm_topk_prob=1 with topk_method 'greedy'"):  # the V2 ambiguity
        router_tk.moe_router_triton(hidden, gate, bias, **good, topk_method="greedy", scoring="softmax")


# ==============================================================================================================
# experts: inputs and references


def _experts_inputs(
    t: int, k: int, e: int, h: int, i: int, pattern: str, hidden_dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random hidden and weights with magnitudes varying per 128-block (so that a wrong scale index shows), and
    routings: "uniform" (k distinct experts per token), "ragged" (expert 0 takes slot 0 of ~60% of the tokens, the
    last two experts get nothing), "dup" (experts drawn with replacement: a token may pick one twice)."""

    def block_gain(*shape: int) -> torch.Tensor:
        gain = torch.exp2(torch.randint(-3, 4, shape).float())
        for dim in range(1, len(shape)):
            gain = gain.repeat_interleave(128, dim=dim)
        return gain

    hidden = torch.randn(t, h) * block_gain(t, -(-h // 128))[:, :h]
    w13 = torch.randn(e, 2 * i, h) / math.sqrt(h) * block_gain(e, -(-2 * i // 128), -(-h // 128))[:, : 2 * i, :h]
    w2 = torch.randn(e, h, i) / math.sqrt(i) * block_gain(e, -(-h // 128), -(-i // 128))[:, :h, :i]
    if pattern == "uniform":
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    elif pattern == "ragged":
        ids = torch.stack([1 + torch.randperm(e - 3)[:k] for _ in range(t)])
        ids[: (t * 3) // 5, 0] = 0
    elif pattern == "dup":
        ids = torch.randint(0, e, (t, k))
    else:
        raise ValueError(pattern)
    return {
        "hidden": hidden.to(hidden_dtype),
        "topk_weights": torch.rand(t, k) + 0.1,
        "topk_ids": ids.to(torch.int32),
        "w13": w13,
        "w2": w2,
    }


def _fp8_weights(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    q13, s13 = quantize(x["w13"])
    q2, s2 = quantize(x["w2"])
    return {"w13": q13, "w2": q2, "w13_scale": s13, "w2_scale": s2}


def _dequant_act(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float64 values of 1x128-quantized rows: q [N, C] fp8, scale [N, cdiv(C, 128)]."""
    return q.double() * scale.double().repeat_interleave(128, dim=1)[:, : q.shape[1]]


def _per_expert(ids: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    flat = ids.reshape(-1).long()
    for ex in flat.unique().tolist():
        yield ex, (flat == ex).nonzero().flatten()


def _swiglu64(x: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """float64 SwiGLU output of every pair (in pair order) from float64 hidden x [T, H] and w13 [E, 2I, H]."""
    k = ids.shape[1]
    inter = w13.shape[1] // 2
    act = torch.zeros(ids.numel(), inter, dtype=torch.float64)
    for ex, pairs in _per_expert(ids):
        gu = x[pairs // k] @ w13[ex].t()
        act[pairs] = F.silu(gu[:, :inter]) * gu[:, inter:]
    return act


def _combine64(
    act: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From per-pair act [T*K, I], float64: (out [T, H], sum over slots of |slot output|, sum of |products|)."""
    t, k = ids.shape
    out = torch.zeros(t, w2.shape[1], dtype=torch.float64)
    slots = torch.zeros_like(out)
    mag = torch.zeros_like(out)
    wflat = weights.reshape(-1).double()
    for ex, pairs in _per_expert(ids):
        y = (act[pairs] @ w2[ex].t()) * wflat[pairs, None]
        out.index_add_(0, pairs // k, y)
        slots.index_add_(0, pairs // k, y.abs())
        mag.index_add_(0, pairs // k, (act[pairs].abs() @ w2[ex].t().abs()) * wflat[pairs, None].abs())
    return out, slots, mag


def _e4m3_grid(act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For float64 rows quantized 1x128 (scale = group amax / 448): the scale of every element, |act| / scale, and
    the e4m3 step at that value (in scaled units)."""
    n, i = act.shape
    groups = -(-i // 128)
    pad = torch.zeros(n, groups * 128, dtype=torch.float64)
    pad[:, :i] = act
    amax = pad.view(n, groups, 128).abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax)).repeat_interleave(128, dim=1)[:, :i]
    v = (act / scale).abs()
    return scale, v, torch.exp2(torch.floor(torch.log2(v.clamp_min(2.0**-6))) - 3)


def _matched_reference(x: dict[str, torch.Tensor], w: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """The op with the kernels' activation quantization (hidden and SwiGLU output, 1x128, e4m3), else float64.
    Returns (output, sum over slots of |slot output|, sum of |products|, flip bound): the flip bound is what the
    output may move if every SwiGLU value that sits within float32 noise of an e4m3 rounding midpoint rounded the
    other way in the kernel (one e4m3 step each)."""
    assert experts_tk is not None
    xq, xs = experts_tk.quantize_act_1x128_reference(x["hidden"])
    w13 = dequantize(w["w13"], w["w13_scale"]).double()
    w2 = dequantize(w["w2"], w["w2_scale"]).double()
    ids, weights = x["topk_ids"], x["topk_weights"]
    act = _swiglu64(_dequant_act(xq, xs), ids, w13)
    aq, as_ = experts_tk.quantize_act_1x128_reference(act.float())
    out, slots, mag = _combine64(_dequant_act(aq, as_), ids, weights, w2)
    scale, v, step = _e4m3_grid(act)
    to_midpoint = ((v / step) - torch.floor(v / step) - 0.5).abs() * step
    near = to_midpoint <= (2e-3 if NATIVE else 1e-5) * 448  # noise relative to the group's amax, in scaled units
    flips = _combine64(torch.where(near, step * scale, 0.0), ids, weights.abs(), w2.abs())[0]
    return out, slots, mag, flips


def _exact_fp8(x: dict[str, torch.Tensor], w: dict[str, torch.Tensor]) -> torch.Tensor:
    """The op's PyTorch reference: FP8 weights dequantized, activations unquantized."""
    args = (x["hidden"], x["topk_weights"], x["topk_ids"], w["w13"], w["w2"], w["w13_scale"], w["w2_scale"])
    return moe_experts_reference(*args, quant="fp8_block128")


def _to(d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: v.to(DEVICE) for name, v in d.items()}


def _run_experts(x: dict[str, torch.Tensor], w: dict[str, torch.Tensor], quant: str, **kw: Any) -> torch.Tensor:
    assert experts_tk is not None
    t, h = x["hidden"].shape
    out = _nan((t, h), x["hidden"].dtype)
    xd, wd = _to(x), _to(w)
    res = experts_tk.moe_experts_triton(
        xd["hidden"], xd["topk_weights"], xd["topk_ids"], wd["w13"], wd["w2"],
        wd.get("w13_scale"), wd.get("w2_scale"), quant=quant, out=out, **kw,
    )  # fmt: skip
    assert res.data_ptr() == out.data_ptr()
    return res.cpu()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ==============================================================================================================
# experts: stages


def _expected_alignment(ids: torch.Tensor, e: int, block_m: int, max_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = ids.reshape(-1).long()
    sorted_ids = torch.full((max_rows,), flat.numel(), dtype=torch.int32)
    block_expert = torch.full((max_rows // block_m,), -1, dtype=torch.int32)
    row = 0
    for ex in range(e):
        pairs = (flat == ex).nonzero().flatten()
        sorted_ids[row : row + pairs.numel()] = pairs.to(torch.int32)
        blocks = -(-pairs.numel() // block_m)
        block_expert[row // block_m : row // block_m + blocks] = ex
        row += blocks * block_m
    return sorted_ids, block_expert


@needs_kernels
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize(("t", "k", "e", "pattern", "block_m"), [
    (40, 4, 8, "ragged", 16), (13, 3, 6, "uniform", 32), (5, 8, 70, "dup", 16), (1, 1, 3, "uniform", 64),
])  # fmt: skip
def test_align(t: int, k: int, e: int, pattern: str, block_m: int, seed: int) -> None:
    assert experts_tk is not None
    ids = _experts_inputs(t, k, e, 128, 128, pattern)["topk_ids"]
    align = experts_tk.moe_align(ids.to(DEVICE), e, block_m, chunk=16, sub=8)
    max_rows = experts_tk.max_sorted_rows(t * k, e, block_m)
    want_sorted, want_blocks = _expected_alignment(ids, e, block_m, max_rows)
    assert torch.equal(align.sorted_ids.cpu(), want_sorted), f"[seed {seed}] sorted_ids"
    assert torch.equal(align.block_expert.cpu(), want_blocks), f"[seed {seed}] block_expert"


@needs_kernels
@pytest.mark.usefixtures("poison")
def test_quantize_act_1x128_matches_reference_bitwise(seed: int) -> None:
    assert experts_tk is not None
    x = torch.randn(6, 300) * torch.exp2(torch.randint(-20, 12, (6, 300)).float())
    x[0] = 0.0  # an all-zero row: scale 1
    x[1, :128] = torch.linspace(-1e-3, 1e-3, 128)  # e4m3 subnormals after scaling
    x[1, 5] = 448.0
    grid = torch.tensor([1.0, 1.0625, 1.125, 1.1875, 1.25, 1.3125, 2.25, 0.0029296875, 0.0048828125])
    x[2, 128:256] = 0.0
    x[2, 128:137] = grid  # scale 1 (amax 448 below): exact halfway cases, ties to even
    x[2, 137] = 448.0
    x[3, 256:] = torch.tensor([31.9, -125.06, 7.76, 0.0014648, 17.3, -240.0, 448.0, 1.0, 2.0, 3.0, 5.0, -7.0] * 4)[:44]
    q, s = experts_tk.quantize_act_1x128(x.to(DEVICE))
    q_ref, s_ref = experts_tk.quantize_act_1x128_reference(x)
    assert torch.equal(s.cpu(), s_ref), f"[seed {seed}] scales differ"
    diff = (q.cpu().float() != q_ref.float()).nonzero()
    assert diff.numel() == 0, f"[seed {seed}] fp8 codes differ at {diff[:8].tolist()}: x={x[tuple(diff[:8].t())]}"
    for dtype in (torch.bfloat16, torch.float16):
        q, s = experts_tk.quantize_act_1x128(x.to(dtype).to(DEVICE))
        q_ref, s_ref = experts_tk.quantize_act_1x128_reference(x.to(dtype))
        assert torch.equal(s.cpu(), s_ref) and torch.equal(q.cpu().float(), q_ref.float()), f"[seed {seed}] {dtype}"


SORTED_CASES = {
    # name: (T, K, E, H, I, pattern, block_m, hidden dtype)
    "uniform-auto-block": (9, 2, 4, 256, 128, "uniform", None, torch.float32),
    "ragged-empty-experts-m16": (40, 4, 8, 384, 256, "ragged", 16, torch.float32),
    "partial-128-blocks-m32": (13, 3, 6, 200, 160, "uniform", 32, torch.float32),
    "bf16-hidden-m64": (20, 2, 3, 256, 128, "dup", 64, torch.bfloat16),
}


@needs_kernels
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("case", list(SORTED_CASES))
def test_experts_fp8_sorted_path(case: str, seed: int) -> None:
    assert experts_tk is not None
    t, k, e, h, i, pattern, block_m, dtype = SORTED_CASES[case]
    x = _experts_inputs(t, k, e, h, i, pattern, dtype)
    w = _fp8_weights(x)
    tag = f"[seed {seed}] {case}"

    out = _run_experts(x, w, "fp8_block128", path="sorted", block_m=block_m)
    assert out.dtype == dtype and not out.isnan().any(), f"{tag}: unwritten (NaN) output"
    exact = _exact_fp8(x, w)
    matched, slot_abs, mag, flips = _matched_reference(x, w)
    err_exact = _rel(out, exact)
    row_err = ((out.double() - exact.double()).norm(dim=1) / exact.double().norm(dim=1)).max().item()
    err_matched = float((out.double() - matched).abs().max() / matched.abs().max())
    print(f"{tag}: vs exact {err_exact:.3e} (worst row {row_err:.3e}), vs matched quantization {err_matched:.3e}")
    assert err_exact <= 0.08 and row_err <= 0.15, f"{tag}: {err_exact=} {row_err=} (fp8 activation budget)"
    # elementwise: float32 accumulation (1e-5 of the sum of |products|), SwiGLU values on an e4m3 rounding midpoint
    # (one step each), and for bf16 hidden the rounding of each slot's output and of the sum (the interpreter
    # truncates: 2^-7 relative)
    rounding = 2.0**-7 if dtype == torch.bfloat16 else 0.0
    bound = (2e-3 if NATIVE else 1e-5) * mag + flips + rounding * (slot_abs + matched.abs()) + 1e-30
    worst = ((out.double() - matched).abs() / bound).max().item()
    assert worst <= 1, f"{tag}: {worst:.2f}x the tolerance vs the same-quantization reference"

    # stage by stage, on the kernels' own intermediates
    xd, wd = _to(x), _to(w)
    align = experts_tk.moe_align(xd["topk_ids"], e, block_m or experts_tk.pick_block_m(t * k, e))
    xq, xs = experts_tk.quantize_act_1x128(xd["hidden"])
    xq_ref, xs_ref = experts_tk.quantize_act_1x128_reference(x["hidden"])
    assert torch.equal(xs.cpu(), xs_ref) and torch.equal(xq.cpu().float(), xq_ref.float()), f"{tag}: hidden quant"
    act, act_s = experts_tk.moe_gemm1_swiglu(xq, xs, wd["w13"], wd["w13_scale"], align, k)
    sorted_ids = align.sorted_ids.cpu()
    rows = (sorted_ids < t * k).nonzero().flatten()
    pairs = sorted_ids[rows].long()
    act_k = _dequant_act(act.cpu()[rows], act_s.cpu()[rows])  # kernel's FP8 SwiGLU output, by sorted row
    w13 = dequantize(w["w13"], w["w13_scale"]).double()
    act64 = _swiglu64(_dequant_act(xq_ref, xs_ref), x["topk_ids"], w13)[pairs]
    scale, _, step = _e4m3_grid(act64)
    half_step = step / 2 * scale
    noise = (2e-3 if NATIVE else 1e-5) * 448 * scale  # float32 noise, relative to the group's amax
    excess = ((act_k - act64).abs() - half_step * (1 + 1e-6) - noise).max().item()
    assert excess <= 0, f"{tag}: a SwiGLU value is not within half an e4m3 step of the float64 value ({excess=})"

    y = experts_tk.moe_gemm2(act, act_s, wd["w2"], wd["w2_scale"], align, xd["topk_weights"], torch.float32)
    combined = experts_tk.moe_combine(y, xd["topk_ids"], e, _nan((t, h))).cpu()
    act_pairs = torch.zeros(t * k, i, dtype=torch.float64)
    act_pairs[pairs] = act_k
    want, _, mag = _combine64(act_pairs, x["topk_ids"], x["topk_weights"], dequantize(w["w2"], w["w2_scale"]).double())
    bound = (2e-3 if NATIVE else 1e-5) * mag + 1e-30
    worst = ((combined.double() - want).abs() / bound).max().item()
    assert worst <= 1, f"{tag}: GEMM2 + combine off by {worst:.2f}x the float32 accumulation bound"


DECODE_CASES = {
    # name: (T, K, E, H, I, pattern, hidden dtype, path)
    "one-token-top8": (1, 8, 16, 256, 128, "uniform", torch.float32, "auto"),
    "shared-and-repeated-experts": (3, 2, 4, 200, 160, "dup", torch.float32, "decode"),
    "bf16-hidden": (2, 4, 8, 128, 128, "uniform", torch.bfloat16, "decode"),
}


@needs_kernels
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_experts_fp8_decode_path(case: str, seed: int) -> None:
    t, k, e, h, i, pattern, dtype, path = DECODE_CASES[case]
    x = _experts_inputs(t, k, e, h, i, pattern, dtype)
    w = _fp8_weights(x)
    out = _run_experts(x, w, "fp8_block128", path=path)
    exact = _exact_fp8(x, w)
    if dtype == torch.float32:
        # the decode path does not quantize activations: float32 rounding only
        tol = 1e-4 if NATIVE else 1e-5
        err = float((out - exact).abs().max() / exact.abs().max())
    else:  # only the output is rounded to bf16: at most 2^-7 relative per element (truncation in the interpreter)
        tol, err = 1e-2, _rel(out, exact)
    assert err <= tol, f"[seed {seed}] {case}: {err=} > {tol}"


NONE_CASES = {
    # name: (T, K, E, H, I, pattern, weight/hidden dtype, path, block_m)
    "fp32-sorted-ragged": (17, 2, 5, 192, 96, "ragged", torch.float32, "sorted", 16),
    "fp32-decode": (2, 4, 8, 128, 64, "uniform", torch.float32, "decode", None),
    "bf16-sorted-m64": (17, 2, 4, 128, 64, "uniform", torch.bfloat16, "sorted", 64),
}


@needs_kernels
@pytest.mark.usefixtures("poison")
@pytest.mark.parametrize("case", list(NONE_CASES))
def test_experts_unquantized(case: str, seed: int) -> None:
    t, k, e, h, i, pattern, dtype, path, block_m = NONE_CASES[case]
    x = _experts_inputs(t, k, e, h, i, pattern)
    x = {name: (v.to(dtype) if name in ("hidden", "w13", "w2") else v) for name, v in x.items()}
    out = _run_experts(x, {"w13": x["w13"], "w2": x["w2"]}, "none", path=path, block_m=block_m)
    exact = moe_experts_reference(x["hidden"], x["topk_weights"], x["topk_ids"], x["w13"], x["w2"])
    if dtype == torch.float32:
        tol = 1e-4 if NATIVE else 1e-5
        err = float((out - exact).abs().max() / exact.abs().max())
    else:  # SwiGLU output, per-slot outputs and the sum rounded to bf16: 3 x 2^-7 (the interpreter truncates)
        tol, err = 3e-2, _rel(out, exact)
    assert err <= tol, f"[seed {seed}] {case}: {err=} > {tol}"


@needs_kernels
def test_experts_rejects_bad_inputs() -> None:
    assert experts_tk is not None
    x = _to(_experts_inputs(2, 2, 3, 128, 128, "uniform"))  # on the kernels' device: only the inputs are wrong
    w = _to(_fp8_weights({k: v.cpu() for k, v in x.items()}))
    with pytest.raises(ValueError):
        experts_tk.moe_experts_fp8_triton(x["hidden"], x["topk_weights"], x["topk_ids"], x["w13"], x["w2"],
                                          w["w13_scale"], w["w2_scale"])  # fmt: skip
    with pytest.raises(ValueError):
        experts_tk.moe_experts_fp8_triton(x["hidden"], x["topk_weights"], x["topk_ids"], w["w13"], w["w2"],
                                          w["w13_scale"][:, :1], w["w2_scale"])  # fmt: skip
    with pytest.raises(ValueError):
        experts_tk.moe_experts_triton(x["hidden"], x["topk_weights"], x["topk_ids"], x["w13"], x["w2"], quant="int4")
    with pytest.raises(ValueError):
        experts_tk.moe_experts_triton(x["hidden"], x["topk_weights"], x["topk_ids"], x["w13"], x["w2"], path="x")


# ==============================================================================================================
# fallback: this file in a child process with the interpreter


def test_kernels_in_a_fresh_interpreter_process() -> None:
    rerun_in_interpreter(__file__, _PROBLEM)
