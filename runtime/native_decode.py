"""The native decode step: one decode step of an fp32 ONNX Runtime bundle as one call into r1c's CPU kernel library.

A decode step through ONNX Runtime runs ~110 graph nodes; after the step's weights have streamed through the caches
each starts cold, and the run's own setup too (~0.3 ms a step together on this project's VM, the closing notes of
issue 11). `r1c_decode_step` (r1c/plugins/cpu_moe/decode_cpu.cc) computes the same step with the same kernels in
one C call, its parallel loops on r1c's spinning thread team. Prefill, scoring and every other step shape stay
with ONNX Runtime.

`NativeDecoder.for_graph` reads the decoder off the bundle's graph, node by node: the embedding `Gather`, per
layer the input norm, the `r1c.cpu::MLABlock` (its weights, attributes and the rotary table it is fed: `Cos` /
`Sin` of positions times `inv_freq`, times YaRN's attention factor where the graph has it), the residual
`SkipSimplifiedLayerNormalization`, the MLP (a dense SwiGLU of two `r1c.cpu::Linear`, or `Gemm` router,
`MoEGroupRouter`, `r1c.cpu::MoE` with normalized routing weights and optional shared experts) and the final norm
and `lm_head` `Linear`. Any other graph (no MLABlock: an int8 or int4 bundle, an FP8 export built at fp32, one
built without r1c's kernels; softmax routing; unnormalized top-k weights; a node this walk does not know between
them) gets no native decoder, with the reason logged, and ONNX Runtime runs its steps. The
weights are read where the session has them: the kernels' huge-page arena (`kernel_weights`) or, for the tensors
ONNX Runtime's own nodes read (embedding, norms, router), a read-only map of the weights file (the page cache,
no second copy); the router's [E, H] gate is packed once (E*H floats).

Shapes (legend: n rows, C kv_lora_rank, R rope dim, P cache capacity, L layers, V vocabulary): a step takes
input_ids [n, 1] int64, past_lengths [n] int64, the cache views past_c.{l} [n, C, P] / past_pe.{l} [n, R, P]
float32, and writes logits [n, 1, V], new_c [L, n, 1, C], new_pe [L, n, 1, R] float32 (`r1c.runtime.step.StepIO`).
Errors: `RuntimeInputError` for an id outside the vocabulary or a length outside the cache (nothing written).
"""

from __future__ import annotations

import ctypes
import logging
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import RuntimeInputError
from r1c.plugins.cpu_moe.spec import CPU_DOMAIN, pack_linear

logger = logging.getLogger(__name__)

_F = ctypes.POINTER(ctypes.c_float)
_I64 = ctypes.c_int64


class _Layer(ctypes.Structure):  # decode_cpu.cc r1c_decode_layer
    _fields_ = [*((name, _F) for name in ("in_norm", "q_a", "q_norm", "q_b", "kv_a", "kv_norm", "w_uk", "w_uv_t", "o",
                                          "post_norm")),
                *((name, ctypes.c_float) for name in ("in_eps", "q_eps", "kv_eps", "post_eps", "scale")),
                ("gate_up", _F), ("down", _F), ("inter", _I64),
                *((name, _F) for name in ("router", "bias", "fc1", "fc2")),
                *((name, _I64) for name in ("experts", "p1", "top_k", "n_group", "topk_group", "group_topk"))]


class _Model(ctypes.Structure):  # decode_cpu.cc r1c_decode_model
    _fields_ = [*((name, _I64) for name in ("layers", "hidden", "vocab", "q_lora", "heads", "nope", "rope", "kv_lora",
                                            "v_head")),
                *((name, _F) for name in ("embed", "inv_freq", "final_norm", "lm_head")),
                ("final_eps", ctypes.c_float), ("rope_scale", ctypes.c_float), ("layer", ctypes.POINTER(_Layer))]


class NotNative(Exception):
    """Why a graph gets no native decoder (logged; ONNX Runtime runs its steps)."""


