"""The weights of r1c's CPU kernels in one huge-page arena, handed to ONNX Runtime by address.

`pin_kernel_weights(so, model_path)`: the external-data initializers of an ONNX model that only `r1c.cpu` nodes
read (Linear, MoE, MLA attention: every weight an fp32 bundle's decode step streams but the embedding table's rows
and the routers' small gates) are read, in file order, into one `r1c.runtime.hugepages.huge_empty` arena, each
tensor 64-byte aligned, and given to the session options with `SessionOptions.add_initializer`: the session reads
them in place. Only tensors r1c's kernels alone read go there: ONNX Runtime may prepack (copy into its own
buffers) a constant that one of its own kernels reads even when given this way, so an arena copy of such a tensor
would be memory spent twice. Sub-byte types (int4, uint4, float4) stay with ONNX Runtime (no r1c CPU kernel reads
them). Measured effect: README ("Weights in huge pages") and the closing note of issue 11. The bytes read are
then dropped from the page cache (`posix_fadvise` DONTNEED, where the OS has it): the process holds its own copy,
and a checkpoint of hundreds of GB read through the page cache would otherwise stand there twice, pushing out the
cache's other contents (the rest of the bundle ONNX Runtime maps among them); another process loading the bundle
reads them from the disk again.

The OrtValues returned must live as long as the session (`OrtBackend` keeps them on the session object itself).
Errors: `BundleError` when a weights file is missing, shorter than a tensor's offset + length, or outside the
model's directory (as ONNX Runtime refuses it), or when the arena cannot be mapped (naming
`weights_memory=onnxruntime`, which needs no arena).
"""

from __future__ import annotations

import dataclasses
import os
from io import BufferedReader
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import BundleError
from r1c.runtime.hugepages import huge_empty

ALIGN = 64  # bytes between tensors in the arena: a cache line, what ONNX Runtime's CPU allocator aligns to
SUB_BYTE = frozenset({21, 22, 23})  # ONNX TensorProto UINT4, INT4, FLOAT4E2M1: two values a byte


@dataclasses.dataclass(frozen=True)
class Pinned:
    """What `load_external` read: `raw`, the tensor's bytes as stored (uint8 [length], little-endian, row-major,
    in the arena); `elem_type`, its ONNX element type; `dims`, its shape."""

    raw: np.ndarray
    elem_type: int
    dims: tuple[int, ...]


def kernel_weight_names(graph: Any) -> set[str]:
    """The initializers of an ONNX `GraphProto` that only r1c's CPU kernels (domain `r1c.cpu`) read: inputs of
    r1c.cpu nodes that no other node reads and that are not graph outputs (the main graph only: r1c's bundles
    have no subgraphs or local functions around those nodes)."""
    from r1c.plugins.cpu_moe.spec import CPU_DOMAIN

    ours: set[str] = set()
    theirs: set[str] = {o.name for o in graph.output}
    for node in graph.node:
        (ours if node.domain == CPU_DOMAIN else theirs).update(node.input)
    inits = {t.name for t in graph.initializer}
    return (ours - theirs) & inits


def _external(tensor: Any) -> tuple[str, int, int]:
    """(location, offset, length) of an ONNX TensorProto stored as external data (ONNX external-data keys)."""
    import onnx

    entries = {e.key: e.value for e in tensor.external_data}
    length = entries.get("length")
    if length is None:  # the ONNX spec lets length be omitted: the dtype's size times the element count
        count = int(np.prod(tensor.dims, dtype=np.int64))
        length = count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return entries["location"], int(entries.get("offset", 0)), int(length)


def load_external(model_path: Path, graph: Any, names: set[str]) -> dict[str, Pinned]:
    """The external-data initializers `names` of `graph` (the `GraphProto` of the model at `model_path`, whose
    directory holds the data files) read into one `huge_empty` arena: {name: Pinned}. Names that are not
    external-data initializers, and sub-byte types, are left out; an empty selection maps nothing. Raises
    `BundleError` (module docstring)."""
    import onnx

    tensors = [t for t in graph.initializer if t.name in names and t.data_location == onnx.TensorProto.EXTERNAL
               and t.data_type not in SUB_BYTE]
    if not tensors:
        return {}
    spans = sorted(((*_external(t), t) for t in tensors), key=lambda s: (s[0], s[1]))
    total = sum(-(-length // ALIGN) * ALIGN for _, _, length, _ in spans)
    try:
        arena = huge_empty(total)
    except (OSError, MemoryError) as e:
        raise BundleError(f"bundle: cannot map {total >> 20} MiB for the kernels' weights ({e}); "
                          "session option weights_memory=onnxruntime (r1c build --weights-memory onnxruntime) "
                          "leaves them to ONNX Runtime") from None
    root = model_path.parent.resolve()
    out: dict[str, Pinned] = {}
    opened: dict[str, BufferedReader] = {}
    at = 0
    try:
        for location, offset, length, t in spans:
            f = opened.get(location)
            if f is None:
                path = (root / location).resolve()
                if not path.is_relative_to(root):
                    raise BundleError(f"bundle: weights file {location!r} resolves to {path}, outside {root}")
                try:
                    f = opened[location] = path.open("rb")
                except OSError as e:
                    raise BundleError(f"bundle: cannot read the weights file {path}: {e.strerror}") from None
            f.seek(offset)
            dst = arena[at:at + length]
            if f.readinto(dst.data) != length:
                raise BundleError(f"bundle: {location} is shorter than tensor {t.name} needs "
                                  f"({offset} + {length} bytes)")
            out[t.name] = Pinned(dst, int(t.data_type), tuple(int(d) for d in t.dims))
            _drop_cached(f, offset, length)
            at += -(-length // ALIGN) * ALIGN
    finally:
        for f in opened.values():
            f.close()
    return out


def _drop_cached(f: BufferedReader, offset: int, length: int) -> None:
    """Advise the OS that the page cache need not keep bytes [offset, offset + length) of `f` (best effort: a
    no-op where posix_fadvise is missing or refuses)."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return
    try:
        advise(f.fileno(), offset, length, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass


def pin_kernel_weights(so: Any, model_path: Path) -> dict[str, Any]:
    """Read the external weights only r1c's CPU kernels read (`kernel_weight_names`) into one huge-page arena and
    give them to the `onnxruntime.SessionOptions` `so` by address (`add_initializer`). Returns their OrtValues by
    initializer name, which must outlive the session (each holds its numpy view, which holds the arena); {} when
    there are none. Raises `BundleError` (module docstring)."""
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(model_path), load_external_data=False).graph
    values = {}
    for name, p in load_external(model_path, graph, kernel_weight_names(graph)).items():
        value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(_typed(p.raw, p.elem_type).reshape(p.dims),
                                                               p.elem_type)
        so.add_initializer(name, value)
        values[name] = value
    return values


def _typed(raw: np.ndarray, elem_type: int) -> np.ndarray:
    """The bytes of a tensor viewed as numpy's type of its ONNX element type, or as unsigned integers of the same
    width where numpy has no such type (bfloat16 and some float8 types: ml_dtypes' types that are not of numpy's
    kinds b/i/u/f); ONNX Runtime is told the type separately."""
    import onnx

    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError):
        dtype = np.dtype(np.uint8)
    if dtype.kind not in "biuf":
        dtype = np.dtype(f"u{dtype.itemsize}")
    return raw.view(dtype)
