"""Load an engine bundle and serve batched prefill/decode with a latent KV cache.

The cache for one `generate` call is two preallocated buffers,
    c  [L, B, kv_lora_rank, capacity]   pe [L, B, qk_rope_head_dim, capacity],
bound to the graph in place; after each step only the new tokens' latents are written into them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from r1c.config import ModelConfig
from r1c.errors import BundleError, RuntimeInputError
from r1c.manifest import Manifest, read_manifest

if TYPE_CHECKING:
    from r1c.runtime.foreign import ForeignEngine

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, np.ndarray], None]


class Backend(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class LatentCache:
    """Per-call latent cache: [L, B, channels, capacity] buffers and each row's filled length."""

    def __init__(self, config: ModelConfig, batch: int, capacity: int, dtype: Any = np.float32) -> None:
        L = config.num_hidden_layers
        self.c = np.zeros((L, batch, config.kv_lora_rank, capacity), dtype=dtype)
        self.pe = np.zeros((L, batch, config.qk_rope_head_dim, capacity), dtype=dtype)
        self.lengths = np.zeros(batch, dtype=np.int64)
        self.capacity = capacity

    def feeds(self) -> dict[str, np.ndarray]:
        f: dict[str, np.ndarray] = {}
        for i in range(self.c.shape[0]):  # views, not copies: the backend binds them by pointer
            f[f"past_c.{i}"] = self.c[i]
            f[f"past_pe.{i}"] = self.pe[i]
        return f

    def append(self, new_c: np.ndarray, new_pe: np.ndarray, n_new: np.ndarray) -> None:
        """Write the step's latents ([L, B, S, ch]) at each row's length; rows advance by n_new[b]."""
        s = new_c.shape[2]
        if s == 1:
            rows = np.arange(self.c.shape[1])
            self.c[:, rows, :, self.lengths] = new_c[:, :, 0, :].transpose(1, 0, 2)
            self.pe[:, rows, :, self.lengths] = new_pe[:, :, 0, :].transpose(1, 0, 2)
        else:
            for b, start in enumerate(self.lengths):  # once per prefill, not per token
                self.c[:, b, :, start:start + s] = new_c[:, b].transpose(0, 2, 1)
                self.pe[:, b, :, start:start + s] = new_pe[:, b].transpose(0, 2, 1)
        self.lengths += n_new


class Engine:
    """A loaded bundle: `forward` for logits, `generate` for greedy batched decoding."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: Backend) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.config = manifest.config
        self.backend = backend
        self.cache_dtype = cache_dtype(manifest.graph_io)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.max() if ids.max() >= self.vocab_size else ids.min())
            raise RuntimeInputError(f"token id {bad} is out of range [0, {self.vocab_size})")

    def _step(self, ids: np.ndarray, cache: LatentCache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feeds = {"input_ids": np.ascontiguousarray(ids, dtype=np.int64), "past_lengths": cache.lengths.copy(),
                 **cache.feeds()}
        out = self.backend.run(feeds)
        return out["logits"], out["new_c"], out["new_pe"]

    def forward(self, input_ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Logits float32 [B, S, V] of a batch of equal-length sequences, with no cache."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RuntimeInputError(f"input_ids must be [batch, seq] with seq > 0, got shape {list(ids.shape)}")
        self._check_ids(ids)
        cache = LatentCache(self.config, ids.shape[0], capacity=1, dtype=self.cache_dtype)  # one masked slot
        logits, _, _ = self._step(ids, cache)
        return logits

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_step: StepCallback | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt (prompts may differ in length); returns only the new tokens.

        One prefill over the right-padded batch, then one decode step per token with the cache reused.
        `on_step(step, tokens)` is called after each step with the [B] tokens just chosen (step 0 = prefill).
        A row stops at `eos_token_id` (kept in its output).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RuntimeInputError("every prompt needs at least one token")
        if max_new_tokens < 0:
            raise RuntimeInputError("max_new_tokens must be >= 0")
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        batch, longest = len(prompts), int(lengths.max())
        if longest + max_new_tokens > self.config.max_position_embeddings:
            raise RuntimeInputError(f"prompt + new tokens ({longest + max_new_tokens}) exceed the model's "
                                    f"max_position_embeddings ({self.config.max_position_embeddings})")
        ids = np.zeros((batch, longest), dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
        self._check_ids(ids)
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        cache = LatentCache(self.config, batch, capacity=longest + max_new_tokens, dtype=self.cache_dtype)
        logits, new_c, new_pe = self._step(ids, cache)
        cache.append(new_c, new_pe, lengths)  # padded tail entries lie beyond each row's length: masked
        token = logits[np.arange(batch), lengths - 1].argmax(-1).astype(np.int64)
        out = [[int(t)] for t in token]
        done = np.zeros(batch, dtype=bool) if eos_token_id is None else token == eos_token_id
        if on_step is not None:
            on_step(0, token)
        for step in range(1, max_new_tokens):
            if done.all():
                break
            logits, new_c, new_pe = self._step(token[:, None], cache)
            cache.append(new_c, new_pe, np.ones(batch, dtype=np.int64))
            token = logits[:, 0].argmax(-1).astype(np.int64)
            for row in np.flatnonzero(~done):
                out[row].append(int(token[row]))
            if eos_token_id is not None:
                done |= token == eos_token_id
            if on_step is not None:
                on_step(step, token)
        return out


def cache_dtype(graph_io: dict[str, Any]) -> Any:
    """The latent cache's numpy dtype, from graph_io.json (float32 | bfloat16 | float16; float32 if unset)."""
    import ml_dtypes

    name = graph_io.get("kv_cache", {}).get("dtype", "float32")
    dtypes = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    if name not in dtypes:
        raise BundleError(f"bundle: unknown latent cache dtype {name!r} in the manifest's graph_io")
    return np.dtype(dtypes[name])


def _check_libraries(m: Manifest) -> None:
    if m.target == "onnxruntime":
        import onnxruntime as ort

        built = m.libraries.get("onnxruntime", "")
        if built.split(".")[:2] != ort.__version__.split(".")[:2]:
            raise BundleError(f"bundle: built with onnxruntime {built}, but {ort.__version__} is installed "
                              "(rebuild it with `r1c build`)")


def load(bundle_dir: str | Path, *, verify_hashes: bool = True, session_options: dict[str, Any] | None = None
         ) -> Engine | ForeignEngine:
    """Open an engine bundle written by `r1c build`; raises `BundleError` on any mismatch.

    A bundle of a foreign model (built from `r1c optimize` output) opens as a `ForeignEngine` (runtime/foreign.py)
    with the same `forward` / `generate`.
    """
    bundle = Path(bundle_dir)
    m = read_manifest(bundle, verify_hashes=verify_hashes)
    _check_libraries(m)
    backend: Backend
    if "distributed" in m.target_options:  # one bundle, several ranks: rank 0 is this process
        from r1c.runtime.distributed.launch import sharded_backend

        backend = sharded_backend(bundle, m, session_options)
    elif m.target == "onnxruntime":
        from r1c.runtime.ort_backend import OrtBackend

        backend = OrtBackend(bundle / m.target_options["model"], {**m.target_options.get("session", {}),
                                                                 **(session_options or {})})
    else:
        from r1c.runtime.trt_backend import TensorRTBackend

        backend = TensorRTBackend(bundle, m)
    if m.is_foreign:
        from r1c.runtime.foreign import ForeignEngine

        return ForeignEngine(bundle, m, backend)
    return Engine(bundle, m, backend)
