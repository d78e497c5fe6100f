"""The followers' copies of rank 0's latent KV caches, kept equal by replaying rank 0's cache journal.

Every rank computes the same latents (MLA's cache is replicated over the tensor-parallel group and over expert
partitions, see `shard_attention`), so each follower keeps its own `LatentCache` per cache rank 0 steps on, of the
same size, and redoes on it what rank 0 did to its own, in the same order: rows added and popped, rows moved, the
capacity bucket changed (`kvcache.LatentCache.journal`), and each step's new latents written — with the follower's
own outputs of that step, so no cache data ever travels, only a few integers per step.

Rank 0 (`CacheJournals`) names each cache by a key the first time a step binds it, copies its state then (rows,
bucket, row lengths — not the latents: a cache must not have been written by anything but this backend's steps
before, so a cache whose rows already hold tokens on first sight is refused with a BundleError, unless its
`contents_unused` is set: lengths set without latents for a timing measurement, as `r1c bench-serving`'s capacity
bucket does, whose followers then hold the lengths over unrelated contents), switches its journal on, and with
every later step of that cache sends what the journal gathered since that cache's previous step, plus the keys of
caches that were garbage-collected meanwhile. The words on the wire (int64), one entry after another, each
`[code, nargs, *args]`:

    CREATE key capacity_tokens max_rows max_len min_bucket bucket rows *lengths   a cache seen for the first time
    FREE key                                                                      a cache rank 0 no longer has
    ADD_ROW | POP_ROW | MOVE_ROW src dst | RESIZE bucket | WRITE r0 *n_new        the stepped cache's journal
                                                                                  (`kvcache` codes)

A WRITE always refers to the most recent step of that cache (`StepRunner` writes right after its step), whose
outputs the follower keeps until then (`CacheReplica.stepped`). The follower checks, every step, that its rows'
lengths equal the past_lengths rank 0 sends (a BundleError, never a silent divergence).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

from r1c.errors import BundleError
from r1c.runtime.kvcache import ADD_ROW, MOVE_ROW, POP_ROW, RESIZE, TENSORS, WRITE, CacheLayout, LatentCache
from r1c.runtime.step import StepIO

CREATE, FREE = 10, 11


def cache_inputs(graph_io: dict[str, Any]) -> list[str]:
    """The graph's cache input names (`past_c.{l}`, `past_pe.{l}` for every layer)."""
    kv = graph_io["kv_cache"]
    return [t["input"].format(layer=layer) for t in kv["tensors"].values() for layer in range(kv["layers"])]


class CacheJournals:
    """Rank 0: a key per cache that steps bind, and the words (module docstring) each step sends."""

    def __init__(self) -> None:
        self._keys: weakref.WeakKeyDictionary[LatentCache, int] = weakref.WeakKeyDictionary()
        self._next = 0
        self._gone: list[int] = []  # keys of collected caches (appended by finalizers, from any thread)
        self._lock = threading.Lock()

    def take(self, cache: LatentCache) -> tuple[int, np.ndarray]:
        """The key of `cache` and the words to send with its step; starts the cache's journal on first sight.
        Raises `BundleError` for a cache whose journal another engine already keeps, and for a cache first seen
        with tokens in its rows (nonzero lengths: the followers could copy the lengths but not the latents) unless
        `cache.contents_unused` says the contents do not matter."""
        with self._lock:
            words: list[int] = []
            while self._gone:
                words += [FREE, 1, self._gone.pop(0)]
            key = self._keys.get(cache)
            if key is None:
                if cache.journal is not None:
                    raise BundleError("bundle: this cache already steps on another sharded engine (one cache per "
                                      "sharded engine)")
                lengths = cache.lengths[: cache.rows].tolist()
                if any(lengths) and not cache.contents_unused:
                    raise BundleError("bundle: a sharded engine steps only on a cache whose rows it wrote itself; "
                                      f"this cache's rows already hold {lengths} tokens, which the other ranks' "
                                      "copies cannot get (start from empty rows, or set cache.contents_unused for a "
                                      "timing measurement)")
                key = self._next
                self._next += 1
                self._keys[cache] = key
                weakref.finalize(cache, self._gone.append, key)
                state = [key, cache.capacity_tokens, cache.max_rows, cache.max_len, cache.buckets[0], cache.bucket,
                         cache.rows, *lengths]
                words += [CREATE, len(state), *state]
                cache.journal = []
            else:
                entries, cache.journal = cache.journal or [], []
                for entry in entries:
                    words += [entry[0], len(entry) - 1, *entry[1:]]
            return key, np.array(words, dtype=np.int64)

    def close(self) -> None:
        """Stop journaling the caches (they may outlive the engine)."""
        with self._lock:
            for cache in list(self._keys):
                cache.journal = None


