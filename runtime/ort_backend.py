"""ONNX Runtime backend: one session, inputs and outputs bound in place (the KV cache is never copied in).

`OrtBackend.step(io)` is the backend-step interface of `r1c.runtime.step`: every input (token ids, lengths, the
cache views) and every output (logits, new latents) is bound by pointer into the caller's buffers, so a step
neither copies the cache nor allocates its outputs. The `IOBinding` made for a keyed `StepIO` is kept on that
`StepIO` (`StepIO.bound`) and reused: a step whose rows and bucket did not change since the last step of that shape
calls `run_with_iobinding` and nothing else — no OrtValue is created, nothing is bound; the binding goes with the
`StepIO` (the runner keeps `r1c.runtime.step.MAX_CACHED_STEPS` of them). Measured with
`scripts/bench_step_overhead.py` (the note of issue 11). `run(feeds)` is the older dict-in, dict-out call.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from r1c.errors import BundleError
from r1c.manifest import check_session
from r1c.runtime.kernel_weights import pin_kernel_weights
from r1c.runtime.native_decode import NativeDecoder, physical_cores
from r1c.runtime.step import StepIO

logger = logging.getLogger(__name__)

_BF16 = np.dtype(ml_dtypes.bfloat16)

DEFAULT_OPTIONS: dict[str, Any] = {
    "graph_optimization_level": "ORT_ENABLE_ALL",
    "intra_op_num_threads": 0,  # 0: ONNX Runtime picks (one per physical core)
    "inter_op_num_threads": 1,
    "execution_mode": "ORT_SEQUENTIAL",
    "enable_mem_pattern": True,
    # Lets constant folding run DequantizeLinear on FP8 weights once, at load, instead of on every call
    # (weights stay FP8 on disk; in memory they become float32, which the CPU needs anyway).
    "dequantize_weights_at_load": True,
    # Where the weights of r1c's CPU kernels lie: "hugepages", read at load into this process's memory advised for
    # transparent huge pages (r1c.runtime.kernel_weights; a decode step up to 1.2x faster, README), or
    # "onnxruntime", mapped by ONNX Runtime from model.onnx.data like every other initializer (the page cache,
    # shared between processes). r1c.targets.WEIGHTS_MEMORY lists them.
    "weights_memory": "hugepages",
    # Decode steps (one token a row) of a bundle whose graph r1c's native decoder computes exactly
    # (r1c.runtime.native_decode: fp32 weights, r1c's CPU kernels, the MLA block fused) run as one call into r1c's
    # kernel library instead of an ONNX Runtime run; False: every step through ONNX Runtime.
    "native_decode": True,
}


def session_options(options: dict[str, Any]) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    opts = {**DEFAULT_OPTIONS, **options}
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, opts["graph_optimization_level"])
    so.intra_op_num_threads = int(opts["intra_op_num_threads"])
    so.inter_op_num_threads = int(opts["inter_op_num_threads"])
    so.execution_mode = getattr(ort.ExecutionMode, opts["execution_mode"])
    so.enable_mem_pattern = bool(opts["enable_mem_pattern"])
    so.log_severity_level = 3
    if opts["dequantize_weights_at_load"]:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


def _load_error(model_path: Path, e: Exception) -> BundleError:
    """ONNX Runtime's exception (its own types) as a one-line bundle error."""
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return BundleError(f"bundle: ONNX Runtime could not load {model_path.name}: {msg}")


