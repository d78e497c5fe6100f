"""The backend-step interface: what every backend (ONNX Runtime, TensorRT) implements to serve steps.

A *step* runs the graph once over a contiguous range of cache rows [r0, r1) (n = r1 - r0 rows, S tokens each,
right-padded). The caller (`StepRunner`, used by `Engine.generate` and by the serving scheduler) prepares one
`StepIO`; the backend runs the graph on it and returns:

    io.input_ids    [n, S] int64        host; row i's real tokens are the first n_new[i]
    io.past_lengths [n] int64           host; cached tokens per row (also each row's position offset)
    io.logits_index [n, K] int64 | None host; the positions (< S) of each row whose logits the graph computes
                                        (graph input `logits_index`: a step that samples asks for each row's last
                                        real token, K = 1; a scoring step for all, K = S); None for a graph
                                        without that input (exported before it), which computes all S
    io.past         {"past_c.{l}": [n, C, P], "past_pe.{l}": [n, R, P]}  views into the cache's arenas
                    (`kvcache.LatentCache.feeds`): contiguous, bound by pointer, never copied
    io.logits       [n, K, V] float32   preallocated output buffer (a view; K = S without logits_index); the
                                        backend writes into it
    io.new          {"c": [L, n, S, C], "pe": [L, n, S, R]}  preallocated output buffers for the new latents
    io.key          hashable or None    names the buffers (below)
    io.r0, io.cache the first row and the `LatentCache` the views come from (for a backend that keeps a copy of
                    the cache elsewhere: the follower ranks of a sharded bundle replay the cache's journal)

    class StepBackend(Protocol):
        def step(self, io: StepIO) -> None     # run once; outputs written into io.logits / io.new

Rules a backend keeps: no allocation of cache-sized memory per step and no copy of `io.past` (bind the views by
address: ONNX Runtime `IOBinding.bind_input(..., buffer_ptr)`, TensorRT `set_tensor_address`); outputs go into the
given buffers; the arrays are numpy on the host or, for a device backend, whatever its `alloc` made (torch CUDA
tensors), with `input_ids` / `past_lengths` always host numpy (a few bytes to upload). After the step, the runner
writes only the new tokens' latents into the cache (`LatentCache.write`) and advances the rows' lengths, so a
backend never touches the cache beyond reading it — except through one optional method, for a decode step (one
token a row) of a cache without a journal:

        def decode_in_place(self, io, input_ids, lengths, n_new) -> bool

which, when it returns True, has run the step on `input_ids` [n, 1] and the lengths view `lengths` [n] (the cache's
own, int64) instead of io's ids and lengths, written the logits and new latents into io's buffers as `step` does,
and also stored each row's latents in the cache at its length and advanced `lengths` by `n_new` ([n] values 0 / 1),
as `LatentCache.write` would; False: it did nothing and the runner steps as above (OrtBackend's native decoder,
r1c.runtime.native_decode: one C call for what is otherwise three copies, the run and the write).
The arenas' addresses never change (allocated once); a view's address and shape change only when rows are
added/removed or the capacity bucket changes.

Bindings made once. Every buffer of a `StepIO` is allocated once by its `StepRunner` (the ids, lengths and logits
index too: the runner copies each step's few values into them) or is a view into the cache's arenas (allocated once,
never replaced), so a step's buffers are a function of (runner, r0, n, S, K, P). The runner keeps one `StepIO` per
such shape (the most recent `MAX_CACHED_STEPS`) and gives it the `key` (runner serial, r0, n, S, K, P), the serial
unique in the process (never reused, even after the runner is garbage-collected): two `StepIO`s with the same
non-None key have the same address, shape, strides and dtype in every field; only the contents of `input_ids`,
`past_lengths` and `logits_index` (and of the cache) differ. A backend may therefore bind once per key and reuse the
binding (`OrtBackend` keeps its `IOBinding` on the keyed `StepIO` itself, in `StepIO.bound`, so a decode step of an
unchanged batch composition and bucket costs one `run_with_iobinding`, and the binding is dropped with the
`StepIO` when the runner evicts it or is collected; the TensorRT backend compares addresses). A bucket change (P),
rows added or removed (n) or a different row range (r0) is a new key, so a new binding. A `StepIO` with key None
(built by another caller, or by a runner with `bind_once=False`) must be bound afresh.

A backend that only has `run(feeds) -> outputs` (the older interface, kept by `TensorRTBackend` until its
device-resident rewrite) is wrapped by `FeedsStepBackend`, which copies the (small) outputs into the buffers.
A backend whose buffers live on a device says so with an `alloc(shape, dtype)` attribute (`backend_alloc`): the
cache manager and the runner then allocate their arenas and output buffers with it, once.

Legend: n = rows in the step, S = tokens per row, K = positions per row whose logits are computed, P = capacity
bucket, L = layers, C = kv_lora_rank, R = qk_rope_head_dim, V = vocab size.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from r1c.graph_io import LOGITS_INDEX
from r1c.runtime.kvcache import TENSORS, Alloc, LatentCache, numpy_alloc


@dataclasses.dataclass
class StepIO:
    input_ids: np.ndarray
    past_lengths: np.ndarray
    past: dict[str, Any]
    logits: Any
    new: dict[str, Any]
    key: Hashable | None = None  # equal keys: equal buffers (module docstring); None: bind afresh
    r0: int = 0
    cache: LatentCache | None = None
    logits_index: np.ndarray | None = None  # [n, K] int64 (module docstring); None: the graph has no such input
    # what the backend that steps this io keeps for it while the io lives (OrtBackend: (itself, its IOBinding)):
    # dies with the runner's cache entry, so nothing outlives the buffers it points at. A StepIO is stepped by one
    # backend, its runner's, from one thread at a time.
    bound: Any = None

    def feeds(self) -> dict[str, Any]:
        """All graph inputs by name (for `run(feeds)` backends)."""
        index = {} if self.logits_index is None else {LOGITS_INDEX: self.logits_index}
        return {"input_ids": self.input_ids, "past_lengths": self.past_lengths, **index, **self.past}

    def outputs(self) -> dict[str, Any]:
        """All graph outputs by name."""
        return {"logits": self.logits, "new_c": self.new["c"], "new_pe": self.new["pe"]}


@runtime_checkable
class StepBackend(Protocol):
    def step(self, io: StepIO) -> None: ...


class FeedsBackend(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class FeedsStepBackend:
    """Adapts a `run(feeds) -> outputs` backend to `step`: outputs are copied into the step's buffers."""

    def __init__(self, inner: FeedsBackend) -> None:
        self.inner = inner

    def step(self, io: StepIO) -> None:
        out = self.inner.run({k: np.ascontiguousarray(v) for k, v in io.feeds().items()})
        for name, buf in io.outputs().items():
            buf[...] = out[name]


