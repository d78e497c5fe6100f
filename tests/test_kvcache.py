"""unit tier: the latent cache arena (r1c.runtime.kvcache) — capacity rule, in-place relayout, row moves, writes.

The reference is a plain dict of per-row numpy arrays [L, ch, length] that every operation must preserve exactly.
"""

from __future__ import annotations

import itertools
import resource

import numpy as np
import pytest

from r1c.runtime.kvcache import (
    WRITE,
    CacheLayout,
    LatentCache,
    OverCapacityError,
    _chunks_grow,
    _chunks_shrink,
    capacity_buckets,
    numpy_alloc,
    parse_bytes,
)

LAYOUT = CacheLayout(layers=3, channels=(5, 2), dtype=np.dtype(np.float32))


def rows_of(cache: LatentCache) -> list[dict[str, np.ndarray]]:
    """Each live row's filled part, per tensor [L, ch, length]."""
    out = []
    for r in range(cache.rows):
        n = int(cache.lengths[r])
        out.append({name: np.array(cache.view(name, r, r + 1)[:, 0, :, :n]) for name in ("c", "pe")})
    return out


def fill(cache: LatentCache, rng: np.random.Generator, lengths: list[int]) -> None:
    for n in lengths:
        r = cache.add_row()
        cache.resize(max(int(cache.lengths[: cache.rows].max()), n))
        new = {name: rng.standard_normal((LAYOUT.layers, 1, n, ch)).astype(np.float32)
               for name, ch in zip(("c", "pe"), LAYOUT.channels)}
        cache.write(r, [n], new)


def test_buckets_double_and_end_at_max_len() -> None:
    assert capacity_buckets(64, 4096) == [64, 128, 256, 512, 1024, 2048, 4096]
    assert capacity_buckets(64, 2500) == [64, 128, 256, 512, 1024, 2500]  # 2048 -> 2500 would be < 2x
    assert capacity_buckets(64, 40) == [40]
    b = capacity_buckets(16, 1000)
    assert all(y >= 2 * x for x, y in itertools.pairwise(b))


@pytest.mark.parametrize(("k", "old", "new"), [(1, 4, 8), (7, 4, 8), (100, 64, 256), (33, 16, 40), (9, 40, 16)])
def test_relayout_chunks_cover_every_line_without_overlap(k: int, old: int, new: int) -> None:
    chunks = list(_chunks_grow(k, old, new) if new > old else _chunks_shrink(k, old, new))
    assert sorted(i for a, b in chunks for i in range(a, b)) == list(range(1, k))
    m = min(old, new)
    for a, b in chunks:  # destination and source element ranges of one chunk are disjoint
        dst, src = (a * new, (b - 1) * new + m), (a * old, (b - 1) * old + m)
        assert dst[1] <= src[0] or src[1] <= dst[0]


def test_grow_shrink_move_keep_every_row() -> None:
    rng = np.random.default_rng(0)
    cache = LatentCache(LAYOUT, 4 * 256 * LAYOUT.bytes_per_token, max_rows=8, max_len=256, min_bucket=8)
    fill(cache, rng, [3, 8, 5])
    assert cache.bucket == 8
    before = rows_of(cache)
    cache.resize(70)  # 8 -> 128: relaid in place
    assert cache.bucket == 128 and cache.relayouts >= 1
    for a, b in zip(before, rows_of(cache)):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    fill(cache, rng, [100])
    before = rows_of(cache)
    cache.move_row(3, 0)  # row 0 leaves; the last row takes its place
    cache.pop_row()
    after = rows_of(cache)
    assert [int(x) for x in cache.lengths[:3]] == [100, 8, 5]
    for name in ("c", "pe"):
        np.testing.assert_array_equal(after[0][name], before[3][name])
        np.testing.assert_array_equal(after[1][name], before[1][name])
    cache.move_row(2, 0)  # the long row leaves: shrink back
    cache.pop_row()
    before = rows_of(cache)
    cache.resize(int(cache.lengths[: cache.rows].max()))
    assert cache.bucket == 8
    for a, b in zip(before, rows_of(cache)):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_decode_write_appends_one_token_per_row() -> None:
    rng = np.random.default_rng(1)
    cache = LatentCache(LAYOUT, 3 * 64 * LAYOUT.bytes_per_token, max_rows=3, max_len=64, min_bucket=16)
    fill(cache, rng, [2, 6, 4])
    before = rows_of(cache)
    new = {name: rng.standard_normal((LAYOUT.layers, 3, 1, ch)).astype(np.float32)
           for name, ch in zip(("c", "pe"), LAYOUT.channels)}
    cache.write(0, [1, 1, 1], new)
    for r, (a, b) in enumerate(zip(before, rows_of(cache))):
        for name in a:
            np.testing.assert_array_equal(b[name][..., :-1], a[name])
            np.testing.assert_array_equal(b[name][..., -1], new[name][:, r, 0, :])


