"""The followers' copies of rank 0's latent KV caches, kept equal by replaying rank 0's cache journal.

Every rank computes the same latents (MLA's cache is replicated over the tensor-parallel group and over expert
partitions, see `shard_attention`), so each follower keeps its own `LatentCache` per cache rank 0 steps on, of the
same size, and redoes on it what rank 0 did to its own, in the same order: rows added and popped, rows moved, the
capacity bucket changed (`kvcache.LatentCache.journal`), and each step's new latents written — with the follower's
own outputs of that step, so no cache data ever travels, only a few integers per step.

Rank 0 (`CacheJournals`) names each cache by a key the first time a step binds it, copies its state then (rows,
bucket, row lengths: a cache must not have been written by anything but this backend's steps before), switches its
journal on, and with every later step of that cache sends what the journal gathered since that cache's previous
step, plus the keys of caches that were garbage-collected meanwhile. The words on the wire (int64), one entry after
another, each `[code, nargs, *args]`:

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
        Raises `BundleError` for a cache whose journal another engine already keeps."""
        with self._lock:
            words: list[int] = []
            while self._gone:
                words += [FREE, 1, self._gone.pop(0)]
            key = self._keys.get(cache)
            if key is None:
                if cache.journal is not None:
                    raise BundleError("bundle: this cache already steps on another sharded engine (one cache per "
                                      "sharded engine)")
                key = self._next
                self._next += 1
                self._keys[cache] = key
                weakref.finalize(cache, self._gone.append, key)
                lengths = cache.lengths[: cache.rows].tolist()
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
        self.caches: dict[int, LatentCache] = {}
        self._last: dict[int, dict[str, np.ndarray]] = {}  # each cache's latest step outputs, until written

    def apply(self, key: int, words: np.ndarray) -> None:
        """Replay one step's words; `key` is the cache the step runs on."""
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

    def stepped(self, key: int, outputs: dict[str, np.ndarray]) -> None:
        """Keep this step's new latents ([L, n, S, ch] per tensor) for the WRITE that follows it."""
        self._last[key] = {name: outputs[out] for name, out in self.outputs.items()}