def _attrs(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _Graph:
    """The graph's nodes by what they produce and read, and the walk's checks."""

    def __init__(self, graph: Any) -> None:
        self.nodes = list(graph.node)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.readers: dict[str, list[Any]] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.readers[i].append(n)
        self.inits = {t.name: t for t in graph.initializer}
        self.inputs = {i.name for i in graph.input}
        self.outputs = {o.name for o in graph.output}
        self.seen: set[int] = set()

    def node(self, value: str, op: str, why: str) -> Any:
        n = self.producer.get(value)
        if n is None or n.op_type != op:
            raise NotNative(f"{why}: {value!r} is not made by a {op} node")
        self.seen.add(id(n))
        return n

    def users(self, value: str) -> list[Any]:
        """The nodes reading `value` but for Shape nodes (which only read its shape, for a later Reshape)."""
        return [n for n in self.readers.get(value, []) if n.op_type != "Shape"]

    def only_reader(self, value: str, op: str, why: str) -> Any:
        readers = self.readers.get(value, [])
        if len(readers) != 1 or readers[0].op_type != op or value in self.outputs:
            raise NotNative(f"{why}: {value!r} is not read by one {op} node alone")
        self.seen.add(id(readers[0]))
        return readers[0]

    def init(self, name: str, why: str) -> str:
        if name not in self.inits:
            raise NotNative(f"{why}: {name!r} is not an initializer")
        return name

    def dims(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.inits[name].dims)


def _expect(cond: bool, why: str) -> None:
    if not cond:
        raise NotNative(why)


# graph nodes outside the walked path that may stand in the step's preamble (positions, rotary angles, masks,
# shapes): any other node left over means the graph computes something the native step does not
_PREAMBLE = frozenset({"Shape", "Slice", "Squeeze", "Range", "Unsqueeze", "Add", "Cast", "Mul", "Cos", "Sin",
                       "ReduceProd", "Reshape", "Less", "LessOrEqual", "Concat", "Expand"})


def _swiglu(g: _Graph, h: str, first: Any, hidden: int, why: str) -> tuple[str, str, int, str]:
    """The dense SwiGLU MLP starting at `first` (the gate_up Linear reading h): (gate_up, down, I, output)."""
    _expect(first.op_type == "Linear" and first.domain == CPU_DOMAIN and first.input[0] == h,
            f"{why}: the MLP does not start with an r1c.cpu Linear")
    g.seen.add(id(first))
    gate_up = g.init(first.input[1], why)
    two_i = int(_attrs(first)["n"])
    split = g.only_reader(first.output[0], "Split", why)
    _expect(_attrs(split).get("axis", 0) in (-1, 1, 2) and len(split.output) == 2 and len(split.input) == 1,
            f"{why}: the gate/up split is not two halves of the last axis")
    gelu = g.only_reader(split.output[0], "QuickGelu", why)
    _expect(abs(float(_attrs(gelu).get("alpha", 1.0)) - 1.0) < 1e-12, f"{why}: QuickGelu alpha is not 1 (SiLU)")
    mul = g.only_reader(gelu.output[0], "Mul", why)
    _expect(sorted(mul.input) == sorted([gelu.output[0], split.output[1]]), f"{why}: SwiGLU's Mul reads other values")
    down = g.only_reader(mul.output[0], "Linear", why)
    _expect(down.domain == CPU_DOMAIN and int(_attrs(down)["n"]) == hidden and
            g.dims(g.init(down.input[1], why))[1] == two_i // 2, f"{why}: the down projection's shape")
    return gate_up, down.input[1], two_i // 2, down.output[0]


def _rotary(g: _Graph, value: str, op: str, why: str) -> tuple[Any, float]:
    """The Cos (or Sin) node of the table MLABlock reads as `value` (its Reshape's input), and the scalar the table
    is multiplied by after it (YaRN's attention factor; 1.0 when there is no Mul): (node, scale)."""
    table = g.node(value, "Reshape", why).input[0]
    made = g.producer.get(table)
    scale = 1.0
    if made is not None and made.op_type == "Mul":
        g.seen.add(id(made))
        factor = next((i for i in made.input if i in g.inits), None)
        _expect(factor is not None and g.dims(factor) in ((), (1,)), f"{why}: the table's Mul is not by a scalar")
        import onnx

        scale = float(onnx.numpy_helper.to_array(g.inits[str(factor)]).reshape(()))
        table = next(i for i in made.input if i != factor)
    return g.node(table, op, why), scale


def _skip_norm(node: Any, why: str) -> tuple[str, float]:
    _expect(len(node.input) == 3, f"{why}: SkipSimplifiedLayerNormalization with a bias")
    return node.input[2], float(_attrs(node)["epsilon"])


def read_plan(graph: Any) -> dict[str, Any]:
    """The native decoder's description of an ONNX `GraphProto` (the bundle's model.onnx, r1c's passes applied):
    {"model": {field: value or initializer name}, "layers": [{field: ...}], "pack": {name: ...}}. Raises
    NotNative with the reason for any graph it does not describe exactly (module docstring)."""
    g = _Graph(graph)
    blocks = [n for n in g.nodes if n.op_type == "MLABlock" and n.domain == CPU_DOMAIN]
    _expect(bool(blocks), "no r1c.cpu::MLABlock: the native step runs fp32 bundles built with r1c's CPU kernels, "
            "and int8/int4 bundles, an FP8 export built at fp32 and --cpu-kernels ort builds have none")
    first_norm = g.node(blocks[0].input[0], "SimplifiedLayerNormalization", "layer 0's input")
    embed = g.node(first_norm.input[0], "Gather", "the embedding")
    _expect(embed.input[1] == "input_ids" and not _attrs(embed).get("axis", 0), "the embedding reads input_ids rows")
    model: dict[str, Any] = {"embed": g.init(embed.input[0], "the embedding"), "layers": len(blocks)}
    hidden = g.dims(model["embed"])[1]
    model.update(vocab=g.dims(model["embed"])[0], hidden=hidden)
    layers: list[dict[str, Any]] = []
    in_norm: tuple[str, float] = (g.init(first_norm.input[1], "layer 0's norm"),
                                  float(_attrs(first_norm)["epsilon"]))
    residual = first_norm.input[0]
    inv_freq = None
    for li, blk in enumerate(blocks):
        why = f"layer {li}"
        g.seen.add(id(blk))
        a = _attrs(blk)
        names = dict(zip(("q_a", "q_norm", "q_b", "kv_a", "kv_norm"), blk.input[1:6], strict=True))
        names.update(w_uk=blk.input[13], w_uv_t=blk.input[14], o=blk.input[15])
        for v in names.values():
            g.init(v, why)
        _expect(blk.input[9] == f"past_c.{li}" and blk.input[10] == f"past_pe.{li}", f"{why}: cache inputs")
        cos_of, cos_scale = _rotary(g, blk.input[7], "Cos", f"{why}'s cos")
        sin, sin_scale = _rotary(g, blk.input[8], "Sin", f"{why}'s sin")
        angles = g.node(cos_of.input[0], "Mul", f"{why}'s rotary angles")
        _expect(sin.input[0] == cos_of.input[0] and cos_scale == sin_scale and
                model.setdefault("rope_scale", cos_scale) == cos_scale, f"{why}: sin and cos of different angles")
        freq = next((str(i) for i in angles.input if i in g.inits), "")
        _expect(bool(freq) and inv_freq in (None, freq), f"{why}: rotary inv_freq")
        inv_freq = freq
        n_heads, nope, kv_lora = g.dims(names["w_uk"])
        v_head = g.dims(names["w_uv_t"])[2]
        rope = 2 * g.dims(freq)[-1]
        dims = dict(q_lora=g.dims(names["q_norm"])[0], heads=n_heads, nope=nope, rope=rope, kv_lora=kv_lora,
                    v_head=v_head)
        for k, v in dims.items():
            _expect(model.setdefault(k, v) == v, f"{why}: {k} differs from layer 0's")
        layer: dict[str, Any] = {**names, "in_norm": in_norm[0], "in_eps": in_norm[1], "scale": float(a["scale"]),
                                 "q_eps": float(a["q_epsilon"]), "kv_eps": float(a["kv_epsilon"])}
        # the latents leave as new_c / new_pe (Unsqueeze, Concat at this layer's place)
        for out, name in ((blk.output[1], "new_c"), (blk.output[2], "new_pe")):
            unsq = g.only_reader(out, "Unsqueeze", f"{why}'s {name}")
            cat = g.only_reader(unsq.output[0], "Concat", f"{why}'s {name}")
            _expect(cat.output[0] == name and list(cat.input).index(unsq.output[0]) == li, f"{why}: {name}'s order")
        attn = blk.output[0]
        readers = g.users(attn)
        if len(readers) == 1 and readers[0].op_type == "GatherElements":  # the last layer: kept positions only
            kept = [_kept(g, v, f"{why}'s kept positions") for v in (residual, attn)]
            post = g.only_reader(kept[1], "SkipSimplifiedLayerNormalization", f"{why}'s residual")
            _expect(list(post.input[:2]) == kept, f"{why}: residual inputs")
        else:
            post = g.only_reader(attn, "SkipSimplifiedLayerNormalization", f"{why}'s residual")
            _expect(list(post.input[:2]) == [residual, attn], f"{why}: residual inputs")
        layer["post_norm"], layer["post_eps"] = _skip_norm(post, why)
        h, residual = post.output[0], post.output[3]
        readers = g.users(h)
        _expect(len(readers) == 1, f"{why}: the MLP input is read by {len(readers)} nodes")
        if readers[0].op_type == "Linear":
            layer["gate_up"], layer["down"], layer["inter"], mlp_out = _swiglu(g, h, readers[0], hidden, why)
        else:
            mlp_out = _moe(g, h, readers[0], hidden, layer, why)
        nxt = g.only_reader(mlp_out, "SkipSimplifiedLayerNormalization", f"{why}'s MLP output")
        _expect(list(nxt.input[:2]) == [residual, mlp_out], f"{why}: the MLP's residual inputs")
        in_norm = _skip_norm(nxt, why)
        residual = nxt.output[3]
        layers.append(layer)
        if li + 1 < len(blocks):
            _expect(blocks[li + 1].input[0] == nxt.output[0], f"layer {li + 1} does not read layer {li}'s output")
        else:
            head = g.only_reader(nxt.output[0], "Linear", "lm_head")
            _expect(head.output[0] == "logits" and head.domain == CPU_DOMAIN, "lm_head is not an r1c.cpu Linear")
            model.update(final_norm=in_norm[0], final_eps=in_norm[1], lm_head=g.init(head.input[1], "lm_head"))
            _expect(int(_attrs(head)["n"]) == model["vocab"], "lm_head's width is not the vocabulary")
    model["inv_freq"] = inv_freq
    left = sorted({n.op_type for n in g.nodes if id(n) not in g.seen} - _PREAMBLE)
    _expect(not left, f"the graph has {', '.join(left)} nodes the native step does not compute")
    return {"model": model, "layers": layers}


def _kept(g: _Graph, value: str, why: str) -> str:
    """The output of the GatherElements that keeps `value`'s [B, S, H] rows at logits_index (token axis 1, the
    index logits_index expanded over H): the identity in a decode step, whose one position is index 0."""
    readers = g.users(value)
    _expect(len(readers) == 1 and readers[0].op_type == "GatherElements" and _attrs(readers[0]).get("axis") == 1,
            f"{why}: {value!r} is not gathered along the token axis alone")
    gather = readers[0]
    g.seen.add(id(gather))
    expand = g.node(gather.input[1], "Expand", why)
    unsq = g.node(expand.input[0], "Unsqueeze", why)
    _expect(unsq.input[0] == "logits_index", f"{why}: the gather's index is not logits_index")
    return str(gather.output[0])


def _moe(g: _Graph, h: str, reshape: Any, hidden: int, layer: dict[str, Any], why: str) -> str:
    """The MoE MLP from its input Reshape: router, routed and shared experts into `layer`; returns its output."""
    _expect(reshape.op_type == "Reshape", f"{why}: the MLP starts with {reshape.op_type}")
    g.seen.add(id(reshape))
    x = reshape.output[0]
    readers = {n.op_type: n for n in g.readers.get(x, [])}
    _expect(len(readers) == len(g.readers.get(x, [])) and {"Gemm", "MoE"} <= set(readers) <= {"Gemm", "MoE", "Linear"},
            f"{why}: the MoE input's readers")
    gemm, moe = readers["Gemm"], readers["MoE"]
    g.seen.update((id(gemm), id(moe)))
    _expect(moe.domain == CPU_DOMAIN, f"{why}: the experts are ONNX Runtime's MoE, not r1c.cpu's")
    ga = _attrs(gemm)
    _expect(len(gemm.input) == 2 and ga.get("transB") == 1 and not ga.get("transA", 0) and
            ga.get("alpha", 1.0) == 1.0, f"{why}: the router Gemm's form")
    router = g.only_reader(gemm.output[0], "MoEGroupRouter", f"{why}'s router")
    ra, ma = _attrs(router), _attrs(moe)
    _expect(list(moe.input[:2]) == [x, router.output[0]] and len(moe.input) == 4, f"{why}: the MoE's inputs")
    _expect(int(ma.get("normalize_routing_weights", 0)) == 1, f"{why}: routing weights not normalized")
    _expect(int(ma["k"]) == int(ra["top_k"]), f"{why}: MoE k differs from the router's top_k")
    experts, p1 = g.dims(g.init(moe.input[2], why))[:2]
    layer.update(router=g.init(gemm.input[1], why), bias=g.init(router.input[1], why), fc1=moe.input[2],
                 fc2=g.init(moe.input[3], why), experts=experts, p1=p1, top_k=int(ra["top_k"]),
                 n_group=int(ra["n_group"]), topk_group=int(ra["topk_group"]),
                 group_topk=int(ra.get("group_topk", 1)))
    out = moe.output[0]
    if "Linear" in readers:
        layer["gate_up"], layer["down"], layer["inter"], shared = _swiglu(g, x, readers["Linear"], hidden, why)
        add = g.only_reader(out, "Add", f"{why}'s experts' sum")
        _expect(sorted(add.input) == sorted([out, shared]), f"{why}: the experts' sum reads other values")
        out = add.output[0]
    back = g.only_reader(out, "Reshape", f"{why}'s MLP output")
    return str(back.output[0])


def _array(t: Any, model_dir: Path, arena: dict[str, Any]) -> np.ndarray:
    """Initializer `t` as a float32 numpy array: the arena's copy, else a read-only map of its external data, else
    its inline bytes."""
    import onnx

    if t.name in arena:
        return np.asarray(arena[t.name].numpy())
    _expect(t.data_type == onnx.TensorProto.FLOAT, f"{t.name} is not float32")
    dims = tuple(int(d) for d in t.dims)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        return np.memmap(model_dir / info["location"], dtype=np.float32, mode="r", offset=int(info.get("offset", 0)),
                         shape=dims)
    return onnx.numpy_helper.to_array(t).astype(np.float32, copy=False)


def physical_cores() -> int:
    """Physical cores this process may run on (distinct core ids of its allowed CPUs, /proc/cpuinfo), what ONNX
    Runtime's thread count 0 means; os.cpu_count() where that cannot be read."""
    import os

    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, cpu, phys = set(), None, "0"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "processor":
                cpu = int(value)
            elif key == "physical id":
                phys = value
            elif key == "core id" and cpu in allowed:
                cores.add((phys, value))
    except (OSError, ValueError):
        pass
    return len(cores) or len(allowed) or 1


class NativeDecoder:
    """A native decoder over one session's weights (kept alive by `keep`); `step(io)` runs one decode step."""

    def __init__(self, library: Path, plan: dict[str, Any], arrays: dict[str, np.ndarray], threads: int) -> None:
        self._lib = ctypes.CDLL(str(library))
        if not hasattr(self._lib, "r1c_decode_new"):
            raise NotNative(f"{library.name} predates the native decoder (rebuild the bundle)")
        self._lib.r1c_decode_new.restype = ctypes.c_void_p
        self._lib.r1c_decode_new.argtypes = [ctypes.POINTER(_Model), ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t]
        self._lib.r1c_decode_step.restype = ctypes.c_int
        self._lib.r1c_decode_step.argtypes = [ctypes.c_void_p, _I64, ctypes.c_void_p, ctypes.c_void_p,
                                              ctypes.c_void_p, _I64, *(ctypes.c_void_p,) * 5, ctypes.c_char_p,
                                              ctypes.c_size_t]
        self._lib.r1c_decode_free.argtypes = [ctypes.c_void_p]
        self._keep: list[Any] = []

        def ptr(name: str | None) -> Any:
            if name is None:
                return None
            arr = arrays[name]
            _expect(arr.dtype == np.float32 and arr.flags.c_contiguous, f"{name} is not contiguous float32")
            self._keep.append(arr)
            return arr.ctypes.data_as(_F)

        m = plan["model"]
        self.layers, self.vocab = int(m["layers"]), int(m["vocab"])
        self.kv_lora, self.rope = int(m["kv_lora"]), int(m["rope"])
        layers = (_Layer * self.layers)()
        for dst, src in zip(layers, plan["layers"], strict=True):
            for key, value in src.items():
                if key == "router":  # [E, H] -> packed H -> E, once
                    packed = np.ascontiguousarray(pack_linear(np.asarray(arrays[value]).T))
                    value = f"{value}.native_packed"
                    arrays[value] = packed
                setattr(dst, key, ptr(value) if isinstance(value, str) else value)
        model = _Model(layer=layers, **{k: (ptr(v) if isinstance(v, str) else v) for k, v in m.items()})
        self._keep += [layers, model]
        err = ctypes.create_string_buffer(512)
        handle = self._lib.r1c_decode_new(ctypes.byref(model), threads, err, len(err))
        if not handle:
            raise NotNative(err.value.decode(errors="replace"))
        self._handle = handle
        self._err = err

    @classmethod
    def for_graph(cls, library: Path, model_path: Path, arena: dict[str, Any], threads: int
                  ) -> NativeDecoder | None:
        """The native decoder of the bundle graph at `model_path`, over the kernel library `library` and the
        session's arena (initializer name -> OrtValue); None (the reason logged) when the graph is not one it
        computes."""
        import onnx

        graph = onnx.load(str(model_path), load_external_data=False).graph
        try:
            plan = read_plan(graph)
            wanted = {v for d in (plan["model"], *plan["layers"]) for v in d.values() if isinstance(v, str)}
            arrays = {t.name: _array(t, model_path.parent, arena) for t in graph.initializer if t.name in wanted}
            decoder = cls(library, plan, arrays, threads)
        except NotNative as e:
            logger.info("native decode off for %s: %s", model_path.parent.name, e)
            return None
        logger.info("native decode on for %s: %d layers, %d thread(s)", model_path.parent.name, decoder.layers,
                    threads)
        return decoder

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            self._lib.r1c_decode_free(handle)
            self._handle = None

    def arguments(self, io: Any) -> tuple[Any, ...] | None:
        """The fixed arguments of a decode `StepIO`'s steps (its pointers do not change for its key: rows,
        capacity, the cache views, the output buffers), or None when the io is not one this path runs (more than
        one token a row, logits at other positions, a cache or outputs not contiguous float32)."""
        n, s = io.input_ids.shape
        bufs = [io.logits, io.new["c"], io.new["pe"]]
        if s != 1 or io.logits.shape[1] != 1:
            return None
        views = [(io.past[f"past_c.{li}"], io.past[f"past_pe.{li}"]) for li in range(self.layers)]
        if any(not isinstance(v, np.ndarray) or v.dtype != np.float32 or not v.flags.c_contiguous
               for v in (*bufs, *(v for pair in views for v in pair))):
            return None
        capacity = int(views[0][0].shape[2])
        past_c = (ctypes.c_void_p * self.layers)(*(c.ctypes.data for c, _ in views))
        past_pe = (ctypes.c_void_p * self.layers)(*(pe.ctypes.data for _, pe in views))
        return (n, capacity, past_c, past_pe, *(b.ctypes.data for b in bufs))

    def step(self, args: tuple[Any, ...], ids: int, lengths: int, n_new: int | None = None) -> None:
        """One decode step with `arguments(io)` and the addresses of ids [n] and past_lengths [n] (int64); with
        n_new (the address of [n] int64 values 0 / 1) the new latents are also stored in the cache and the lengths
        advanced (decode_cpu.cc `r1c_decode_step`). RuntimeInputError for a bad id, length or n_new (nothing
        written)."""
        n, capacity, past_c, past_pe, logits, new_c, new_pe = args
        if self._lib.r1c_decode_step(self._handle, n, ids, lengths, n_new, capacity, past_c, past_pe, logits, new_c,
                                     new_pe, self._err, len(self._err)):
            raise RuntimeInputError(self._err.value.decode(errors="replace"))