class CacheReplica:
    """A follower: one `LatentCache` per rank-0 key, changed only by replaying rank 0's words."""

    def __init__(self, graph_io: dict[str, Any]) -> None:
        self.layout = CacheLayout.from_graph_io(graph_io)
        tensors = graph_io["kv_cache"]["tensors"]
        self.outputs = {name: tensors[name]["output"] for name in TENSORS}  # "c" -> "new_c"
        self.graph_io = graph_io
        self.caches: dict[int, LatentCache] = {}
        self._last: dict[int, dict[str, np.ndarray]] = {}  # each cache's latest step outputs, until written
        self._buffers: dict[int, dict[str, np.ndarray]] = {}  # each cache's step output buffers (flat)

    def apply(self, key: int, words: np.ndarray) -> None:
        """Replay one step's words; `key` is the cache the step runs on.

        Raises `BundleError` when the words do not fit this copy (the copies diverged, or rank 0 and this rank run
        different code): a journal entry for a cache this rank does not have, an unknown entry code, or a WRITE of
        a step this rank did not run (no outputs kept by `stepped`)."""
        w = words.tolist()
        i = 0
        while i < len(w):
            code, n = w[i], w[i + 1]
            args = w[i + 2: i + 2 + n]
            i += 2 + n
            if code == CREATE:
                self._create(args)
            elif code == FREE:
                self.caches.pop(args[0], None)
                self._last.pop(args[0], None)
                self._buffers.pop(args[0], None)
            else:
                self._journal_entry(self._cache(key), key, code, args)

    def _create(self, args: list[int]) -> None:
        key, capacity, max_rows, max_len, min_bucket, bucket, rows, *lengths = args
        cache = LatentCache(self.layout, capacity * self.layout.bytes_per_token, max_rows=max_rows,
                            max_len=max_len, min_bucket=min_bucket)
        cache.bucket, cache.rows = bucket, rows
        cache.lengths[:rows] = lengths
        self.caches[key] = cache

    def _journal_entry(self, cache: LatentCache, key: int, code: int, args: list[int]) -> None:
        if code == ADD_ROW:
            cache.add_row()
        elif code == POP_ROW:
            cache.pop_row()
        elif code == MOVE_ROW:
            cache.move_row(args[0], args[1])
        elif code == RESIZE:
            cache.resize(args[0])
        elif code == WRITE:
            new = self._last.pop(key, None)
            if new is None:
                raise BundleError("bundle: rank 0 wrote a step this rank did not run (the cache copies diverged)")
            cache.write(args[0], args[1:], new)
        else:
            raise BundleError(f"bundle: unknown cache journal entry {code} from rank 0")

    def _cache(self, key: int) -> LatentCache:
        try:
            return self.caches[key]
        except KeyError:
            raise BundleError(f"bundle: rank 0 steps on cache {key}, which this rank does not have") from None

    def feeds(self, key: int, r0: int, past_lengths: np.ndarray) -> dict[str, np.ndarray]:
        """The cache inputs of rows [r0, r0 + n) (views, bound in place); `BundleError` if this copy's row lengths
        differ from rank 0's `past_lengths` [n]."""
        cache = self._cache(key)
        n = len(past_lengths)
        if r0 + n > cache.rows or not np.array_equal(cache.lengths[r0:r0 + n], past_lengths):
            raise BundleError(f"bundle: this rank's cache copy {key} disagrees with rank 0 on rows [{r0}, {r0 + n}) "
                              f"(lengths {cache.lengths[r0:r0 + n].tolist()} vs {past_lengths.tolist()})")
        return cache.feeds(r0, r0 + n)

    def step_io(self, key: int, r0: int, input_ids: np.ndarray, past_lengths: np.ndarray,
                logits_index: np.ndarray | None = None) -> StepIO:
        """The `StepIO` of a step over rows [r0, r0 + n) of cache `key` on `input_ids` [n, S] int64 and, for a graph
        that takes it, `logits_index` [n, K] (this copy's views, checked as by `feeds`), with output buffers kept
        per cache: `logits` [n, K, V] float32 (K = S without an index) and `new`
        {"c": [L, n, S, C], "pe": [L, n, S, R]} (the cache's dtype; legend in `r1c.runtime.step`), views into flat
        buffers made when a step of this cache needs more tokens than any before and reused after. Per cache, not
        shared: a step's new latents stay in them until the WRITE that the next step of the same cache carries.
        Key None (bound afresh: the buffers' addresses change when they grow)."""
        past = self.feeds(key, r0, past_lengths)
        n, s = input_ids.shape
        tokens = n * s
        L = self.layout.layers
        buffers = self._buffers.get(key)
        if buffers is None or buffers["logits"].size < tokens * self._vocab():
            buffers = self._buffers[key] = {"logits": np.empty(tokens * self._vocab(), np.float32), **{
                name: np.empty(L * tokens * ch, self.layout.dtype)
                for name, ch in zip(TENSORS, self.layout.channels)}}
        k = s if logits_index is None else logits_index.shape[1]
        return StepIO(input_ids=input_ids, past_lengths=past_lengths, past=past,
                      logits=buffers["logits"][: n * k * self._vocab()].reshape(n, k, self._vocab()),
                      new={name: buffers[name][: L * tokens * ch].reshape(L, n, s, ch)
                           for name, ch in zip(TENSORS, self.layout.channels)}, r0=r0, cache=self.caches[key],
                      logits_index=logits_index)

    def _vocab(self) -> int:
        """V: the last dimension of the graph's `logits` output."""
        return int(next(o for o in self.graph_io["outputs"] if o["name"] == "logits")["shape"][-1])

    def stepped(self, key: int, outputs: dict[str, np.ndarray]) -> None:
        """Keep this step's new latents ([L, n, S, ch] per tensor) for the WRITE that follows it."""
        self._last[key] = {name: outputs[out] for name, out in self.outputs.items()}
