"""The memory-bandwidth floor of a decode step: the bytes it must read divided by the machine's read bandwidth.

The bytes come from the bundle itself: its lowered model's initializers (sizes and dtypes, read without the
weight data) and the kernels that read them (`tensor_reads`):
- a weight read by a routed-expert kernel (ORT's MoE / QMoE, r1c's CPU MoE) is read only for the experts the batch
  touches:
  B tokens that each pick k of E (uniformly, independently) touch E * (1 - (1 - k/E)^B) in expectation, the
  same fraction of a layer's rows however the kernel splits its experts (`split_moe_experts` keeps it);
- an expert weight read by any other node (the r1c::MoEExperts function body, inlined) is read whole: every
  expert, densely;
- the embedding table is a gather of B rows;
- an FP8 weight behind a DequantizeLinear is folded to float32 by ONNX Runtime at load, so it is read as 4
  bytes an element; int8/int4 blocks (MatMulNBits, QMoE) are read as stored, scales at their stored size;
- every other weight (float32 MatMul, norms, router) is read once.
"active" counts what the step needs (stored bytes, touched experts, the filled cache: prompt + j cached tokens
at decode step j); "executed" what the bundle reads (bytes as the kernels read them, every expert of a dense
body, the whole cache the attention is bound to: its capacity). A bundle without a lowered model (a TensorRT
engine) is estimated from its config instead (`config_reads`: the plugins run the touched experts and read FP8
as FP8 with 128x128 block scales). achieved/floor is then the measured TPOT / floor time.
Legend: B = batch (tokens per decode step), E = routed experts, k = experts per token, V = vocabulary.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from r1c.config import ModelConfig

logger = logging.getLogger(__name__)

FP32_BYTES = 4
FP8_BLOCK = 128
EXPERT_KERNELS = {("com.microsoft", "MoE"): (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13),
                  ("com.microsoft", "QMoE"): (2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13),
                  ("r1c.cpu", "MoE"): (2, 3)}  # weight inputs
WEIGHT_DTYPES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE", "FLOAT8E4M3FN", "FLOAT8E5M2", "UINT8", "INT8",
                           "UINT4", "INT4"})


def expected_distinct_experts(n_experts: int, top_k: int, tokens: int) -> float:
    """Expected number of distinct experts among E when each of `tokens` tokens picks k uniformly."""
    if tokens <= 0 or n_experts <= 0:
        return 0.0
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


@dataclasses.dataclass(frozen=True)
class TensorRead:
    """One weight as a decode step reads it."""

    name: str
    stored: float  # bytes as the bundle stores it
    read: float  # bytes as its kernel reads it (FP8 folded to float32 at load: 4 an element)
    role: str  # "dense" | "experts" | "embedding"
    routed: bool = False  # experts: read only for the touched experts (a MoE kernel), else all of them
    rows: int = 1  # embedding: rows of the table

    def bytes(self, batch: int, touched: float) -> tuple[float, float]:
        """(active, executed) bytes of this weight in one decode step of `batch` tokens; `touched` is the
        fraction of experts the batch touches."""
        if self.role == "embedding":
            share = min(batch, self.rows) / self.rows
            return self.stored * share, self.read * share
        if self.role == "experts":
            return self.stored * touched, self.read * (touched if self.routed else 1.0)
        return self.stored, self.read


def _nbytes(dims: Sequence[int], dtype: str) -> float:
    import onnx

    count = 1
    for d in dims:
        count *= int(d)
    bits = {"FLOAT8E4M3FN": 8, "FLOAT8E5M2": 8, "UINT4": 4, "INT4": 4}.get(dtype)
    if bits is None:
        bits = 8 * onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, dtype)).itemsize
    return count * bits / 8


def tensor_reads(model_path: str | Path) -> list[TensorRead]:
    """The weights of a lowered ONNX model and how its kernels read them (no weight data is loaded)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    dtype_name = {v: k for k, v in onnx.TensorProto.DataType.items()}
    inits = {t.name: (list(t.dims), dtype_name[t.data_type]) for t in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in inits:
                consumers.setdefault(name, []).append((node, i))
    reads = []
    for name, (dims, dtype) in inits.items():
        if dtype not in WEIGHT_DTYPES or name not in consumers:
            continue
        stored = _nbytes(dims, dtype)
        uses = consumers[name]
        read = stored
        if all(n.op_type == "DequantizeLinear" and all(x in inits for x in n.input) for n, _ in uses):
            # a constant DequantizeLinear (FP8 weights): ONNX Runtime folds it to float32 when the session loads,
            # so the step reads the float32 result (4 bytes an element of the weight) and never the scales
            elements = _nbytes(dims, "UINT8")
            read = elements * FP32_BYTES if all(i == 0 for _, i in uses) else 0.0
        if all((n.domain, n.op_type) in EXPERT_KERNELS and i in EXPERT_KERNELS[(n.domain, n.op_type)] for n, i in uses):
            reads.append(TensorRead(name, stored, read, "experts", routed=True))
        elif "mlp.experts." in name and len(dims) == 3:  # an expert tensor read by a dense body
            reads.append(TensorRead(name, stored, read, "experts", routed=False))
        elif all(n.op_type == "Gather" and i == 0 for n, i in uses) and len(dims) == 2:
            reads.append(TensorRead(name, stored, read, "embedding", rows=dims[0]))
        else:
            reads.append(TensorRead(name, stored, read, "dense"))
    return reads


def config_reads(config: ModelConfig, *, fp8: bool) -> list[TensorRead]:
    """An estimate from the config for a bundle without a lowered model (a TensorRT engine): experts routed,
    FP8 weights (when `fp8`) read as 1 byte plus their 128x128 block scales, everything else float32."""
    from r1c.exporter.checkpoint import expected_shapes, is_quantizable

    reads = []
    for name, shape in expected_shapes(config).items():
        count = 1
        for d in shape:
            count *= d
        per = 1 + FP32_BYTES / (FP8_BLOCK * FP8_BLOCK) if fp8 and is_quantizable(name, len(shape)) else FP32_BYTES
        if name == "model.embed_tokens.weight":
            reads.append(TensorRead(name, count * per, count * per, "embedding", rows=shape[0]))
        elif name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            reads.append(TensorRead(name, count * per, count * per, "experts", routed=True))
        else:
            reads.append(TensorRead(name, count * per, count * per, "dense"))
    return reads


def weight_bytes(reads: Sequence[TensorRead], config: ModelConfig, batch: int) -> tuple[float, float]:
    """(active, executed) weight bytes one decode step of `batch` tokens reads."""
    touched = (expected_distinct_experts(config.n_routed_experts, config.num_experts_per_tok, batch)
               / config.n_routed_experts) if config.n_routed_experts else 0.0
    active = executed = 0.0
    for r in reads:
        a, e = r.bytes(batch, touched)
        active += a
        executed += e
    return active, executed


def cache_bytes_per_token(config: ModelConfig, dtype_bytes: float = FP32_BYTES) -> float:
    """Latent cache bytes one cached token of one row costs to read (all layers)."""
    return config.num_hidden_layers * config.latent_dim * dtype_bytes


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
    source: str = "bundle"  # "bundle": from its lowered model; "config": estimated (no lowered model)

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


def decode_floor(reads: Sequence[TensorRead], config: ModelConfig, batch: int, prompt_len: int, new_tokens: int, *,
                 bandwidth: float, capacity: int | None = None, cache_dtype_bytes: float = FP32_BYTES,
                 source: str = "bundle") -> DecodeFloor:
    """The floor of one decode step, averaged over the `new_tokens - 1` decode steps of a generate call.

    Decode step j (1..N-1) needs prompt_len + j cached tokens (mean prompt_len + N/2); the attention reads the
    `capacity` it is bound to (default prompt_len + new_tokens, what `Engine.generate` allocates).
    """
    w_active, w_executed = weight_bytes(reads, config, batch)
    per_token = cache_bytes_per_token(config, cache_dtype_bytes) * batch
    return DecodeFloor(batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                       weights_active=w_active, weights_executed=w_executed,
                       cache_active=per_token * (prompt_len + new_tokens / 2.0),
                       cache_executed=per_token * (capacity if capacity is not None else prompt_len + new_tokens),
                       bandwidth=bandwidth, source=source)


def bundle_reads(bundle_dir: str | Path, manifest: Any) -> tuple[list[TensorRead], str]:
    """The bundle's weight reads and where they came from ("bundle" or "config")."""
    model_file = manifest.target_options.get("model")
    if model_file is not None and (Path(bundle_dir) / model_file).is_file():
        return tensor_reads(Path(bundle_dir) / model_file), "bundle"
    return config_reads(manifest.config, fp8=manifest.precision.startswith("fp8")), "config"


def huge_ones(n: int) -> Any:
    """A float32 torch tensor of n ones in memory advised for transparent huge pages (`r1c.runtime.hugepages`,
    where the ONNX Runtime backend puts r1c's kernel weights): the floor is read from the same kind of memory as
    the weights it bounds (on this project's VM 4 KiB pages read up to 1.17x slower)."""
    import numpy as np
    import torch

    from r1c.runtime.hugepages import huge_empty

    x = torch.from_numpy(huge_empty(4 * n).view(np.float32))
    x.fill_(1.0)
    return x


def measure_read_bandwidth(nbytes: int = 1 << 30, *, repeats: int = 5, threads: int | None = None) -> float:
    """Memory read bandwidth in bytes/s: the best pass of three streaming kernels over a float32 buffer.

    The buffer lies in huge pages where the kernel offers them (`huge_ones`). The kernels are `torch.sum`,
    `torch.dot(x, x)` and a GEMV (the buffer as a [rows, 4096] matrix times a vector, which is what a decode step
    does to its weights), each multithreaded with `threads` threads (numpy's sum is single-threaded and slower
    still); the best of `repeats` passes of each counts, so a pass that a neighbouring process did not disturb
    sets the figure. `nbytes` should dwarf the last-level cache.
    """
    import torch

    threads = threads or os.cpu_count() or 1
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    cols = 4096
    try:
        x = huge_ones(max(cols, nbytes // 4 // cols * cols))
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


class ReadProbe:
    """The floor as a benchmark peer: a `Generator` whose decode "steps" only stream bytes from memory.

    `generate(prompts, N)` reads `step_bytes(len(prompts))` bytes once for its prefill mark, then once per
    decode step (N - 1 times), calling `on_step` after each, so the runner times it in the same interleaved
    rounds as the systems it bounds: its TPOT is the floor time of one decode step at the read bandwidth of
    that moment, and a system's TPOT ratio against it (compare.ratios) is the system's achieved/floor with a
    bootstrap interval. The reads are one kernel (the fastest of measure_read_bandwidth's three, chosen on the
    first call after an untimed pass of each) over consecutive windows of one float32 buffer of at least
    max(2 x step bytes, `min_buffer`) bytes in huge pages (`huge_ones`), so no window is still cached from the
    last step. Tokens returned are zeros (the probe has no model).

    Before timing it sleeps `settle_s` and after the last step again, so thread pools of the system timed
    just before or after (ONNX Runtime, OpenMP and llama.cpp workers spin for a while after their work) do not
    share the cores with it: a probe slowed by them would make every system look closer to its floor.
    Raises BenchError if step_bytes(batch) is not a positive number.
    """

    def __init__(self, step_bytes: Any, *, threads: int, min_buffer: int = 512 << 20, settle_s: float = 0.05
                 ) -> None:
        self.step_bytes, self.threads, self.settle_s = step_bytes, threads, settle_s
        self.min_buffer = min_buffer
        self._buf: Any = None
        self._kernel: str | None = None
        self.info = {"kind": "read bandwidth probe", "threads": threads}

    def _reader(self, step_bytes: float) -> Any:
        import math

        import torch

        from r1c.errors import BenchError

        if not (step_bytes > 0 and math.isfinite(step_bytes)):  # NaN compares false
            raise BenchError(f"benchmark: the read probe needs a positive byte count per step, got {step_bytes}")
        nbytes = int(step_bytes)
        cols = 4096
        rows = -(-nbytes // 4 // cols)
        total = max(self.min_buffer // 4 // cols, 2 * rows) * cols
        if self._buf is None or self._buf.numel() < total:
            self._buf = huge_ones(total)
        buf, v = self._buf, torch.ones(cols, dtype=torch.float32)
        n_windows = buf.numel() // (rows * cols)
        windows = [buf[i * rows * cols:(i + 1) * rows * cols] for i in range(n_windows)]
        kernels = {"sum": lambda x: float(x.sum()), "dot": lambda x: float(torch.dot(x, x)),
                   "gemv": lambda x: float(torch.mv(x.view(rows, cols), v)[0])}
        if self._kernel is None:
            best: dict[str, float] = {}
            for name, fn in kernels.items():
                fn(windows[-1])  # untimed: thread-pool start-up
                for w in windows[:3]:
                    t0 = time.perf_counter()
                    fn(w)
                    best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
            self._kernel = min(best, key=lambda k: best[k])
            self.info["kernel"] = self._kernel
        return kernels[self._kernel], windows

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_step: Any = None) -> list[list[int]]:
        import numpy as np
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            read, windows = self._reader(self.step_bytes(len(prompts)))
            time.sleep(self.settle_s)
            for step in range(max_new_tokens):
                read(windows[step % len(windows)])
                if on_step is not None:
                    on_step(step, np.zeros(len(prompts), np.int64))
            time.sleep(self.settle_s)
        finally:
            torch.set_num_threads(before)
        return [[0] * max_new_tokens for _ in prompts]
