"""llama.cpp as a benchmark peer: the same checkpoint converted by llama.cpp's own converter, quantized by its own
quantizer, run through `llama-cpp-python`'s bindings of `llama_decode`.

Optional: nothing here is imported by r1c itself, the tests or CI. It needs `llama-cpp-python` built on this
machine (`CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python --no-binary llama-cpp-python`), the `gguf`
package, and the llama.cpp sources vendored in llama-cpp-python's sdist (for `convert_hf_to_gguf.py`);
`scripts/bench_llama_cpp.py` drives it.

- `convert_to_gguf`: `convert_hf_to_gguf.py --outtype f32` in a subprocess, with the `gguf-py` it ships (the
  PyPI `gguf` 0.19.0 lacks architectures this converter registers; the PyPI package only reads the GGUF in
  `gguf_reads`). A checkpoint without a tokenizer (a synthetic one) is converted with llama.cpp's own
  `_set_vocab_none` (tokenizer model "none": vocab_size placeholder tokens), since the benchmark feeds ids.
- `quantize_gguf`: `llama_model_quantize` (the library behind `llama-quantize`) to Q8_0 / Q4_0 / Q4_K_M.
- `LlamaCppGenerator`: greedy batched generation with the `generate(prompts, max_new_tokens, eos_token_id,
  on_step)` interface the benchmark times: one `llama_decode` for the whole prefill of B prompts (one sequence
  id each), then one per step for the B new tokens; argmax on the host, as `r1c.runtime.Engine` does.
  `logits(ids)` returns every position's logits of one sequence (for accuracy comparisons).
- `gguf_reads`: the GGUF's tensors as the roofline counts them (experts routed, embedding gathered).
Legend: B = batch, V = vocabulary, T = tokens.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import BenchError
from r1c.runtime.bench.roofline import TensorRead

logger = logging.getLogger(__name__)

FTYPES = {"F32": 0, "Q8_0": 7, "Q4_0": 2, "Q4_K_M": 15}  # llama_ftype (llama.h)
GGML_TYPE_F32 = 0

_CONVERT = """
import sys
sys.path.insert(0, {src!r})
import convert_hf_to_gguf as convert
from conversion.deepseek import DeepseekV2Model
from pathlib import Path
if not any((Path({ckpt!r}) / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
    DeepseekV2Model.set_vocab = DeepseekV2Model._set_vocab_none  # llama.cpp's own "no tokenizer" vocabulary
sys.argv = ["convert_hf_to_gguf.py", {ckpt!r}, "--outfile", {out!r}, "--outtype", "f32"]
convert.main()
"""


def convert_to_gguf(checkpoint_dir: Path, out: Path, llama_src: Path) -> Path:
    """F32 GGUF of an HF checkpoint by llama.cpp's converter (`llama_src`: the llama.cpp source tree)."""
    if not (llama_src / "convert_hf_to_gguf.py").is_file():
        raise BenchError(f"llama.cpp: no convert_hf_to_gguf.py in {llama_src}")
    code = _CONVERT.format(src=str(llama_src), ckpt=str(checkpoint_dir), out=str(out))
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if r.returncode != 0 or not out.is_file():
        tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-5:])
        raise BenchError(f"llama.cpp: convert_hf_to_gguf failed:\n{tail}")
    return out


def quantize_gguf(src: Path, dst: Path, ftype: str, threads: int = 2) -> Path:
    """`src` (F32 GGUF) quantized by llama.cpp to `ftype` (Q8_0, Q4_0, Q4_K_M)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise BenchError(f"llama.cpp: quantizing {src.name} to {ftype} failed")
    return dst


def gguf_reads(path: Path) -> list[TensorRead]:
    """The GGUF's tensors as one decode step reads them: `*_exps` routed, `token_embd` gathered."""
    from gguf import GGUFReader

    reads = []
    for t in GGUFReader(str(path)).tensors:
        size = float(t.n_bytes)
        if "_exps." in t.name:
            reads.append(TensorRead(t.name, size, size, "experts", routed=True))
        elif t.name == "token_embd.weight":
            reads.append(TensorRead(t.name, size, size, "embedding", rows=int(t.shape[-1])))
        else:
            reads.append(TensorRead(t.name, size, size, "dense"))
    return reads


class LlamaCppGenerator:
    """Greedy batched generation through llama.cpp's C API (F32 KV cache, one sequence per prompt)."""

    def __init__(self, gguf: Path, *, threads: int, max_batch: int, max_prompt: int, max_tokens: int) -> None:
        import llama_cpp

        self.L = llama_cpp
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p(0))
        mp = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), mp)
        if not self.model:
            raise BenchError(f"llama.cpp could not load {gguf}")
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx = max_batch * max_tokens
        cp.n_batch = cp.n_ubatch = max(max_batch * max_prompt, max_tokens, 32)
        cp.n_seq_max = max_batch
        cp.n_threads = cp.n_threads_batch = threads
        cp.type_k = cp.type_v = GGML_TYPE_F32
        cp.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise BenchError(f"llama.cpp could not create a context for {gguf}")
        self.vocab_size = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        self.capacity = cp.n_batch
        self.batch = llama_cpp.llama_batch_init(cp.n_batch, 0, max_batch)
        self.info = {"gguf": str(gguf), "threads": threads, "kv_cache": "f32",
                     "llama_cpp_python": getattr(llama_cpp, "__version__", "?")}

    def close(self) -> None:
        L = self.L
        L.llama_batch_free(self.batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)

    def _decode(self, rows: Sequence[tuple[int, int, int, bool]]) -> list[int]:
        """One llama_decode of (sequence, position, token, wants logits) rows; returns the batch indices of the
        rows that want logits."""
        b = self.batch
        if len(rows) > self.capacity:
            raise BenchError(f"llama.cpp: {len(rows)} tokens exceed the batch capacity {self.capacity}")
        out = []
        for i, (seq, pos, token, want) in enumerate(rows):
            b.token[i], b.pos[i], b.n_seq_id[i] = token, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = int(want)
            if want:
                out.append(i)
        b.n_tokens = len(rows)
        if self.L.llama_decode(self.ctx, b) != 0:
            raise BenchError("llama.cpp: llama_decode failed")
        return out

    def _row_logits(self, index: int) -> np.ndarray:
        ptr = self.L.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab_size,))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_step: Callable[[int, np.ndarray], None] | None = None) -> list[list[int]]:
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        rows = [(s, p, int(t), p == len(prompt) - 1) for s, prompt in enumerate(prompts) for p, t in enumerate(prompt)]
        index = self._decode(rows)
        out: list[list[int]] = [[] for _ in prompts]
        positions = [len(p) for p in prompts]
        for step in range(max_new_tokens):
            token = np.array([int(self._row_logits(i).argmax()) for i in index], dtype=np.int64)
            for s, t in enumerate(token):
                out[s].append(int(t))
            if on_step is not None:
                on_step(step, token)
            if step == max_new_tokens - 1:
                break
            index = self._decode([(s, positions[s] + step, int(t), True) for s, t in enumerate(token)])
        return out

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """float32 [T, V]: the logits at every position of one sequence (a fresh cache)."""
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        index = self._decode([(0, p, int(t), True) for p, t in enumerate(ids)])
        return np.stack([self._row_logits(i).copy() for i in index])


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _QUIET(level: int, text: bytes, user_data: Any) -> None:  # llama.cpp's log callback: drop everything
    return None
