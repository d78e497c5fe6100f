"""The TensorRT backend's device-resident serving state, on torch CPU tensors with a recording TensorRT context (the
same code runs on CUDA tensors on a GPU): the cache rows are bound in place (addresses inside the arena, no copy),
only changed bindings are re-set, per-step uploads go to fixed buffers, decode steps are captured once per binding
set and replayed, the next tokens are chosen where the logits are, and the plan file is mapped, not read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from r1c.errors import BundleError
from r1c.runtime.step import StepIO
from r1c.runtime.trt_device import (
    BindingCache,
    DecodeGraphs,
    Staging,
    device_alloc,
    sample_on_device,
    step_bindings,
)

L, C, R, V = 2, 8, 4, 32



class Arena:
    """Rows of a [L, T * ch] arena viewed as [n, ch, P] per layer, as the serving cache manager lays them out."""

    def __init__(self, alloc: Any, tokens: int) -> None:
        self.c = alloc((L, tokens * C), np.float32)
        self.pe = alloc((L, tokens * R), np.float32)

    def feeds(self, r0: int, r1: int, p: int) -> dict[str, Any]:
        out = {}
        for name, arena, ch in (("c", self.c, C), ("pe", self.pe, R)):
            view = arena[:, r0 * ch * p:r1 * ch * p].reshape(L, r1 - r0, ch, p)
            out |= {f"past_{name}.{layer}": view[layer] for layer in range(L)}
        return out


def make_io(arena: Arena, outs: dict[str, Any], n: int, s: int, p: int) -> StepIO:
    return StepIO(np.arange(n * s, dtype=np.int64).reshape(n, s), np.full(n, 3, np.int64), arena.feeds(0, n, p),
                  outs["logits"][: n * s * V].view(n, s, V),
                  {"c": outs["c"][: L * n * s * C].view(L, n, s, C),
                   "pe": outs["pe"][: L * n * s * R].view(L, n, s, R)})


class FakeContext:
    def __init__(self, accept: bool = True) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.accept = accept

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.calls.append(("shape", name, shape))
        return self.accept

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.calls.append(("address", name, address))
        return True


@pytest.fixture
def setup() -> tuple[Arena, dict[str, Any], Staging]:
    alloc = device_alloc("cpu")
    arena = Arena(alloc, tokens=64)
    outs = {"logits": alloc((16 * V,), np.float32), "c": alloc((L * 16 * C,), np.float32),
            "pe": alloc((L * 16 * R,), np.float32)}
    return arena, outs, Staging(max_tokens=16, max_rows=4, device="cpu", pin=False)


def test_cache_rows_are_bound_in_place_and_rebound_only_when_they_move(setup: Any) -> None:
    arena, outs, staging = setup
    io = make_io(arena, outs, n=2, s=1, p=8)
    ids, lengths = staging.upload(io.input_ids, io.past_lengths)
    bindings = {b.name: b for b in step_bindings(io, ids, lengths)}
    assert set(bindings) == {"input_ids", "past_lengths", "logits", "new_c", "new_pe",
                             *(f"past_{k}.{i}" for k in ("c", "pe") for i in range(L))}
    for layer in range(L):  # inside the arena: the cache is bound, not copied
        b = bindings[f"past_c.{layer}"]
        assert b.shape == (2, C, 8) and b.is_input
        assert b.address == arena.c.data_ptr() + layer * arena.c.stride(0) * 4
    assert bindings["logits"].address == outs["logits"].data_ptr() and not bindings["logits"].is_input
    assert bindings["input_ids"].address == staging.ids.data_ptr() and bindings["input_ids"].shape == (2, 1)

    ctx, cache = FakeContext(), BindingCache()
    assert cache.apply(ctx, bindings.values())
    assert sum(c[0] == "shape" for c in ctx.calls) == 2 + 2 * L  # inputs only
    assert sum(c[0] == "address" for c in ctx.calls) == len(bindings)
    ctx.calls.clear()
    io2 = make_io(arena, outs, n=2, s=1, p=8)  # the next decode step: same rows, same bucket
    assert not cache.apply(ctx, step_bindings(io2, *staging.upload(io2.input_ids, io2.past_lengths)))
    assert ctx.calls == []
    io3 = make_io(arena, outs, n=2, s=1, p=16)  # the capacity bucket grew: the cache views move and re-bind
    cache.apply(ctx, step_bindings(io3, *staging.upload(io3.input_ids, io3.past_lengths)))
    assert {c[1] for c in ctx.calls} == {f"past_{k}.{i}" for k in ("c", "pe") for i in range(L)}  # ids, outputs stay
    with pytest.raises(BundleError, match=r"rejects past_c\.0"):
        BindingCache().apply(FakeContext(accept=False), [bindings["past_c.0"]])


def test_bindings_refuse_host_arrays_and_strided_views(setup: Any) -> None:
    arena, outs, staging = setup
    io = make_io(arena, outs, n=2, s=1, p=8)
    ids, lengths = staging.upload(io.input_ids, io.past_lengths)
    io.past["past_c.0"] = np.zeros((2, C, 8), np.float32)
    with pytest.raises(BundleError, match="binds device tensors"):
        step_bindings(io, ids, lengths)
    io.past["past_c.0"] = torch.zeros(2, 8, C).transpose(1, 2)
    with pytest.raises(BundleError, match="not contiguous"):
        step_bindings(io, ids, lengths)


def test_staging_uploads_into_fixed_buffers(setup: Any) -> None:
    _, _, staging = setup
    a, la = staging.upload(np.array([[5], [6]]), np.array([1, 2]))
    b, lb = staging.upload(np.array([[7], [8]]), np.array([3, 4]))
    assert (a.data_ptr(), la.data_ptr()) == (b.data_ptr(), lb.data_ptr())  # a captured graph reads these
    assert b.tolist() == [[7], [8]] and lb.tolist() == [3, 4]
    with pytest.raises(BundleError, match="exceeds the staging buffers"):
        staging.upload(np.zeros((5, 4), np.int64), np.zeros(5, np.int64))


class FakeGraph:
    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


class FakeCapture:
    def __init__(self, graph: FakeGraph, stream: Any) -> None:
        self.graph = graph

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def test_decode_steps_are_captured_once_per_binding_set_and_replayed() -> None:
    graphs = DecodeGraphs(stream=None, capacity=2, graph_factory=FakeGraph, capture=FakeCapture)
    launches = []
    for key in ("b2p64", "b2p64", "b4p64", "b2p64", "b8p64", "b4p64"):
        graphs.run((key,), lambda: launches.append(1))  # type: ignore[arg-type]
    # b2p64: warm + capture, then replays; b4p64 once; b8p64 evicts the least recently used (b4p64 after b2p64's use)
    assert graphs.captures == 4 and len(launches) == 8
    assert [k[0] for k in graphs.graphs] == ["b8p64", "b4p64"]


def test_sampling_on_the_device() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, V, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_on_device(logits), greedy)
    assert torch.equal(sample_on_device(logits, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample_on_device(logits, temperature=1.0, top_p=1e-6, generator=g), greedy)
    mixed = sample_on_device(logits, temperature=torch.tensor([0.0, 1, 0, 1, 0, 1]), generator=g)
    assert torch.equal(mixed[::2], greedy[::2])
    a = sample_on_device(logits, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
    b = sample_on_device(logits, temperature=0.8, top_k=5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)  # same seed, same tokens
    top5 = logits.topk(5, dim=-1).indices
    for _ in range(50):
        t = sample_on_device(logits, temperature=2.0, top_k=5, generator=g)
        assert bool((top5 == t[:, None]).any(dim=1).all())
    probs = (logits / 1.0).softmax(-1)
    nucleus = sample_on_device(logits, temperature=1.0, top_p=0.5, generator=g)
    sorted_p, order = probs.sort(-1, descending=True)
    rank = (order == nucleus[:, None]).float().argmax(-1)
    before = sorted_p.cumsum(-1) - sorted_p
    assert bool((before.gather(1, rank[:, None])[:, 0] < 0.5).all())  # inside the smallest set reaching 0.5


def test_device_alloc_dtypes() -> None:
    import ml_dtypes

    alloc = device_alloc("cpu")
    for np_dtype, torch_dtype in ((np.float32, torch.float32), (np.float16, torch.float16),
                                  (ml_dtypes.bfloat16, torch.bfloat16), (np.int64, torch.int64)):
        t = alloc((2, 3), np.dtype(np_dtype))
        assert t.dtype == torch_dtype and t.shape == (2, 3) and not t.any()


def test_plan_is_mapped_not_read(tmp_path: Path) -> None:
    from r1c.runtime.trt_backend import map_plan

    path = tmp_path / "model.engine"
    path.write_bytes(bytes(range(256)) * 64)
    mapped, view = map_plan(path)
    assert isinstance(view, memoryview) and view.readonly and view.nbytes == 256 * 64 and view[255] == 255
    view.release()
    mapped.close()


def test_serving_cache_on_torch_tensors_binds_in_place() -> None:
    """Helper serve's cache manager (r1c.runtime.kvcache) with the backend's device allocator, here on torch CPU
    tensors: the arenas are allocated once, every step's cache inputs are views inside them (bound by address), a
    bucket change relays rows in place (the arenas do not move) and only the views re-bind."""
    kvcache = pytest.importorskip("r1c.runtime.kvcache", reason="helper serve's cache manager is not on this branch "
                                  "yet (it runs once their work is merged)")
    layout = kvcache.CacheLayout(layers=L, channels=(C, R), dtype=np.dtype(np.float32))
    cache = kvcache.LatentCache(layout, kvcache.budget_for(layout, 4, 64), max_rows=4, max_len=64, min_bucket=8,
                                alloc=device_alloc("cpu"))
    arenas = {name: (a.data_ptr(), a.numel()) for name, a in cache.arenas.items()}
    for _ in range(2):
        cache.add_row()
    alloc = device_alloc("cpu")
    outs = {"logits": alloc((16 * V,), np.float32), "c": alloc((L * 16 * C,), np.float32),
            "pe": alloc((L * 16 * R,), np.float32)}
    staging = Staging(16, 4, device="cpu", pin=False)

    def bind() -> dict[str, Any]:
        feeds = cache.feeds(0, 2)
        io = StepIO(np.zeros((2, 1), np.int64), cache.lengths[:2].copy(), feeds,
                    outs["logits"][: 2 * V].view(2, 1, V),
                    {"c": outs["c"][: L * 2 * C].view(L, 2, 1, C), "pe": outs["pe"][: L * 2 * R].view(L, 2, 1, R)})
        return {b.name: b for b in step_bindings(io, *staging.upload(io.input_ids, io.past_lengths))}

    first = bind()
    for name, b in first.items():
        if name.startswith(("past_c.", "past_pe.")):
            base, numel = arenas[name.split("_")[1].split(".")[0]]
            assert base <= b.address < base + numel * 4  # inside the arena: bound, not copied
    ctx, bound = FakeContext(), BindingCache()
    bound.apply(ctx, first.values())
    new = {"c": torch.ones(L, 2, 1, C), "pe": torch.ones(L, 2, 1, R)}
    cache.write(0, [1, 1], new)  # only the new tokens' latents, in place
    assert cache.resize(20)  # the bucket grows: rows relaid inside the arenas
    assert {n: (a.data_ptr(), a.numel()) for n, a in cache.arenas.items()} == arenas
    ctx.calls.clear()
    bound.apply(ctx, bind().values())
    assert {c[1] for c in ctx.calls} == {f"past_{k}.{i}" for k in ("c", "pe") for i in range(L)}
    assert float(cache.view("c", 0, 2)[:, :, :, 0].sum()) == L * 2 * C  # the written latents moved with the rows