def test_one_row_decode_write_and_bad_counts() -> None:
    """The one-row decode write (its own fast path) appends like the general one, journal entry included; more
    tokens than the step has, or a negative count, is refused before anything is written."""
    rng = np.random.default_rng(3)
    cache = LatentCache(LAYOUT, 3 * 64 * LAYOUT.bytes_per_token, max_rows=3, max_len=64, min_bucket=16)
    fill(cache, rng, [5, 3])
    cache.journal = []
    before = rows_of(cache)
    new = {name: rng.standard_normal((LAYOUT.layers, 1, 1, ch)).astype(np.float32)
           for name, ch in zip(("c", "pe"), LAYOUT.channels)}
    cache.write(1, [1], new)
    after = rows_of(cache)
    for name in before[1]:
        np.testing.assert_array_equal(after[0][name], before[0][name])
        np.testing.assert_array_equal(after[1][name][..., :-1], before[1][name])
        np.testing.assert_array_equal(after[1][name][..., -1], new[name][:, 0, 0, :])
    assert cache.journal == [(WRITE, 1, 1)]
    for counts in ([2], [-1], [1, 2]):
        with pytest.raises(AssertionError, match="tokens from a step of 1"):
            cache.write(0, counts, {name: np.repeat(v, len(counts), axis=1) for name, v in new.items()})
    assert [r["c"].shape[-1] for r in rows_of(cache)] == [5, 4]  # nothing written by the refused calls


def test_capacity_rule() -> None:
    cache = LatentCache(LAYOUT, 256 * LAYOUT.bytes_per_token, max_rows=8, max_len=256, min_bucket=64)
    assert cache.capacity_tokens == 256
    assert cache.fits(4, 64) and not cache.fits(5, 64) and cache.fits(2, 128) and not cache.fits(1, 300)
    for _ in range(4):
        cache.add_row()
    with pytest.raises(OverCapacityError, match="cache full"):
        cache.add_row()
    with pytest.raises(OverCapacityError, match="cache full"):
        cache.resize(100)
    with pytest.raises(OverCapacityError, match="holds 10 tokens"):
        LatentCache(LAYOUT, 10 * LAYOUT.bytes_per_token, max_rows=1, max_len=256, min_bucket=64)


def test_parse_bytes() -> None:
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes(7) == 7
    with pytest.raises(Exception, match="not a size"):
        parse_bytes("lots")


def test_torch_arenas_behave_like_numpy() -> None:
    """A device backend keeps the same cache on torch tensors (alloc=...): same data after every operation."""
    torch = pytest.importorskip("torch")

    def torch_alloc(shape: tuple[int, ...], dtype: np.dtype) -> object:
        return torch.zeros(shape, dtype=getattr(torch, dtype.name))

    rng = np.random.default_rng(2)
    caches = [LatentCache(LAYOUT, 4 * 256 * LAYOUT.bytes_per_token, max_rows=8, max_len=256, min_bucket=8),
              LatentCache(LAYOUT, 4 * 256 * LAYOUT.bytes_per_token, max_rows=8, max_len=256, min_bucket=8,
                          alloc=torch_alloc)]
    steps = [[3], [8], [5], [1, 1, 1]]
    for n_new in steps:
        s = max(n_new)
        new = {name: rng.standard_normal((LAYOUT.layers, len(n_new), s, ch)).astype(np.float32)
               for name, ch in zip(("c", "pe"), LAYOUT.channels)}
        for k, cache in enumerate(caches):
            r0 = 0 if len(n_new) > 1 else cache.add_row()
            cache.resize(int(max(cache.lengths[: cache.rows].max(), (cache.lengths[r0:r0 + len(n_new)] + s).max())))
            cache.write(r0, n_new, new if k == 0 else {a: torch.from_numpy(b) for a, b in new.items()})
    for cache in caches:
        cache.resize(70)
        cache.move_row(2, 0)
        cache.pop_row()
        cache.resize(10)
    for name in ("c", "pe"):
        np.testing.assert_array_equal(np.asarray(caches[0].view(name, 0, 2)), caches[1].view(name, 0, 2).numpy())
    assert caches[0].bucket == caches[1].bucket == 16


def _faults_writing(a: np.ndarray) -> int:
    """Minor page faults this process takes while writing one value into every 4 KiB of `a`."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    a.reshape(-1)[:: 4096 // a.itemsize] = 1
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_numpy_alloc_commits_its_pages_up_front() -> None:
    """The cache's arenas are zeros whose pages were written at allocation, so no step or relayout pays their
    first-touch faults (a relayout to a fresh 2,048-token bucket took 34 ms on lazily mapped `np.zeros` pages)."""
    shape = (4, 4 << 20)  # 64 MiB of float32
    reference = np.zeros(shape, dtype=np.float32)  # lazily mapped: the writes below fault
    lazy = _faults_writing(reference)
    if lazy < 100:
        pytest.skip(f"this kernel maps fresh anonymous memory with few faults ({lazy} for 64 MiB): nothing to compare")
    arena = numpy_alloc(shape, np.dtype(np.float32))
    assert arena.shape == shape and arena.dtype == np.float32 and not arena.any()
    committed = _faults_writing(arena)
    assert committed < lazy / 20, (committed, lazy)
