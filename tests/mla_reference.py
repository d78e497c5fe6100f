"""What the tests of r1c's MLA kernels share (tests/test_cpu_attention.py, tests/test_cpu_mla_block.py): random
inputs of `r1c.cpu::MLAAttention` (ATTENTION_SPEC) and its formula in float64 (`reference`)."""

from __future__ import annotations

import numpy as np


def feeds(rng: np.random.Generator, b: int, s: int, n: int, d: int, r: int, c: int, vd: int, p: int,
          lengths: list[int]) -> dict[str, np.ndarray]:
    """Random inputs; row b sees the first lengths[b] cache columns and the new tokens causally (as the export)."""
    def f(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    past_valid = (np.arange(p)[None, :] < np.asarray(lengths)[:, None])[:, None, :]  # [B, 1, P]
    causal = np.arange(s)[None, :] <= np.arange(s)[:, None]  # [S, S]
    new_valid = np.repeat(causal, n, axis=0)[None]  # [1, S*N, S], row s*N + n
    return {"q_nope": f(b, s, n, d), "q_pe": f(b, s, n * r), "c_new": f(b, s, c), "pe_new": f(b, s, r),
            "past_c": f(b, c, p), "past_pe": f(b, r, p), "past_valid": past_valid, "new_valid": new_valid,
            "w_uk": f(n, d, c) / np.float32(d**0.5), "w_uv_t": f(n, c, vd) / np.float32(c**0.5)}


def reference(x: dict[str, np.ndarray], scale: float) -> np.ndarray:
    """ATTENTION_SPEC's formula in float64, head by head."""
    x64 = {k: v.astype(np.float64) if v.dtype != bool else v for k, v in x.items()}
    b, s, n, _ = x["q_nope"].shape
    r = x["pe_new"].shape[2]
    vd = x["w_uv_t"].shape[2]
    q_pe = x64["q_pe"].reshape(b, s, n, r)
    out = np.zeros((b, s, n, vd))
    past_valid = np.broadcast_to(x["past_valid"], (b, s * n, x["past_c"].shape[2]))
    new_valid = np.broadcast_to(x["new_valid"], (b, s * n, s))
    for bi in range(b):
        keys_c = np.concatenate([x64["past_c"][bi].T, x64["c_new"][bi]])  # [P+S, C]
        keys_pe = np.concatenate([x64["past_pe"][bi].T, x64["pe_new"][bi]])  # [P+S, R]
        for si in range(s):
            for h in range(n):
                qa = scale * x64["q_nope"][bi, si, h] @ x64["w_uk"][h]
                z = keys_c @ qa + keys_pe @ (scale * q_pe[bi, si, h])
                visible = np.concatenate([past_valid[bi, si * n + h], new_valid[bi, si * n + h]])
                z = np.where(visible, z, -np.inf)
                p = np.exp(z - z.max())
                out[bi, si, h] = (p / p.sum()) @ keys_c @ x64["w_uv_t"][h]
    return out.reshape(b, s, n * vd)
