"""Load an engine bundle and run batched prefill/decode with a latent KV cache.

`Engine.forward` scores a batch; `Engine.generate` is the simple greedy API (one batch from start to end). Both
run through the backend-step interface (`r1c.runtime.step`) over a `LatentCache` (`r1c.runtime.kvcache`): the
cache is bound in place, attention reads a capacity bucket over the longest row, and each step writes only its
new tokens' latents. The serving scheduler (`r1c.runtime.serving`) uses the same pieces for many callers.
A decode step of `generate` with an unchanged batch and bucket reuses its bindings (`StepRunner`): one bound run,
two small input copies, the new latents' write and an argmax over the logits view [B, V] float32, read in place
(`host_view`); `on_step` gets the [B] int64 tokens.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from r1c.errors import BundleError, RuntimeInputError
from r1c.graph_io import LOGITS_INDEX
from r1c.manifest import Manifest, check_session, read_manifest
from r1c.runtime.kvcache import CacheLayout, LatentCache, budget_for, cache_dtype
from r1c.runtime.step import StepRunner, backend_alloc, host_view, to_host

if TYPE_CHECKING:
    from r1c.runtime.foreign import ForeignEngine

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, np.ndarray], None]


class Engine:
    """A loaded bundle: `forward` for logits, `generate` for greedy batched decoding."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: Any) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.config = manifest.config
        self.backend = backend
        self.cache_dtype = cache_dtype(manifest.graph_io)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def selects_logits(self) -> bool:
        """Whether the graph takes `logits_index` (computes logits only where asked; exports before it do not)."""
        return any(i["name"] == LOGITS_INDEX for i in self.manifest.graph_io["inputs"])

    @property
    def cache_layout(self) -> CacheLayout:
        return CacheLayout.from_graph_io(self.manifest.graph_io)

    def check_ids(self, ids: np.ndarray) -> None:
        """Raises `RuntimeInputError` if a token id is outside [0, vocab_size)."""
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.max() if ids.max() >= self.vocab_size else ids.min())
            raise RuntimeInputError(f"token id {bad} is out of range [0, {self.vocab_size})")

    def _runner(self, batch: int, max_len: int, step_tokens: int, min_bucket: int) -> StepRunner:
        layout = self.cache_layout
        alloc = backend_alloc(self.backend)
        cache = LatentCache(layout, budget_for(layout, batch, max_len), max_rows=batch, max_len=max_len,
                            min_bucket=min_bucket, alloc=alloc)
        return StepRunner(self.backend, cache, self.vocab_size, step_tokens, alloc=alloc,
                          logits_index=self.selects_logits)

    def forward(self, input_ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Logits float32 [B, S, V] of a batch of equal-length sequences, with no cache."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RuntimeInputError(f"input_ids must be [batch, seq] with seq > 0, got shape {list(ids.shape)}")
        self.check_ids(ids)
        runner = self._runner(ids.shape[0], 1, ids.size, 1)  # one masked slot per row: no past
        for _ in range(ids.shape[0]):
            runner.cache.add_row()
        return to_host(runner.step(ids, 0, None))

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_step: StepCallback | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt (prompts may differ in length); returns only the new tokens.

        One prefill over the right-padded batch, then one decode step per token with the cache reused.
        `on_step(step, tokens)` is called after each step with the [B] tokens just chosen (step 0 = prefill).
        A row stops at `eos_token_id` (kept in its output). Raises `RuntimeInputError` for an empty prompt, a token
        id or `eos_token_id` outside [0, vocab_size), or a length beyond max_position_embeddings.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RuntimeInputError("every prompt needs at least one token")
        if max_new_tokens < 0:
            raise RuntimeInputError("max_new_tokens must be >= 0")
        is_id = isinstance(eos_token_id, int | np.integer) and not isinstance(eos_token_id, bool)
        if eos_token_id is not None and not (is_id and 0 <= eos_token_id < self.vocab_size):
            raise RuntimeInputError(f"eos_token_id {eos_token_id!r} is not a token of this model (an integer in "
                                    f"[0, {self.vocab_size}))")
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        batch, longest = len(prompts), int(lengths.max())
        if longest + max_new_tokens > self.config.max_position_embeddings:
            raise RuntimeInputError(f"prompt + new tokens ({longest + max_new_tokens}) exceed the model's "
                                    f"max_position_embeddings ({self.config.max_position_embeddings})")
        ids = np.zeros((batch, longest), dtype=np.int64)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = p
        self.check_ids(ids)
        if max_new_tokens == 0:
            return [[] for _ in prompts]
        runner = self._runner(batch, longest + max_new_tokens, ids.size, 64)
        cache = runner.cache
        for _ in range(batch):
            cache.add_row()
        cache.resize(longest)
        logits = runner.step(ids, 0, lengths)  # padded tail tokens are not stored
        token = to_host(logits[:, 0]).argmax(-1).astype(np.int64)  # each row's last prompt token
        out = [[int(t)] for t in token]
        done = np.zeros(batch, dtype=bool) if eos_token_id is None else token == eos_token_id
        if on_step is not None:
            on_step(0, token)
        ones = np.ones(batch, dtype=np.int64)
        # the hot path: one bound run, one argmax, B appends, and the bookkeeping in Python ints (after a step's
        # weights have streamed through the caches each numpy call costs ~10 us: README, "the floor")
        active = [row for row in range(batch) if not done[row]]
        longest = int(cache.lengths[:batch].max())  # every row advances one token a step
        for step in range(1, max_new_tokens):
            if not active:
                break
            longest += 1
            cache.resize(longest)  # a no-op unless the bucket is outgrown
            token = host_view(runner.step(token[:, None], 0, ones)[:, 0]).argmax(-1).astype(np.int64, copy=False)
            chosen = token.tolist()
            for row in active:
                out[row].append(chosen[row])
            if eos_token_id is not None:
                active = [row for row in active if chosen[row] != eos_token_id]
            if on_step is not None:
                on_step(step, token)
        return out


def _check_libraries(m: Manifest) -> None:
    if m.target == "onnxruntime":
        import onnxruntime as ort

        built = m.libraries.get("onnxruntime", "")
        if built.split(".")[:2] != ort.__version__.split(".")[:2]:
            raise BundleError(f"bundle: built with onnxruntime {built}, but {ort.__version__} is installed "
                              "(rebuild it with `r1c build`)")


def load(bundle_dir: str | Path, *, verify_hashes: bool = True, session_options: dict[str, Any] | None = None
         ) -> Engine | ForeignEngine:
    """Open an engine bundle written by `r1c build`; raises `BundleError` on any mismatch, `RuntimeInputError` for
    `session_options` that r1c does not read or that are out of range (`r1c.manifest.check_session`).

    A bundle of a foreign model (built from `r1c optimize` output) opens as a `ForeignEngine` (runtime/foreign.py)
    with the same `forward` / `generate`.
    """
    bundle = Path(bundle_dir)
    if session_options:  # the caller's own, named as theirs (the bundle's are read_manifest's to check)
        check_session(session_options, RuntimeInputError, "load: session_options")
    m = read_manifest(bundle, verify_hashes=verify_hashes)
    _check_libraries(m)
    backend: Any
    if "distributed" in m.target_options:  # one bundle, several ranks: rank 0 is this process
        from r1c.runtime.distributed.launch import sharded_backend

        backend = sharded_backend(bundle, m, session_options)
    elif m.target == "onnxruntime":
        from r1c.runtime.build import custom_op_libraries
        from r1c.runtime.ort_backend import OrtBackend

        backend = OrtBackend(bundle / m.target_options["model"], {**m.target_options.get("session", {}),
                                                                 **(session_options or {})},
                             custom_op_libraries(bundle, m.target_options, m.files))
    else:
        from r1c.runtime.trt_backend import TensorRTBackend

        backend = TensorRTBackend(bundle, m)
    if m.is_foreign:
        from r1c.runtime.foreign import ForeignEngine

        return ForeignEngine(bundle, m, backend)
    return Engine(bundle, m, backend)