def as_step_backend(backend: Any) -> StepBackend:
    return backend if isinstance(backend, StepBackend) else FeedsStepBackend(backend)


def backend_alloc(backend: Any) -> Alloc:
    """The allocator a backend wants its cache and step buffers in (`backend.alloc`, e.g. CUDA tensors for the
    device-resident TensorRT backend); host numpy for a backend without one."""
    alloc = getattr(backend, "alloc", None)
    return alloc if callable(alloc) and isinstance(backend, StepBackend) else numpy_alloc


def to_host(x: Any) -> np.ndarray:
    """A step's output (a view into a backend buffer: numpy, or a torch tensor on a device) as a host numpy copy."""
    if isinstance(x, np.ndarray):
        return np.array(x)
    return np.asarray(x.detach().float().cpu().numpy())


def host_view(x: Any) -> np.ndarray:
    """A step's output on the host without a copy where it already is there (numpy: the view itself, same shape
    and dtype, valid until the next step overwrites the buffer); a device tensor is copied as by `to_host`
    (float32)."""
    return x if isinstance(x, np.ndarray) else to_host(x)


# StepIOs (and with them their backend bindings, `StepIO.bound`) kept per runner: decode shapes plus recent prefill
# chunks
MAX_CACHED_STEPS = 64
_runner_serials = itertools.count()


