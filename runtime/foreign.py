"""A bundle built from a foreign model (`r1c optimize` of, e.g., a stock torch.onnx export): `forward` and
greedy `generate`, with the graph's own transformers-style KV cache when it has one, or without a cache.

The graph's inputs and outputs are named in the manifest's graph_io (r1c/graph_io.py `describe_foreign`).
Shapes: B = batch, S = new tokens, P = cached tokens, V = vocabulary, L = layers.

- No cache in the graph: every step runs the whole sequence so far ([B, P + S] ids -> logits) and takes
  the last position's logits: cache-less generation, quadratic in the length, exact.
- transformers-style cache (`past_key_values.{l}.key/value` in, `present.{l}.key/value` out, each
  [B, heads, P, head_dim]): the prefill runs with an empty past (P = 0), each later step feeds one token
  and the previous step's `present` as `past`. The graph concatenates past and new internally (a copy per
  step that the graph, not r1c, decides; r1c's own exports bind a latent cache in place instead).
Prompts of different lengths run as groups of equal length, in lockstep (no padding: a foreign graph may
derive positions from the cache length or the mask, and an exact answer must not depend on which).
`attention_mask` is all ones over past + new tokens, `position_ids` P..P+S-1, when the graph takes them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import BundleError, RuntimeInputError
from r1c.manifest import Manifest

logger = logging.getLogger(__name__)

StepCallback = Callable[[int, np.ndarray], None]
_NP_DTYPES = {"float32": np.float32, "float16": np.float16, "float64": np.float64}


class _Graph:
    """The graph's roles (from graph_io) and one call of it."""

    def __init__(self, graph_io: dict[str, Any], backend: Any) -> None:
        self.backend = backend
        roles = graph_io["roles"]
        self.ids, self.mask, self.positions, self.logits = (
            roles["input_ids"], roles.get("attention_mask"), roles.get("position_ids"), roles["logits"])
        self.token_dtype = np.dtype(graph_io.get("token_dtype") or "int64")
        cache = graph_io.get("kv_cache")
        self.past: list[list[str]] = cache["inputs"] if cache else []
        self.present: list[list[str]] = cache["outputs"] if cache else []
        self.heads_dims: list[list[list[int]]] = cache["heads_head_dim"] if cache else []
        dtype = (cache or {}).get("dtype", "float32")
        if dtype not in _NP_DTYPES:
            raise BundleError(f"bundle: foreign KV cache dtype {dtype!r} is not one r1c can feed from numpy")
        self.cache_dtype = _NP_DTYPES[dtype]

    @property
    def has_cache(self) -> bool:
        return bool(self.past)

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, heads, 0, dim), dtype=self.cache_dtype)
                for layer in self.heads_dims for heads, dim in layer]

    def run(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """logits [B, S, V] float32 and the present tensors (empty without a cache) of one call."""
        batch, new = ids.shape
        cached = past[0].shape[2] if past else 0
        feeds = {self.ids: np.ascontiguousarray(ids, dtype=self.token_dtype)}
        if self.mask is not None:
            feeds[self.mask] = np.ones((batch, cached + new), dtype=self.token_dtype)
        if self.positions is not None:
            feeds[self.positions] = np.broadcast_to(np.arange(cached, cached + new, dtype=self.token_dtype),
                                                    (batch, new)).copy()
        names = [name for layer in self.past for name in layer]
        feeds.update(zip(names, past))
        out = self.backend.run(feeds)
        present = [out[name] for layer in self.present for name in layer]
        return np.asarray(out[self.logits], dtype=np.float32), present


def probe_vocab_size(backend: Any, graph_io: dict[str, Any]) -> int:
    """The vocabulary of a graph whose logits have a symbolic last dim: one forward of token 0."""
    graph = _Graph({**graph_io, "vocab_size": 1}, backend)
    try:
        logits, _ = graph.run(np.zeros((1, 1), dtype=np.int64), graph.empty_past(1))
    except Exception as e:  # the backend raises ONNX Runtime's own errors
        raise BundleError(f"bundle: the foreign model does not run on one token ({str(e).strip()[:200]})") from None
    return int(logits.shape[-1])


class ForeignEngine:
    """A loaded bundle of a foreign model: `forward` for logits, `generate` for greedy batched decoding."""

    config = None  # no r1c model config

    def __init__(self, bundle_dir: Path, manifest: Manifest, backend: Any) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.backend = backend
        self.graph = _Graph(manifest.graph_io, backend)
        self.vocab_size = int(manifest.graph_io["vocab_size"])

    def _check_ids(self, ids: np.ndarray) -> None:
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.max() if ids.max() >= self.vocab_size else ids.min())
            raise RuntimeInputError(f"token id {bad} is out of range [0, {self.vocab_size})")

    def forward(self, input_ids: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Logits float32 [B, S, V] of a batch of equal-length sequences, with no past."""
        ids = np.asarray(input_ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise RuntimeInputError(f"input_ids must be [batch, seq] with seq > 0, got shape {list(ids.shape)}")
        self._check_ids(ids)
        logits, _ = self.graph.run(ids, self.graph.empty_past(ids.shape[0]))
        return logits

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, eos_token_id: int | None = None,
                 on_step: StepCallback | None = None) -> list[list[int]]:
        """Greedy continuation of each prompt; returns only the new tokens (see the module docstring).

        `on_step(step, tokens)` after each step with the [B] tokens just chosen (step 0 = prefill); a row stops
        at `eos_token_id` (kept in its output).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise RuntimeInputError("every prompt needs at least one token")
        if max_new_tokens < 0:
            raise RuntimeInputError("max_new_tokens must be >= 0")
        if eos_token_id is not None and not 0 <= eos_token_id < self.vocab_size:
            raise RuntimeInputError(f"eos token id {eos_token_id} is out of range [0, {self.vocab_size})")
        for p in prompts:
            self._check_ids(np.asarray(p, dtype=np.int64))
        out: list[list[int]] = [[] for _ in prompts]
        if max_new_tokens == 0:
            return out
        groups: dict[int, list[int]] = {}
        for row, p in enumerate(prompts):
            groups.setdefault(len(p), []).append(row)
        # per group: the ids it runs next (all of them without a cache) and its past
        state = {n: (np.array([prompts[r] for r in rows], dtype=np.int64), self.graph.empty_past(len(rows)))
                 for n, rows in groups.items()}
        done = np.zeros(len(prompts), dtype=bool)
        tokens = np.zeros(len(prompts), dtype=np.int64)
        for step in range(max_new_tokens):
            for n, rows in groups.items():
                if done[rows].all():
                    continue
                ids, past = state[n]
                logits, present = self.graph.run(ids, past)
                chosen = logits[:, -1].argmax(-1).astype(np.int64)
                tokens[rows] = chosen
                if self.graph.has_cache:
                    state[n] = (chosen[:, None], present)
                else:
                    state[n] = (np.concatenate([ids, chosen[:, None]], axis=1), past)
            for row in map(int, np.flatnonzero(~done)):
                out[row].append(int(tokens[row]))
            if eos_token_id is not None:
                done |= tokens == eos_token_id
            if on_step is not None:
                on_step(step, tokens.copy())
            if done.all():
                break
        return out