class OrtBackend:
    def __init__(self, model_path: Path, options: dict[str, Any], custom_ops: Sequence[Path] = ()) -> None:
        import onnxruntime as ort

        merged = {**DEFAULT_OPTIONS, **options}
        where = merged["weights_memory"]
        check_session(merged, BundleError, "bundle: session")  # a load-time override too
        try:
            so = self._session_options(options)
            for library in custom_ops:  # r1c's CPU kernels (r1c/plugins/cpu_moe), when the bundle has them
                so.register_custom_ops_library(str(library))
        except Exception as e:  # ORT raises its own exception types; report them as bundle errors
            raise _load_error(model_path, e) from None
        # the kernels' weights in a huge-page arena (a BundleError of its own when a weights file is bad)
        self._weights: dict[str, Any] = (pin_kernel_weights(so, model_path) if custom_ops and where == "hugepages"
                                         else {})
        self.native: NativeDecoder | None = None
        if custom_ops and merged["native_decode"]:
            threads = int(so.intra_op_num_threads) or physical_cores()
            self.native = NativeDecoder.for_graph(custom_ops[0], model_path, self._weights, threads)
        if self.native is not None:
            # ONNX Runtime's workers spin for ~20-30 ms after each run (measured here: a 2-thread read after a run
            # is ~30% slower for that long), which would take the cores from the native decode steps that follow
            # a prefill; the native decoder's own workers spin between its steps instead
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise _load_error(model_path, e) from None
        # the arena's OrtValues live as long as the session, whoever keeps it (ORT reads them in place)
        self.session._r1c_kernel_weights = list(self._weights.values())
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._local = threading.local()  # a scratch IOBinding per calling thread, for unkeyed StepIOs

    def _session_options(self, options: dict[str, Any]) -> Any:
        """The `onnxruntime.SessionOptions` of `options` (a subclass adds its custom ops here)."""
        return session_options(options)

    def step(self, io: StepIO) -> None:
        """Run once with every input and output bound by address (see `r1c.runtime.step`); a keyed `StepIO` is
        bound on its first step and its binding kept on it (`io.bound`) and reused after. A decode step that the
        native decoder computes (`self.native`) is its one call instead, its arguments kept on a keyed io."""
        args = self._native_args(io)
        if args is not None:
            self.native.step(args, io.input_ids.ctypes.data, io.past_lengths.ctypes.data)  # type: ignore[union-attr]
            return
        if io.key is None:  # every input and output bound again, into this thread's scratch binding
            scratch = getattr(self._local, "scratch", None)
            if scratch is None:
                scratch = self._local.scratch = self.session.io_binding()
            self.session.run_with_iobinding(self._bind(scratch, io))
            return
        bound = io.bound
        if bound is None or bound[0] is not self:
            bound = io.bound = (self, self._bind(self.session.io_binding(), io))
        self.session.run_with_iobinding(bound[1])

    def _native_args(self, io: StepIO) -> tuple[Any, ...] | None:
        """The native decoder's fixed arguments for `io` (kept on a keyed io), or None: no native decoder, or not
        a step it runs."""
        if self.native is None or io.input_ids.shape[1] != 1:
            return None
        bound = io.bound
        if bound is not None and bound[0] is self.native:
            return bound[1]  # type: ignore[no-any-return]
        args = self.native.arguments(io)
        if args is not None and io.key is not None:
            io.bound = (self.native, args)
        return args

    def decode_in_place(self, io: StepIO, input_ids: np.ndarray, lengths: np.ndarray, n_new: Any) -> bool:
        """A decode step that also stores its latents in the cache and advances `lengths` (the cache's int64
        lengths of io's rows, a view), when the native decoder runs it: `input_ids` [n, 1] and `n_new` [n] (values
        0 / 1) contiguous int64 arrays. Returns False, having done nothing, for any other step (the caller then
        steps and writes as usual)."""
        args = self._native_args(io)
        if (args is None or not isinstance(n_new, np.ndarray) or n_new.dtype != np.int64 or
                input_ids.dtype != np.int64 or not input_ids.flags.c_contiguous or not n_new.flags.c_contiguous):
            return False
        self.native.step(args, input_ids.ctypes.data, lengths.ctypes.data, n_new.ctypes.data)  # type: ignore[union-attr]
        return True

    @staticmethod
    def _bind(binding: Any, io: StepIO) -> Any:
        for name, arr in io.feeds().items():
            binding.bind_input(name, "cpu", 0, _element_type(arr.dtype), arr.shape, _address(name, arr))
        for name, arr in io.outputs().items():
            binding.bind_output(name, "cpu", 0, _element_type(arr.dtype), arr.shape, _address(name, arr))
        return binding

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; numpy inputs are bound by pointer (ORT reads the caller's buffers in place)."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        for name, arr in feeds.items():
            if not arr.flags.c_contiguous:
                raise ValueError(f"input {name} must be C-contiguous to be bound in place")
            if arr.dtype == _BF16:  # numpy has no bfloat16: bound as its bits, typed for ORT
                value = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(arr.view(np.uint16), _ONNX_BFLOAT16)
            else:
                value = ort.OrtValue.ortvalue_from_numpy(arr)
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        return {name: _to_numpy(v) for name, v in zip(self.output_names, binding.get_outputs(), strict=True)}


_ONNX_BFLOAT16 = 16


def _to_numpy(value: Any) -> np.ndarray:
    """An output OrtValue as numpy; bfloat16 (which ORT cannot hand to numpy) copied out as ml_dtypes.bfloat16."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    import ctypes

    shape = tuple(value.shape())
    n = int(np.prod(shape, dtype=np.int64))
    raw = np.ctypeslib.as_array((ctypes.c_uint16 * n).from_address(value.data_ptr())) if n else np.empty(0, np.uint16)
    return raw.copy().view(_BF16).reshape(shape)


def _address(name: str, arr: np.ndarray) -> int:
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous to be bound in place")
    return int(arr.ctypes.data)


def _element_type(dtype: np.dtype) -> Any:
    """What IOBinding takes as an element type: the numpy type, or ONNX's code for bfloat16 (numpy has none)."""
    return _ONNX_BFLOAT16 if dtype == _BF16 else dtype.type
