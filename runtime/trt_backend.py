"""Run a TensorRT bundle (`tensorrt`, or `tensorrt-rtx` on an RTX GPU) with device-resident serving state.

`TensorRTBackend(bundle_dir, manifest)`:
  * checks the library that built the engine (same release) and the GPU (the manifest's compute capability), makes
    the bundle's ahead-of-time kernel library the one the r1c plugins launch from (`kernels/`: no Triton JIT, no
    compile on the serving machine; a missing library is a BundleError), registers the plugins, and deserializes
    the engine from the memory-mapped plan file (never read into Python bytes);
  * `step(io)`: one step of the serving runtime's step interface with every buffer on the device (see `trt_device`):
    ids and lengths uploaded, everything bound by address, one stream, decode steps replayed from CUDA graphs;
  * `alloc`: the device allocator the cache manager and the step runner take, so the cache lives on the GPU for the
    whole request; `sample(logits, ...)` picks the next tokens on the device;
  * `run(feeds)`: the older host-array interface (copies in and out; kept for callers that hold numpy caches).
Every mismatch or missing piece (TensorRT, torch with CUDA, a GPU, the kernels) is a one-line BundleError.
"""

from __future__ import annotations

import logging
import mmap
import types
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import BuildError, BundleError, RuntimeInputError
from r1c.manifest import Manifest

logger = logging.getLogger(__name__)



def _to_device(torch: Any, host: np.ndarray, dtype_name: str) -> Any:
    """A host array (numpy; bf16 as ml_dtypes.bfloat16) as a CUDA tensor of the engine's dtype."""
    if dtype_name == "bfloat16":
        return torch.from_numpy(np.ascontiguousarray(host).view(np.int16)).to("cuda").view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(host, dtype=np.dtype(dtype_name))).to("cuda")


def _to_host(t: Any) -> np.ndarray:
    if str(t.dtype) == "torch.bfloat16":
        import ml_dtypes
        import torch

        return t.view(torch.int16).cpu().numpy().view(ml_dtypes.bfloat16)
    return t.cpu().numpy()


def _import_trt(target: str) -> types.ModuleType:
    name = "tensorrt_rtx_bindings" if target == "tensorrt-rtx" else "tensorrt"
    try:
        return __import__(name)
    except ImportError as e:
        what = "TensorRT for RTX" if target == "tensorrt-rtx" else "TensorRT"
        raise BundleError(f"bundle: this is a {target} bundle, but {what} is not installed ({e})") from None


def _import_torch_cuda() -> Any:
    try:
        import torch
    except ImportError:
        raise BundleError("bundle: running a TensorRT bundle needs torch with CUDA; torch is not installed") from None
    if not torch.cuda.is_available():
        raise BundleError("bundle: running a TensorRT bundle needs a CUDA GPU, and torch sees none "
                          f"(torch {torch.__version__}, CUDA {torch.version.cuda})")
    return torch


def _same_release(built: str, installed: str) -> bool:
    """TensorRT engines load only in the TensorRT release that built them (major.minor.patch)."""
    return built.split(".")[:3] == installed.split(".")[:3]


