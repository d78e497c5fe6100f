"""Device-resident serving state for the TensorRT backend: what stays on the GPU for a whole request, and the little
that moves per step.

The serving runtime's step interface (`r1c.runtime.step.StepIO`: input ids and past lengths on the host; the cache
rows' views, the logits and the new latents as buffers the backend writes) is kept, with every buffer but the ids
and lengths a torch CUDA tensor: the cache arenas and the output buffers are allocated once on the device
(`device_alloc`, given to the cache manager and the step runner as their `alloc`). Per step:
  * `Staging.upload`: the token ids and past lengths (a few bytes per row) into fixed device buffers, through pinned
    host memory, on the engine's stream: the only host -> device copy;
  * `step_bindings` + `BindingCache.apply`: every engine input and output bound by address
    (`set_input_shape`, `set_tensor_address`) to those buffers and to the cache rows' views in place (no copy of the
    cache, ever); addresses and shapes change only when rows are added or removed or the capacity bucket changes,
    so the cache re-binds only then;
  * the engine runs (`execute_async_v3`) on the stream; the new tokens' latents land in the output buffers, and the
    cache manager writes only those into the arenas (device to device);
  * `sample_on_device`: the next tokens chosen from the logits on the device; only the chosen ids [n] come back.
Decode steps (one new token per row) are captured as CUDA graphs, one per binding set (`DecodeGraphs`: the batch
bucket and capacity bucket fix the addresses), and replayed; the plugins' enqueue only launches cubins through the
driver, so it is capturable.

Legend: n = rows in the step, S = tokens per row, V = vocab size, L = layers, C = kv_lora_rank,
R = qk_rope_head_dim, P = capacity bucket.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from r1c.errors import BundleError
from r1c.graph_io import LOGITS_INDEX

INPUTS = ("input_ids", "past_lengths", LOGITS_INDEX)  # host int64 inputs, uploaded each step (Staging)
OUTPUTS = {"logits": "logits", "new_c": "c", "new_pe": "pe"}  # engine output -> StepIO.new key (logits: io.logits)


def device_alloc(device: Any = "cuda") -> Callable[[tuple[int, ...], Any], Any]:
    """An `alloc(shape, dtype)` for the cache manager and the step runner: zeroed torch tensors on `device`."""
    import torch

    def alloc(shape: tuple[int, ...], dtype: Any) -> Any:
        name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else np.dtype(dtype).name
        return torch.zeros(shape, dtype=getattr(torch, name), device=device)  # numpy/ml_dtypes names match torch

    return alloc


@dataclasses.dataclass(frozen=True)
class Binding:
    name: str
    shape: tuple[int, ...]
    address: int
    is_input: bool


def _device_buffer(name: str, t: Any) -> tuple[tuple[int, ...], int]:
    if not hasattr(t, "data_ptr") or not hasattr(t, "is_contiguous"):
        raise BundleError(f"tensorrt: {name} is a {type(t).__name__}; the TensorRT backend binds device tensors "
                          "(allocate the cache and the step buffers with the backend's `alloc`)")
    if not t.is_contiguous():
        raise BundleError(f"tensorrt: {name} is not contiguous; TensorRT binds linear buffers by address")
    return tuple(int(d) for d in t.shape), int(t.data_ptr())


def step_bindings(io: Any, ids: Any, lengths: Any, index: Any = None) -> list[Binding]:
    """Every engine tensor of one step: the uploaded ids/lengths/logits index (None: a graph without
    `logits_index`), the cache views, the output buffers."""
    out = [Binding("input_ids", *_device_buffer("input_ids", ids), True),
           Binding("past_lengths", *_device_buffer("past_lengths", lengths), True)]
    if index is not None:
        out.append(Binding(LOGITS_INDEX, *_device_buffer(LOGITS_INDEX, index), True))
    out += [Binding(name, *_device_buffer(name, view), True) for name, view in io.past.items()]
    for engine_name, key in OUTPUTS.items():
        buf = io.logits if engine_name == "logits" else io.new[key]
        out.append(Binding(engine_name, *_device_buffer(engine_name, buf), False))
    return out


class BindingCache:
    """Applies bindings to a TensorRT execution context, skipping the ones that did not change since the last step."""

    def __init__(self) -> None:
        self._bound: dict[str, Binding] = {}

    def apply(self, context: Any, bindings: Iterable[Binding]) -> bool:
        """Set changed input shapes and addresses; returns whether anything changed."""
        changed = False
        for b in bindings:
            if self._bound.get(b.name) == b:
                continue
            if b.is_input and not context.set_input_shape(b.name, b.shape):
                raise BundleError(f"tensorrt: the engine rejects {b.name} of shape {list(b.shape)} (outside its "
                                  "optimization profile?)")
            if not context.set_tensor_address(b.name, b.address):
                raise BundleError(f"tensorrt: could not bind {b.name}")
            self._bound[b.name] = b
            changed = True
        return changed


class Staging:
    """Fixed device buffers for the per-step token ids, past lengths and logits index, filled from pinned host memory.

    Allocated once for `max_tokens` ids and `max_rows` rows; `upload` returns views whose addresses depend only on
    the step's shape, so a captured decode graph keeps reading the right buffers.
    """

    def __init__(self, max_tokens: int, max_rows: int, device: Any = "cuda", pin: bool = True) -> None:
        import torch

        self._torch = torch
        self.host_ids = torch.zeros(max_tokens, dtype=torch.int64, pin_memory=pin)
        self.host_lengths = torch.zeros(max_rows, dtype=torch.int64, pin_memory=pin)
        self.host_index = torch.zeros(max_tokens, dtype=torch.int64, pin_memory=pin)
        self.ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.lengths = torch.zeros(max_rows, dtype=torch.int64, device=device)
        self.index = torch.zeros(max_tokens, dtype=torch.int64, device=device)

    def upload(self, input_ids: np.ndarray, past_lengths: np.ndarray, stream: Any = None) -> tuple[Any, Any]:
        """Copy [n, S] ids and [n] lengths to the device (asynchronously on `stream`); returns the device views.

        The caller synchronizes once per step (it reads the chosen tokens) before the pinned buffers are reused."""
        n, s = input_ids.shape
        if n * s > self.ids.numel() or n > self.lengths.numel():
            raise BundleError(f"tensorrt: a step of {n}x{s} tokens exceeds the staging buffers "
                              f"({self.ids.numel()} tokens, {self.lengths.numel()} rows)")
        ids = self._copy(self.host_ids, self.ids, input_ids, stream).view(n, s)
        return ids, self._copy(self.host_lengths, self.lengths, past_lengths, stream)

    def upload_index(self, logits_index: np.ndarray, stream: Any = None) -> Any:
        """Copy the [n, K] logits index to the device the same way; returns its device view."""
        n, k = logits_index.shape
        if n * k > self.index.numel():
            raise BundleError(f"tensorrt: a logits index of {n}x{k} exceeds the staging buffer ({self.index.numel()})")
        return self._copy(self.host_index, self.index, logits_index, stream).view(n, k)

    def _copy(self, host: Any, device: Any, values: np.ndarray, stream: Any) -> Any:
        m = values.size
        host[:m].numpy()[:] = np.asarray(values, dtype=np.int64).reshape(-1)
        out = device[:m]
        with self._torch.cuda.stream(stream) if stream is not None else _nullcontext():
            out.copy_(host[:m], non_blocking=True)
        return out


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class DecodeGraphs:
    """CUDA graphs of decode steps, one per binding set (batch bucket x capacity bucket), least recently used first
    out past `capacity`. `run(key, launch)` replays the graph of `key`, capturing `launch` on its first use."""

    def __init__(self, stream: Any, capacity: int = 16, graph_factory: Callable[[], Any] | None = None,
                 capture: Callable[[Any, Any], Any] | None = None) -> None:
        import torch

        self.stream = stream
        self.capacity = capacity
        self._new = graph_factory or torch.cuda.CUDAGraph
        self._capture = capture or (lambda graph, stream: torch.cuda.graph(graph, stream=stream))
        self.graphs: collections.OrderedDict[tuple[Binding, ...], Any] = collections.OrderedDict()
        self.captures = 0

    def run(self, key: tuple[Binding, ...], launch: Callable[[], None]) -> None:
        graph = self.graphs.get(key)
        if graph is None:
            launch()  # the first enqueue after a shape change does TensorRT's deferred work outside the graph
            graph = self._new()
            with self._capture(graph, self.stream):
                launch()
            self.captures += 1
            self.graphs[key] = graph
            while len(self.graphs) > self.capacity:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph.replay()


def sample_on_device(logits: Any, temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0,
                     generator: Any = None) -> Any:
    """The next token of each row from logits [n, V] (any device), on that device: greedy where temperature is 0,
    else softmax(logits / temperature) restricted to the top_k most likely (0: all) and to the smallest set whose
    probability reaches top_p, sampled with `generator`. Parameters are scalars or [n] tensors. Returns [n] int64.
    """
    import torch

    n, v = logits.shape
    x = logits.float()

    def per_row(p: Any, dtype: Any) -> Any:
        return torch.as_tensor(p, dtype=dtype, device=x.device).expand(n) if not torch.is_tensor(p) or p.dim() == 0 \
            else p.to(x.device, dtype)

    temp, k, p = per_row(temperature, torch.float32), per_row(top_k, torch.int64), per_row(top_p, torch.float32)
    greedy = x.argmax(dim=-1)
    if bool((temp <= 0).all()):
        return greedy
    scaled = x / temp.clamp_min(1e-6)[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(v, device=x.device)[None, :]
    keep = (k[:, None] <= 0) | (rank < k[:, None])
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the more likely tokens
    keep &= before < p[:, None]
    keep[:, 0] = True
    probs = torch.where(keep, probs, torch.zeros_like(probs))
    choice = torch.multinomial(probs, 1, generator=generator)[:, 0]
    sampled = order.gather(1, choice[:, None])[:, 0]
    return torch.where(temp <= 0, greedy, sampled)
