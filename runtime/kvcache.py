"""The latent KV cache: allocated once from a budget in bytes, rows compacted, capacity bucketed.

What the graph reads (exporter/onnx_export.py): per layer l, `past_c.{l}` [B, C, P] and `past_pe.{l}` [B, R, P]
(channel-major, P = capacity; entries at p >= past_lengths[b] are masked out), and it returns the new tokens'
latents `new_c` [L, B, S, C] / `new_pe` [L, B, S, R]. Attention costs B * P columns per layer, whatever the rows'
lengths, so the cache decides P.

Layout. For each of the two latent tensors (c: C = kv_lora_rank channels, pe: R = qk_rope_head_dim channels) the
cache owns one arena [L, T * ch] (T = token capacity = budget_bytes // bytes_per_token), allocated once. The live
sequences are rows 0..B-1 of the view of each layer's first B * ch * P elements shaped [B, ch, P], where P, the
*capacity bucket*, is one of a fixed list (min_bucket * 2^i, then max_len; consecutive buckets differ >= 2x). So
the rows [r0, r1) of a step are the contiguous view [r1 - r0, ch, P] at element offset r0 * ch * P: a backend
binds it by pointer (no copy), and attention reads P columns, a bucket over the longest row (at most 2x it), not
the arena's capacity. Rows share one bucket: a short row batched with a long one pays the long row's bucket.

What moves data, never per step:
- `resize(needed)`: when the longest row outgrows P (or the longest row leaves), every row is relaid from stride P
  to the new bucket in place (chunked copies whose sources and destinations never overlap; nothing allocated).
  Buckets double, so a token is moved O(1) times on average over a sequence's life;
- `move_row(src, dst)`: the filled part of one row; the scheduler calls it when a request finishes or is
  cancelled (the last row fills the hole) — once per request, not per step.
Each step writes only its new tokens' latents (`write`): 2 array assignments per step for decode, one per row
for prefill chunks.

Capacity rule: B * P <= T always holds. `fits(rows, longest)` says whether `rows` sequences whose longest reaches
`longest` tokens can all be held (the scheduler admits a request only if the worst case still fits, so a running
sequence never runs out of cache: back-pressure instead of an out-of-memory failure).

Journal. With `journal` set to a list (None: off, the default), every change of the layout or the contents is
appended to it as a tuple of ints, in order — (ADD_ROW,), (POP_ROW,), (MOVE_ROW, src, dst), (RESIZE, bucket),
(WRITE, r0, *n_new) — so that another process holding a cache of the same size can redo them with its own step
outputs (the follower ranks of a sharded bundle: `r1c.runtime.distributed.cache_replay`).

Arrays. The arenas come from `alloc(shape, dtype)` (numpy by default, its pages written at allocation:
`numpy_alloc`); everything else is slicing, reshape, `swapaxes` and item assignment, which torch tensors support
as well, so a device backend can keep the same cache on CUDA tensors
(`alloc=lambda shape, dtype: torch.zeros(shape, dtype=..., device="cuda")`). Row lengths live on the host
(`lengths`, int64).

Legend: L = layers, B = live rows, C = kv_lora_rank, R = qk_rope_head_dim, ch = C or R, P = capacity bucket,
T = token capacity of the budget, S = tokens of a step per row.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from r1c.errors import BundleError, RuntimeInputError

logger = logging.getLogger(__name__)

Alloc = Callable[[tuple[int, ...], np.dtype], Any]
TENSORS = ("c", "pe")  # graph inputs past_c.{l} / past_pe.{l}, outputs new_c / new_pe
ADD_ROW, POP_ROW, MOVE_ROW, RESIZE, WRITE = range(5)  # journal entries (module docstring)


class OverCapacityError(RuntimeInputError):
    """The cache (or the waiting queue) cannot take this request now or ever; the message says which."""


def numpy_alloc(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Zeros on the host, every page written once here (committed memory). `np.zeros` alone maps pages lazily, so
    the first step or relayout that reaches fresh pages would pay their faults: a relayout of the small preset's
    two rows to the 2,048-token bucket took 34 ms instead of ~1 ms, a 7x inter-token gap (`r1c bench-serving`'s
    long-prompt measurement)."""
    a = np.empty(shape, dtype=dtype)
    a.fill(0)
    return a


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """What one token costs: `layers` x (C + R) values of `dtype` (from the bundle's graph_io.json)."""

    layers: int
    channels: tuple[int, int]  # (C, R): kv_lora_rank, qk_rope_head_dim
    dtype: np.dtype

    @property
    def bytes_per_token(self) -> int:
        return self.layers * sum(self.channels) * self.dtype.itemsize

    @classmethod
    def from_graph_io(cls, graph_io: dict[str, Any]) -> CacheLayout:
        kv = graph_io["kv_cache"]
        return cls(layers=int(kv["layers"]), channels=(int(kv["tensors"]["c"]["channels"]),
                                                       int(kv["tensors"]["pe"]["channels"])),
                   dtype=cache_dtype(graph_io))