def map_plan(path: Path) -> tuple[mmap.mmap, memoryview]:
    """The serialized plan memory-mapped read-only (for `deserialize_cuda_engine`'s buffer overload)."""
    with path.open("rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return mapped, memoryview(mapped)


class TensorRTBackend:
    """One deserialized engine, one execution context and one CUDA stream; device-resident steps."""

    def __init__(self, bundle_dir: str | Path, manifest: Manifest, *, cuda_graphs: bool = True) -> None:
        from r1c.runtime.trt_lib import library_key

        trt = _import_trt(manifest.target)
        torch = _import_torch_cuda()
        bundle = Path(bundle_dir)
        opts = manifest.target_options
        key = library_key(trt)
        built = manifest.libraries.get(key)
        if built is None:
            raise BundleError(f"bundle: the manifest does not say which {key} built the engine")
        if not _same_release(built, trt.__version__):
            raise BundleError(f"bundle: built with {key} {built}, but {trt.__version__} is installed "
                              f"(rebuild it with `r1c build --target {manifest.target}`)")
        want_cc = opts.get("compute_capability")
        major, minor = torch.cuda.get_device_capability()
        if want_cc is not None and want_cc != f"{major}.{minor}":
            raise BundleError(f"bundle: engine and kernels built for compute capability {want_cc}, but this GPU "
                              f"({torch.cuda.get_device_name()}) is {major}.{minor} (rebuild with --arch "
                              f"sm{major}{minor})")
        engine_path = bundle / str(opts.get("engine", ""))
        if not engine_path.is_file():
            raise BundleError(f"bundle: engine file {opts.get('engine')!r} is missing")

        from r1c.plugins.tensorrt_common import register_plugins, use_kernel_library
        from r1c.runtime.trt_lib import make_logger

        use_kernel_library(bundle / str(opts.get("kernels", "kernels")))  # BundleError when it is missing
        try:
            register_plugins(trt)
        except BuildError as e:
            raise BundleError(f"bundle: {e}") from None
        self._torch = torch
        self._trt = trt
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        mapped, view = map_plan(engine_path)
        try:
            self._engine = self._runtime.deserialize_cuda_engine(view)
        finally:
            view.release()
            mapped.close()
        if self._engine is None:
            raise BundleError(f"bundle: TensorRT could not deserialize {engine_path.name}: "
                              f"{'; '.join(self._logger.errors) or 'no detail'}")
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise BundleError("bundle: TensorRT could not create an execution context: "
                              f"{'; '.join(self._logger.errors) or 'no detail'}")
        self._stream = torch.cuda.Stream()
        self._inputs: dict[str, str] = {}
        self._outputs: dict[str, str] = {}
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = self._engine.get_tensor_dtype(name).name
            (self._inputs if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else self._outputs)[
                name] = dtype
        profiles = opts.get("profiles") or [{}]
        self._profile: dict[str, dict[str, list[int]]] = profiles[0]
        ids_max = self._profile.get("input_ids", {}).get("max", [1, 1])

        from r1c.runtime.trt_device import BindingCache, DecodeGraphs, Staging, device_alloc

        self.alloc = device_alloc("cuda")
        self._staging = Staging(int(ids_max[0]) * int(ids_max[1]), int(ids_max[0]))
        self._bound = BindingCache()
        self._graphs = DecodeGraphs(self._stream) if cuda_graphs else None

    # ---- the device-resident step ------------------------------------------------------------------------------
    def step(self, io: Any) -> None:
        """Run one step (`r1c.runtime.step.StepIO`; past views, logits and new-latent buffers device tensors) on
        the backend's stream; the outputs are written in place. Decode steps replay a CUDA graph."""
        from r1c.runtime.trt_device import step_bindings

        ids, lengths = self._staging.upload(io.input_ids, io.past_lengths, self._stream)
        index = None if io.logits_index is None else self._staging.upload_index(io.logits_index, self._stream)
        bindings = step_bindings(io, ids, lengths, index)
        self._bound.apply(self._context, bindings)
        if self._graphs is not None and io.input_ids.shape[1] == 1:
            with self._torch.cuda.stream(self._stream):
                self._graphs.run(tuple(bindings), self._execute)
        else:
            self._execute()

    def _execute(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise BundleError(f"bundle: TensorRT execution failed: {'; '.join(self._logger.errors) or 'no detail'}")

    def sample(self, logits: Any, temperature: Any = 0.0, top_k: Any = 0, top_p: Any = 1.0,
               generator: Any = None) -> np.ndarray:
        """The next token of each row from device logits [n, V], chosen on the device; only [n] ids come back."""
        from r1c.runtime.trt_device import sample_on_device

        with self._torch.cuda.stream(self._stream):
            return sample_on_device(logits, temperature, top_k, top_p, generator).cpu().numpy()

    def synchronize(self) -> None:
        self._stream.synchronize()

    # ---- the host-array interface ----------------------------------------------------------------------------------
    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        p = self._profile.get(name)
        if p is None:
            return
        lo, hi = p["min"], p["max"]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            raise RuntimeInputError(f"{name} has shape {list(shape)}, outside the engine's profile "
                                    f"{lo}..{hi} (rebuild with larger max_batch / max_seq / max_capacity)")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Host arrays in, host arrays out: every input copied to the device and every output back (use `step`
        with device buffers to keep the cache on the GPU)."""
        torch = self._torch
        missing = sorted(set(self._inputs) - set(feeds))
        if missing:
            raise RuntimeInputError(f"missing engine inputs {missing}")
        from r1c.plugins.tensorrt_common import dtype_name

        keep: list[Any] = []
        with torch.cuda.stream(self._stream):
            for name, dtype in self._inputs.items():
                self._check_shape(name, tuple(np.shape(feeds[name])))
                dev = _to_device(torch, feeds[name], dtype_name(getattr(self._trt.DataType, dtype)))
                keep.append(dev)
                self._context.set_input_shape(name, tuple(dev.shape))
                self._context.set_tensor_address(name, dev.data_ptr())
            outputs: dict[str, Any] = {}
            for name, dtype in self._outputs.items():
                shape = tuple(self._context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise BundleError(f"bundle: TensorRT could not infer the shape of output {name} ({list(shape)})")
                dev = torch.empty(shape, dtype=getattr(torch, dtype_name(getattr(self._trt.DataType, dtype))),
                                  device="cuda")
                outputs[name] = dev
                self._context.set_tensor_address(name, dev.data_ptr())
            self._bound = type(self._bound)()  # the step path re-binds from scratch after this
            self._execute()
        self._stream.synchronize()
        del keep
        return {name: _to_host(t) for name, t in outputs.items()}
