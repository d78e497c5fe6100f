"""The memory-bandwidth floor of a decode step: the bytes it must read divided by the machine's read bandwidth.

A decode step of batch B reads every weight a token of the batch touches, once, plus the latent cache:
- weights: attention (q_a, q_b, kv_a, kv_b, o_proj), the dense MLPs, each MoE layer's router, shared expert
  and the routed experts the step touches, the lm_head, the B embedding rows and the norms;
  the routed experts touched by B tokens that each pick k of E (uniformly, independently) number
  E * (1 - (1 - k/E)^B) in expectation per MoE layer;
- bytes per weight: 4 for float32 bundles; 1 for FP8 weights plus their float32 128x128 block scales
  (4 / 16384 bytes per weight); router, norms, embeddings and lm_head stay float32;
- cache: layers * latent_dim * 4 bytes per cached token per row (float32 latents).
"active" counts only that; "executed" counts what the bundle reads: the r1c::MoEExperts function body (the
portable fallback) runs *all* E experts densely, while a bundle lowered to ONNX Runtime's fused MoE runs only
the touched ones; ONNX Runtime dequantizes FP8 weights once at load, so it reads them as float32; and
attention reads the whole preallocated cache (capacity = prompt + new tokens, masked) at every step.
achieved/floor is then measured TPOT / floor time for either count.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

from r1c.config import ModelConfig

logger = logging.getLogger(__name__)

FP32_BYTES = 4
FP8_BLOCK = 128
FP8_BYTES = 1 + FP32_BYTES / (FP8_BLOCK * FP8_BLOCK)  # the weight plus its share of a block scale
CACHE_BYTES = 4  # the runtime's latent cache is float32


def expected_distinct_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts among E when each of `tokens` tokens picks k uniformly."""
    if tokens <= 0 or n_experts <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def _is_expert_tensor(name: str) -> bool:
    return name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))


def weight_bytes(config: ModelConfig, batch: int, *, fp8: bool, dense_experts: bool = True,
                 executed_fp8: bool | None = None) -> tuple[float, float]:
    """(active, executed) bytes of weights one decode step of `batch` tokens reads.

    `dense_experts`: the bundle computes every expert (the function body); `executed_fp8`: the bundle reads
    FP8 weights as FP8 (default: as `fp8`; False for ONNX Runtime, which dequantizes them at load).
    """
    executed_fp8 = fp8 if executed_fp8 is None else executed_fp8
    from r1c.exporter.checkpoint import expected_shapes, is_quantizable

    active = executed = 0.0
    touched = expected_distinct_experts(config.n_routed_experts, config.num_experts_per_tok, batch)
    for name, shape in expected_shapes(config).items():
        count = 1
        for d in shape:
            count *= d
        quantized = is_quantizable(name, len(shape))
        per = FP8_BYTES if fp8 and quantized else FP32_BYTES
        per_x = FP8_BYTES if executed_fp8 and quantized else FP32_BYTES
        if name == "model.embed_tokens.weight":  # a gather of B rows
            rows = min(batch, config.vocab_size) * config.hidden_size
            active += rows * per
            executed += rows * per_x
        elif _is_expert_tensor(name):
            active += count * per * touched / config.n_routed_experts
            executed += count * per_x * (1.0 if dense_experts else touched / config.n_routed_experts)
        else:
            active += count * per
            executed += count * per_x
    return active, executed


def cache_bytes_per_token(config: ModelConfig) -> int:
    """Latent cache bytes one cached token of one row costs to read (all layers)."""
    return config.num_hidden_layers * config.latent_dim * CACHE_BYTES


@dataclasses.dataclass(frozen=True)
class DecodeFloor:
    """Bytes per decode step (averaged over the steps of one generate call) and their time at `bandwidth`."""

    batch: int
    prompt_len: int
    new_tokens: int
    weights_active: float
    weights_executed: float
    cache_active: float
    cache_executed: float
    bandwidth: float  # bytes/s

    @property
    def bytes_active(self) -> float:
        return self.weights_active + self.cache_active

    @property
    def bytes_executed(self) -> float:
        return self.weights_executed + self.cache_executed

    @property
    def floor_active_s(self) -> float:
        return self.bytes_active / self.bandwidth

    @property
    def floor_executed_s(self) -> float:
        return self.bytes_executed / self.bandwidth

    def to_dict(self, tpot_s: float | None = None) -> dict[str, Any]:
        d: dict[str, Any] = dataclasses.asdict(self)
        d.update(bytes_active=self.bytes_active, bytes_executed=self.bytes_executed,
                 floor_active_s=self.floor_active_s, floor_executed_s=self.floor_executed_s)
        if tpot_s is not None:
            d.update(tpot_p50_s=tpot_s, achieved_over_active_floor=tpot_s / self.floor_active_s,
                     achieved_over_executed_floor=tpot_s / self.floor_executed_s,
                     achieved_bandwidth=self.bytes_executed / tpot_s)
        return d


def decode_floor(config: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *, fp8: bool,
                 bandwidth: float, dense_experts: bool = True, executed_fp8: bool | None = None) -> DecodeFloor:
    """The floor of one decode step, averaged over the `new_tokens - 1` decode steps of a generate call.

    Decode step j (1..N-1) attends to prompt_len + j cached tokens (mean prompt_len + N/2) when it reads only
    the valid entries; the bundle reads the whole capacity prompt_len + N at every step.
    """
    w_active, w_executed = weight_bytes(config, batch, fp8=fp8, dense_experts=dense_experts,
                                        executed_fp8=executed_fp8)
    per_token = cache_bytes_per_token(config) * batch
    return DecodeFloor(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                       weights_active=w_active, weights_executed=w_executed,
                       cache_active=per_token * (prompt_len + new_tokens / 2.0),
                       cache_executed=per_token * (prompt_len + new_tokens), bandwidth=bandwidth)


def measure_read_bandwidth(nbytes: int = 1 << 30, *, repeats: int = 5, threads: int | None = None) -> float:
    """Memory read bandwidth in bytes/s: the best pass of three streaming kernels over a float32 buffer.

    The kernels are `torch.sum`, `torch.dot(x, x)` and a GEMV (the buffer as a [rows, 4096] matrix times a
    vector, which is what a decode step does to its weights), each multithreaded with `threads` threads (numpy's
    sum is single-threaded and slower still); the best of `repeats` passes of each counts, so a pass that a
    neighbouring process did not disturb sets the figure. `nbytes` should dwarf the last-level cache.
    """
    import torch

    threads = threads or os.cpu_count() or 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    cols = 4096
    try:
        x = torch.ones(max(cols, nbytes // 4 // cols * cols), dtype=torch.float32)
        size = x.numel() * 4
        m, v = x.view(-1, cols), torch.ones(cols, dtype=torch.float32)
        kernels = {"sum": lambda: float(x.sum()), "dot": lambda: float(torch.dot(x, x)),
                   "gemv": lambda: float(torch.mv(m, v)[0])}
        best: dict[str, float] = {}
        for name, kernel in kernels.items():
            kernel()  # first touch and thread-pool start-up, untimed
            for _ in range(repeats):
                t0 = time.perf_counter()
                kernel()
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    winner = min(best, key=lambda k: best[k])
    bandwidth = size / best[winner]
    logger.info("read bandwidth %.2f GB/s (%s, %d threads, %d MiB; %s)", bandwidth / 1e9, winner, threads, size >> 20,
                ", ".join(f"{k} {size / t / 1e9:.2f}" for k, t in best.items()))
    return bandwidth