def cache_dtype(graph_io: dict[str, Any]) -> np.dtype:
    """The latent cache's numpy dtype from graph_io.json's kv_cache.dtype (float32 | bfloat16 | float16; float32
    when absent). Raises `BundleError` for another."""
    import ml_dtypes

    name = graph_io.get("kv_cache", {}).get("dtype", "float32")
    dtypes = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
    if name not in dtypes:
        raise BundleError(f"bundle: unknown latent cache dtype {name!r} in the manifest's graph_io")
    return np.dtype(dtypes[name])


def capacity_buckets(min_bucket: int, max_len: int) -> list[int]:
    """min_bucket * 2^i below max_len, then max_len; a bucket less than 2x below max_len is dropped (so that
    every resize moves rows by a factor >= 2, which keeps in-place relayout free of overlapping copies)."""
    if min_bucket < 1 or max_len < 1:
        raise RuntimeInputError("capacity buckets need min_bucket >= 1 and max_len >= 1")
    out: list[int] = []
    b = min_bucket
    while b < max_len:
        out.append(b)
        b *= 2
    while out and out[-1] * 2 > max_len:
        out.pop()
    return [*out, max_len]


def _chunks_grow(k: int, old: int, new: int) -> Iterator[tuple[int, int]]:
    """Descending line ranges [k0, k1) whose destinations (stride new) lie above their sources (stride old)."""
    k1 = k
    while k1 > 1:
        k0 = max(1, -(-k1 * old // new))  # ceil: k0 * new >= k1 * old, so dst start >= src end
        yield k0, k1
        k1 = k0


def _chunks_shrink(k: int, old: int, new: int) -> Iterator[tuple[int, int]]:
    """Ascending line ranges [k0, k1) whose destinations (stride new) end before their sources (stride old) start."""
    k0 = 1
    while k0 < k:
        k1 = min(k, k0 * old // new)  # k1 * new <= k0 * old, so dst end <= src start
        yield k0, k1
        k0 = k1


class LatentCache:
    """The cache of up to `max_rows` sequences of up to `max_len` tokens within `budget_bytes`.

    Raises `OverCapacityError` when the budget cannot hold even one sequence of `min_bucket` tokens.
    """

    def __init__(self, layout: CacheLayout, budget_bytes: int, *, max_rows: int, max_len: int, min_bucket: int = 64,
                 alloc: Alloc = numpy_alloc) -> None:
        self.layout = layout
        self.max_len = max_len
        self.buckets = capacity_buckets(min(min_bucket, max_len), max_len)
        self.capacity_tokens = int(budget_bytes) // layout.bytes_per_token
        if self.capacity_tokens < self.buckets[0]:
            raise OverCapacityError(f"cache budget of {budget_bytes} bytes holds {self.capacity_tokens} tokens; "
                                    f"at least {self.buckets[0]} are needed ({layout.bytes_per_token} bytes per token)")
        self.max_rows = max_rows
        L, T = layout.layers, self.capacity_tokens
        self.arenas = {name: alloc((L, T * ch), layout.dtype) for name, ch in zip(TENSORS, layout.channels)}
        self.lengths = np.zeros(max_rows, dtype=np.int64)
        self.rows = 0
        self.bucket = self.buckets[0]
        self.relayouts = 0  # how often rows were relaid (for tests and metrics)
        self.moves = 0
        self.journal: list[tuple[int, ...]] | None = None  # module docstring
        # True: the rows' lengths were set directly, without their latents (a timing measurement: `r1c
        # bench-serving`'s capacity bucket), so the contents mean nothing and a sharded engine's followers may copy
        # the lengths alone (`cache_replay`); False (default): such a cache is refused there
        self.contents_unused = False

    # ---- capacity -------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        return self.capacity_tokens * self.layout.bytes_per_token

    def bucket_for(self, tokens: int) -> int:
        if tokens > self.max_len:
            raise OverCapacityError(f"{tokens} tokens exceed the cache's max_len {self.max_len}")
        for b in self.buckets:
            if b >= tokens:
                return b
        raise AssertionError("unreachable: the last bucket is max_len")

    def fits(self, rows: int, longest: int) -> bool:
        """Whether `rows` sequences, the longest reaching `longest` tokens, fit together."""
        return (longest <= self.max_len and rows <= self.max_rows
                and rows * self.bucket_for(max(longest, 1)) <= self.capacity_tokens)

    @property
    def used_tokens(self) -> int:
        return int(self.lengths[: self.rows].sum())

    @property
    def reserved_tokens(self) -> int:
        """Tokens of the arena the live rows occupy at the current bucket (rows x bucket)."""
        return self.rows * self.bucket

    # ---- rows -----------------------------------------------------------------------------------------
    def add_row(self) -> int:
        """Append an empty row; returns its index. Raises `OverCapacityError` when the bucket leaves no room."""
        if self.rows >= self.max_rows or (self.rows + 1) * self.bucket > self.capacity_tokens:
            raise OverCapacityError(f"cache full: {self.rows} rows of {self.bucket} tokens "
                                    f"(capacity {self.capacity_tokens} tokens, max {self.max_rows} rows)")
        row = self.rows
        self.rows += 1
        self.lengths[row] = 0
        if self.journal is not None:
            self.journal.append((ADD_ROW,))
        return row

    def pop_row(self) -> None:
        """Drop the last row (its data stays but is never read: reads stop at each row's length)."""
        if self.rows == 0:
            raise AssertionError("pop_row on an empty cache")
        self.rows -= 1
        self.lengths[self.rows] = 0
        if self.journal is not None:
            self.journal.append((POP_ROW,))

    def move_row(self, src: int, dst: int) -> None:
        """Copy row `src`'s filled part into row `dst` (a row nobody needs any more) and its length."""
        if src == dst:
            return
        n = int(self.lengths[src])
        P = self.bucket
        for name, ch in zip(TENSORS, self.layout.channels) if n else ():
            arena = self.arenas[name]
            for layer in range(self.layout.layers):  # per layer: source and destination never overlap
                d = arena[layer, dst * ch * P:(dst + 1) * ch * P].reshape(ch, P)
                s = arena[layer, src * ch * P:(src + 1) * ch * P].reshape(ch, P)
                d[:, :n] = s[:, :n]
        self.lengths[dst] = n
        self.moves += 1
        if self.journal is not None:
            self.journal.append((MOVE_ROW, src, dst))

    def resize(self, needed: int) -> bool:
        """Make the bucket the smallest one >= `needed` tokens (grow or shrink); True if rows were relaid.

        Raises `OverCapacityError` if the live rows do not fit at that bucket (the scheduler's admission rule
        prevents it) or a row is longer than the new bucket.
        """
        new = self.bucket_for(max(needed, 1))
        old = self.bucket
        if new == old:
            return False
        if self.rows * new > self.capacity_tokens:
            raise OverCapacityError(f"cache full: {self.rows} rows of {new} tokens exceed the capacity of "
                                    f"{self.capacity_tokens} tokens")
        if self.rows and int(self.lengths[: self.rows].max()) > new:
            raise AssertionError(f"resize to {new} below a row of {int(self.lengths[: self.rows].max())} tokens")
        m = min(old, new)
        for name, ch in zip(TENSORS, self.layout.channels):
            arena = self.arenas[name]
            k = self.rows * ch  # lines of P values: (row, channel)
            chunks = _chunks_grow(k, old, new) if new > old else _chunks_shrink(k, old, new)
            for k0, k1 in chunks:
                for layer in range(self.layout.layers):
                    d = arena[layer, k0 * new:k1 * new].reshape(k1 - k0, new)
                    s = arena[layer, k0 * old:k1 * old].reshape(k1 - k0, old)
                    d[:, :m] = s[:, :m]
        self.bucket = new
        self.relayouts += 1
        if self.journal is not None:
            self.journal.append((RESIZE, new))
        logger.debug("cache bucket %d -> %d (%d rows)", old, new, self.rows)
        return True

    # ---- what a step binds and writes -------------------------------------------------------------------
    def view(self, name: str, r0: int, r1: int) -> Any:
        """[L, r1 - r0, ch, P] view of rows [r0, r1) of tensor `name` ("c" or "pe"); [layer] is contiguous."""
        ch = self.layout.channels[TENSORS.index(name)]
        P = self.bucket
        return self.arenas[name][:, r0 * ch * P:r1 * ch * P].reshape(self.layout.layers, r1 - r0, ch, P)

    def feeds(self, r0: int, r1: int) -> dict[str, Any]:
        """The graph's cache inputs for rows [r0, r1): `past_c.{l}` [n, C, P], `past_pe.{l}` [n, R, P] (views)."""
        out: dict[str, Any] = {}
        for name in TENSORS:
            v = self.view(name, r0, r1)
            for layer in range(self.layout.layers):
                out[f"past_{name}.{layer}"] = v[layer]
        return out

    def write(self, r0: int, n_new: Sequence[int] | np.ndarray, new: dict[str, Any]) -> None:
        """Store the first n_new[i] tokens' latents of row r0 + i (new[name]: [L, n, S, ch]) at its length."""
        if len(n_new) == 1 and int(n_new[0]) == 1 and next(iter(new.values())).shape[2] == 1:
            # one row decoding: the same assignment in plain indexing (a decode step at batch 1 runs this after
            # its weights have streamed through the caches, where each numpy call costs ~10 us: fewer calls)
            p = int(self.lengths[r0])
            if p >= self.bucket:
                raise AssertionError("write beyond the bucket: resize before the step")
            for name in TENSORS:
                self.view(name, r0, r0 + 1)[:, 0, :, p] = new[name][:, 0, 0, :]
            self.lengths[r0] = p + 1
            if self.journal is not None:
                self.journal.append((WRITE, r0, 1))
            return
        n_new = np.asarray(n_new, dtype=np.int64)
        n = len(n_new)
        r1 = r0 + n
        starts = self.lengths[r0:r1]
        if n and int((starts + n_new).max()) > self.bucket:
            raise AssertionError("write beyond the bucket: resize before the step")
        s = next(iter(new.values())).shape[2]
        if n and (int(n_new.min()) < 0 or int(n_new.max()) > s):
            raise AssertionError(f"write of {n_new.tolist()} tokens from a step of {s} per row")
        for name in TENSORS:
            dst = self.view(name, r0, r1)
            src = new[name]
            if s == 1 and bool((n_new == 1).all()):  # decode: one scattered assignment per tensor
                dst[:, np.arange(n), :, starts] = src[:, :n, 0, :].swapaxes(0, 1)
            else:
                for i in range(n):  # prefill chunks: one block per row
                    k, p = int(n_new[i]), int(starts[i])
                    if k:
                        dst[:, i, :, p:p + k] = src[:, i, :k, :].swapaxes(1, 2)
        self.lengths[r0:r1] += n_new
        if self.journal is not None:
            self.journal.append((WRITE, r0, *n_new.tolist()))


def budget_for(layout: CacheLayout, rows: int, tokens: int) -> int:
    """Bytes that hold `rows` sequences of `tokens` tokens (a helper for callers sizing a cache)."""
    return rows * max(tokens, 1) * layout.bytes_per_token


def parse_bytes(text: str | int) -> int:
    """'512MiB', '2GiB', '1.5GB', '1000000' -> bytes. Raises `RuntimeInputError` on anything else."""
    if isinstance(text, int):
        return text
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
             "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
    s = text.strip().lower().replace(" ", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise RuntimeInputError(f"not a size in bytes: {text!r} (e.g. 512MiB, 2GiB)") from None
    if unit not in units or value < 0 or not math.isfinite(value):
        raise RuntimeInputError(f"not a size in bytes: {text!r} (e.g. 512MiB, 2GiB)")
    return int(value * units[unit])
