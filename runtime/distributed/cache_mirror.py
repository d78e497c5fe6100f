"""The followers' copies of rank 0's latent KV cache, kept in step without ever sending the cache.

Every rank computes the same latent (MLA's cache is replicated over the tensor-parallel group, see
`shard_attention`), so a follower keeps its own buffers and writes its own step outputs into them exactly where
the graph contract says rank 0 writes them: the S new tokens of row b at positions [past_lengths[b],
past_lengths[b] + S) (entries at p >= past_lengths[b] are masked, so the padded tail of a prefill is harmless).
Rank 0 names each cache it binds by a key (`CacheKeys`) and says when one is freed; only the non-cache inputs
travel each step. This holds for any caller that changes its cache only by appending a step's outputs at
past_lengths, as `r1c.runtime.Engine` does; a scheduler that moves or compacts cache rows would have to send
those moves too.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from r1c.errors import BundleError
from r1c.runtime.engine import cache_dtype

# graph_io["kv_cache"]["tensors"]: {kind: {"input": "past_c.{layer}", "output": "new_c", "channels": C}}


def cache_inputs(graph_io: dict[str, Any]) -> list[str]:
    kv = graph_io["kv_cache"]
    return [t["input"].format(layer=layer) for t in kv["tensors"].values() for layer in range(kv["layers"])]


class CacheKeys:
    """Rank 0: a stable key per bound cache buffer, and the keys of buffers freed since the last step."""

    def __init__(self, graph_io: dict[str, Any]) -> None:
        self.first_input = cache_inputs(graph_io)[0]
        self._ids: dict[int, int] = {}
        self._next = 0
        self._shapes: dict[int, tuple[int, ...]] = {}
        self.freed: list[int] = []

    def key(self, feeds: dict[str, np.ndarray]) -> int:
        """The key of the cache the feeds bind; BundleError for a cache the followers cannot mirror."""
        arr = feeds[self.first_input]
        base = arr.base if isinstance(arr.base, np.ndarray) else arr  # the cache's [L, ...] buffer, or the array
        ident = id(base)
        shape = arr.shape
        if ident not in self._ids:
            self._ids[ident] = self._next
            self._shapes[self._next] = shape
            weakref.finalize(base, self._free, ident, self._next)
            self._next += 1
        key = self._ids[ident]
        if self._shapes[key] != shape or arr.__array_interface__["data"][0] != base.__array_interface__["data"][0]:
            # rows bound at an offset, or a capacity that changes under the same buffer: the cache is being
            # relaid out (a serving scheduler's row moves / capacity buckets), which the followers do not see
            raise BundleError("bundle: a sharded bundle's followers mirror a cache that only grows by appended "
                              "steps (r1c.runtime.Engine); this caller moves cache rows or changes its capacity "
                              "in place, which sharded bundles do not support yet")
        return key

    def _free(self, ident: int, key: int) -> None:
        if self._ids.get(ident) == key:
            del self._ids[ident]
        self._shapes.pop(key, None)
        self.freed.append(key)

    def take_freed(self) -> list[int]:
        freed, self.freed = self.freed, []
        return freed


class CacheMirror:
    """A follower: one set of cache buffers per rank-0 key, written with this rank's own step outputs."""

    def __init__(self, graph_io: dict[str, Any]) -> None:
        kv = graph_io["kv_cache"]
        self.layers = int(kv["layers"])
        self.kinds = [(t["input"], t["output"], int(t["channels"])) for t in kv["tensors"].values()]
        self.dtype = cache_dtype(graph_io)
        self.buffers: dict[int, dict[str, np.ndarray]] = {}

    def feeds(self, key: int, batch: int, capacity: int) -> dict[str, np.ndarray]:
        """Views of the key's buffers ([L, B, ch, capacity] per kind), allocated on first use."""
        bufs = self.buffers.get(key)
        if bufs is None or next(iter(bufs.values())).shape[1::2] != (batch, capacity):
            bufs = self.buffers[key] = {out: np.zeros((self.layers, batch, ch, capacity), self.dtype)
                                        for _, out, ch in self.kinds}
        return {template.format(layer=layer): bufs[out][layer] for template, out, _ in self.kinds
                for layer in range(self.layers)}

    def append(self, key: int, outputs: dict[str, np.ndarray], past_lengths: np.ndarray) -> None:
        """Write this step's latents ([L, B, S, ch] per kind) at each row's past length (clipped to capacity)."""
        bufs = self.buffers[key]
        for _, out, _ch in self.kinds:
            new, buf = outputs[out], bufs[out]
            s, capacity = new.shape[2], buf.shape[3]
            if s == 1 and int(past_lengths.max(initial=0)) < capacity:  # decode: one write for all rows
                rows = np.arange(buf.shape[1])
                buf[:, rows, :, past_lengths] = new[:, :, 0, :].transpose(1, 0, 2)
                continue
            for b, start in enumerate(past_lengths.tolist()):
                stop = min(start + s, capacity)
                if stop > start:
                    buf[:, b, :, start:stop] = new[:, b, : stop - start].transpose(0, 2, 1)

    def drop(self, keys: list[int]) -> None:
        for key in keys:
            self.buffers.pop(key, None)
