"""The ONNX graph builder of the exporter and the writer that streams its weights into external-data files.

Weights never live in the ModelProto: `WeightWriter.add` writes a tensor's bytes (handed over in chunks,
e.g. one expert at a time) straight into the current data file and returns a TensorProto that points at
them (`location`, `offset`, `length`). The first data file is `model.onnx.data`; a new one
(`model.onnx.data.1`, `.2`, ...) starts when the current file would pass `max_file_bytes` (one tensor
larger than that gets a file of its own). Tensors of at least ALIGN_THRESHOLD bytes start at ALIGN-byte
offsets, so that runtimes can memory-map them. With `write_bytes=False` the files get their full size as
sparse holes and no tensor is read: the graph and its data layout without the weights (`--weights none`).

Dtypes: ONNX TensorProto enums; `np_dtype` maps them to numpy (bfloat16 and FP8 through ml_dtypes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from r1c.errors import ExportError

logger = logging.getLogger(__name__)

DATA_FILE = "model.onnx.data"
DEFAULT_MAX_FILE_BYTES = 16 << 30  # 16 GiB: ~45 files for R1's 690 GB, each a size every filesystem and tool handles
ALIGN = 1 << 16  # 64 KiB: the largest page/allocation granularity a runtime maps with
ALIGN_THRESHOLD = 1 << 20
INLINE_LIMIT = 1024  # bytes: smaller tensors stay inside the ModelProto

DTYPES = {"float32": TensorProto.FLOAT, "bfloat16": TensorProto.BFLOAT16, "float16": TensorProto.FLOAT16}
_NP: dict[int, np.dtype[Any]] = {
    TensorProto.FLOAT: np.dtype(np.float32), TensorProto.FLOAT16: np.dtype(np.float16),
    TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16), TensorProto.FLOAT8E4M3FN: np.dtype(ml_dtypes.float8_e4m3fn),
    TensorProto.INT64: np.dtype(np.int64), TensorProto.INT32: np.dtype(np.int32), TensorProto.BOOL: np.dtype(np.bool_),
}
_TORCH: dict[torch.dtype, int] = {
    torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16,
    torch.float8_e4m3fn: TensorProto.FLOAT8E4M3FN,
}


def np_dtype(onnx_dtype: int) -> np.dtype[Any]:
    return _NP[onnx_dtype]


def onnx_dtype(t: torch.dtype) -> int:
    try:
        return _TORCH[t]
    except KeyError:
        raise ExportError(f"export: tensors of dtype {t} are not supported") from None


def to_numpy(t: torch.Tensor, dtype: int) -> np.ndarray:
    """`t` converted to the ONNX dtype `dtype` as a C-contiguous numpy array (bf16/FP8 via ml_dtypes views)."""
    target = {v: k for k, v in _TORCH.items()}[dtype]
    t = t.detach()
    if t.dtype != target:
        t = t.to(target)
    t = t.contiguous()
    if dtype == TensorProto.BFLOAT16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if dtype == TensorProto.FLOAT8E4M3FN:
        return t.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn)
    return t.numpy()


Chunks = Callable[[], Iterable[np.ndarray]]


class WeightWriter:
    """Writes initializers into `directory`'s external-data files as they are added (see the module docstring)."""

    def __init__(self, directory: Path, *, write_bytes: bool = True, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 total_bytes: int | None = None, progress: bool = False) -> None:
        self.directory = directory
        self.write_bytes = write_bytes
        self.max_file_bytes = max_file_bytes
        self.files: list[str] = []
        self._file: Any = None
        self._size = 0
        self.written = 0  # bytes of tensors (external and inline)
        self.start = time.perf_counter()
        self.total = total_bytes
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="export: weights",
                        disable=not progress, leave=False)

    def _next_file(self) -> None:
        self.close()
        name = DATA_FILE if not self.files else f"{DATA_FILE}.{len(self.files)}"
        self.files.append(name)
        self._file = (self.directory / name).open("wb")
        self._size = 0

    def add(self, name: str, dims: tuple[int, ...], dtype: int, chunks: Chunks, *, always: bool = False
            ) -> onnx.TensorProto:
        """The initializer `name`; `chunks()` yields its bytes in order (read only when bytes are written).

        `always`: write real bytes even with write_bytes=False (tensors computed from the config).
        """
        itemsize = np_dtype(dtype).itemsize
        nbytes = itemsize * int(np.prod(dims, dtype=np.int64))
        write = self.write_bytes or always
        if nbytes < INLINE_LIMIT and write:
            data = b"".join(np.ascontiguousarray(c, dtype=np_dtype(dtype)).tobytes() for c in chunks())
            _check_size(name, len(data), nbytes)
            tensor = helper.make_tensor(name, dtype, dims, data, raw=True)
            self._advance(nbytes)
            return tensor
        if self._file is None or (self._size and self._size + nbytes > self.max_file_bytes):
            self._next_file()
        offset = self._size
        if nbytes >= ALIGN_THRESHOLD and offset % ALIGN:
            offset += ALIGN - offset % ALIGN
        self._file.seek(offset)
        if write:
            done = 0
            want = np_dtype(dtype)
            for chunk in chunks():
                arr = np.ascontiguousarray(chunk)
                if arr.dtype != want:
                    raise ExportError(f"export: internal: {name} chunk is {arr.dtype}, expected {want}")
                self._file.write(arr.reshape(-1).view(np.uint8).data)
                done += arr.nbytes
                del arr
            _check_size(name, done, nbytes)
        else:
            self._file.seek(offset + nbytes)
        self._size = offset + nbytes
        tensor = TensorProto(name=name, data_type=dtype, dims=list(dims))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.files[-1]), ("offset", str(offset)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self._advance(nbytes)
        return tensor

    def _advance(self, nbytes: int) -> None:
        self.written += nbytes
        self.bar.update(nbytes)

    def rate(self) -> str:
        """Progress line: bytes written, rate and (with a known total) the time left."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        speed = self.written / elapsed
        eta = f", ETA {(self.total - self.written) / speed:.0f} s" if self.total and speed > 0 else ""
        return f"{self.written / 2**30:.2f} GiB at {speed / 2**20:.0f} MiB/s{eta}"

    def close(self) -> None:
        if self._file is not None:
            self._file.truncate(self._size)  # a trailing hole (weights none) still gets its size
            self._file.close()
            self._file = None

    def finish(self) -> None:
        self.close()
        self.bar.close()


def _check_size(name: str, got: int, want: int) -> None:
    if got != want:
        raise ExportError(f"export: internal: {name} produced {got} bytes, expected {want}")


class Graph:
    """A small builder over onnx.helper: unique deterministic names, constants, streamed initializers."""

    def __init__(self, writer: WeightWriter) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.writer = writer
        self._names: set[str] = set()
        self._consts: dict[tuple[Any, ...], str] = {}
        self.scope = ""

    def name(self, hint: str) -> str:
        base = f"{self.scope}/{hint}" if self.scope else hint
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> Any:
        outs = [self.name(f"{op_type}_out{i}" if n_out > 1 else op_type) for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name(op_type + "_node"),
                                           domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]

    def const(self, values: Iterable[int] | Iterable[float], dtype: int = TensorProto.INT64,
              scalar: bool = False) -> str:
        vals = list(values)
        key = (tuple(vals), dtype, scalar)
        if key not in self._consts:
            name = self.name("const")
            arr = np.array(vals[0] if scalar else vals, dtype=np_dtype(dtype))
            self.initializers.append(numpy_helper.from_array(arr, name) if dtype != TensorProto.BFLOAT16
                                     else helper.make_tensor(name, dtype, arr.shape, arr.tobytes(), raw=True))
            self._consts[key] = name
        return self._consts[key]

    def weight(self, name: str, dims: tuple[int, ...], dtype: int, chunks: Chunks, *, always: bool = False) -> str:
        """An initializer written now by the WeightWriter; `chunks()` yields its values in `dtype`, in order."""
        if name in self._names:
            raise ExportError(f"export: weight {name} added twice")
        self._names.add(name)
        self.initializers.append(self.writer.add(name, tuple(int(d) for d in dims), dtype, chunks, always=always))
        return name

    def value(self, name: str, arr: np.ndarray) -> str:
        """A small initializer computed from the config (written even when weights are not)."""
        dtype = {v: k for k, v in _NP.items()}[arr.dtype]
        return self.weight(name, arr.shape, dtype, lambda: [arr], always=True)