class StepRunner:
    """Runs steps over a cache's rows with every buffer allocated once: output buffers for `max_tokens` tokens
    (n * S), the ids, lengths and logits-index inputs, and one `StepIO` per step shape (r0, n, S, K, P), keyed for
    the backend. `logits_index`: whether the graph takes that input (graph_io; graphs exported before it compute
    the logits of every position, and the runner picks the asked ones out)."""

    def __init__(self, backend: Any, cache: LatentCache, vocab_size: int, max_tokens: int,
                 alloc: Alloc = numpy_alloc, *, bind_once: bool = True, logits_index: bool = True) -> None:
        self.backend = as_step_backend(backend)
        self.selects = logits_index
        self.bind_once = bind_once  # False: a fresh unkeyed StepIO every step, bound afresh (the pre-issue-11 path)
        self.cache = cache
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens
        L = cache.layout.layers
        self._logits = alloc((max_tokens * vocab_size,), np.dtype(np.float32))
        self._new = {name: alloc((L * max_tokens * ch,), cache.layout.dtype)
                     for name, ch in zip(TENSORS, cache.layout.channels)}
        self._ids = np.zeros(max_tokens, dtype=np.int64)  # host, as the interface says
        self._lengths = np.zeros(cache.max_rows, dtype=np.int64)
        self._index = np.zeros(max_tokens, dtype=np.int64)
        self._arange = np.arange(max_tokens, dtype=np.int64)
        self._serial = next(_runner_serials)
        self._ios: dict[tuple[int, int, int, int, int], StepIO] = {}  # least recently used first
        self._in_place = getattr(self.backend, "decode_in_place", None)

    def io(self, r0: int, n: int, s: int, k: int | None = None) -> StepIO:
        """The `StepIO` of rows [r0, r0 + n), S = s tokens each, logits at K = k positions per row (default S), at
        the cache's current bucket P: made once per shape (r0, n, S, K, P) and keyed (runner serial, r0, n, S, K,
        P) — or, with `bind_once=False`, made afresh with key None. Its ids, lengths and index are filled by
        `step`. A graph without `logits_index` always computes K = S."""
        k = s if k is None or not self.selects else k
        shape = (r0, n, s, k, self.cache.bucket)
        if not self.bind_once:
            return self._make_io(shape, None)
        io = self._ios.pop(shape, None)  # re-inserted below: the dict's order is least recently used first
        if io is None:
            io = self._make_io(shape, (self._serial, *shape))
            if len(self._ios) >= MAX_CACHED_STEPS:
                self._ios.pop(next(iter(self._ios)))
        self._ios[shape] = io
        return io

    def _make_io(self, shape: tuple[int, int, int, int, int], key: Hashable | None) -> StepIO:
        r0, n, s, k, _ = shape  # the cache's bucket is P: its views are [n, ch, P]
        L = self.cache.layout.layers
        return StepIO(
            input_ids=self._ids[: n * s].reshape(n, s),
            past_lengths=self._lengths[:n],
            past=self.cache.feeds(r0, r0 + n),
            logits=self._logits[: n * k * self.vocab_size].reshape(n, k, self.vocab_size),
            new={name: self._new[name][: L * n * s * ch].reshape(L, n, s, ch)
                 for name, ch in zip(TENSORS, self.cache.layout.channels)},
            key=key, r0=r0, cache=self.cache,
            logits_index=self._index[: n * k].reshape(n, k) if self.selects else None,
        )

    def step(self, input_ids: np.ndarray, r0: int, n_new: Sequence[int] | np.ndarray | None) -> Any:
        """Run rows [r0, r0 + n) on `input_ids` [n, S] (integer ids, copied into the runner's int64 buffer).

        With `n_new` ([n] int: real tokens per row) the new latents are stored, the lengths advanced, and the
        logits computed at each row's last real token only (position n_new[i] - 1; 0 for a row with none): returns
        [n, 1, V] float32. With None nothing is written (scoring) and every position's logits come back: [n, S, V].
        The result is the runner's buffer (valid until the next step), or for a graph without `logits_index` and
        S > 1 a copy of the asked positions. The caller resizes the cache first so every row fits. Per step, besides
        the backend's run: three small copies (ids, lengths, index) and, when the shape (r0, n, S, K, P) is new, one
        `StepIO`.
        A row's positions past its n_new real tokens (padding) are given its last real token's id (see below)."""
        n, s = input_ids.shape
        if n * s > self.max_tokens:
            raise AssertionError(f"step of {n}x{s} tokens exceeds the runner's {self.max_tokens}")
        # a row with no new token (n_new 0: nothing stored, nothing to sample) asks for position 0, never -1 (a
        # negative index means "from the end" in ONNX and is not one every backend's gather takes)
        if s == 1 and n_new is not None:  # decode: every row's logits at its one position (no numpy call here)
            io = self.io(r0, n, 1, 1)
            # a backend that stores the latents itself (OrtBackend's native decoder): one call, the cache's lengths
            # advanced in place (not with a journal to keep: a sharded bundle's followers replay the writes)
            if (self._in_place is not None and self.cache.journal is None and isinstance(input_ids, np.ndarray) and
                    self._in_place(io, input_ids, self.cache.lengths[r0:r0 + n], n_new)):
                return io.logits
            io.input_ids[...] = input_ids
            io.past_lengths[...] = self.cache.lengths[r0:r0 + n]
            if io.logits_index is not None:
                io.logits_index.fill(0)
            self.backend.step(io)
            self.cache.write(r0, n_new, io.new)
            return io.logits
        last = None if n_new is None else np.maximum(np.asarray(n_new, dtype=np.int64) - 1, 0)
        io = self.io(r0, n, s, None if last is None else 1)
        if last is not None and s > 1:
            # padding after a row's real tokens repeats its last real token: a padded position never reaches a
            # real one (causal attention, per-token MoE; its latents are not stored), so its id is free, and a
            # copy of the last token routes to (nearly) the experts that token already reads, where a 0 would
            # pull up to k more experts per MoE layer through memory (a decode row joined to a prompt chunk); a
            # row with no real token (n_new 0, nothing stored) repeats its first id
            io.input_ids[...] = np.take_along_axis(np.asarray(input_ids), np.minimum(self._arange[:s], last[:, None]),
                                                   axis=1)
        else:
            io.input_ids[...] = input_ids
        io.past_lengths[...] = self.cache.lengths[r0:r0 + n]
        if io.logits_index is not None:
            io.logits_index[...] = np.arange(s) if last is None else last[:, None]
        self.backend.step(io)
        if n_new is not None:
            self.cache.write(r0, n_new, io.new)
        if last is not None and io.logits_index is None:  # a graph that computed every position
            return io.logits[np.arange(n), last][:, None]
        return io.logits
