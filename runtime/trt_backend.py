"""Run a TensorRT engine bundle on a CUDA GPU: `TensorRTBackend(bundle_dir, manifest).run(feeds) -> outputs`.

The engine was built for one TensorRT version and one GPU architecture; both are checked against the
manifest before deserializing, and every mismatch or missing piece (TensorRT, torch with CUDA, a GPU) is a
one-line BundleError. The r1c plugins are registered with TensorRT's plugin registry before the engine is
deserialized (they are Python plugins: the engine holds their fields, not their code).
"""

from __future__ import annotations

import logging
import types
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import BuildError, BundleError, RuntimeInputError
from r1c.manifest import Manifest

logger = logging.getLogger(__name__)

# TensorRT DataType name -> numpy dtype of the host arrays the runtime exchanges
_NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
          "INT8": np.int8, "UINT8": np.uint8}


def _import_tensorrt() -> types.ModuleType:
    try:
        import tensorrt
    except ImportError as e:
        raise BundleError(f"bundle: this is a TensorRT bundle, but TensorRT is not installed ({e})") from None
    return tensorrt


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


class TensorRTBackend:
    """One deserialized engine, one execution context and one CUDA stream; inputs and outputs are numpy."""

    def __init__(self, bundle_dir: str | Path, manifest: Manifest) -> None:
        trt = _import_tensorrt()
        torch = _import_torch_cuda()
        bundle = Path(bundle_dir)
        opts = manifest.target_options
        built = manifest.libraries.get("tensorrt")
        if built is None:
            raise BundleError("bundle: the manifest does not say which TensorRT built the engine")
        if not _same_release(built, trt.__version__):
            raise BundleError(f"bundle: built with TensorRT {built}, but {trt.__version__} is installed "
                              "(rebuild it with `r1c build --target tensorrt`)")
        want_cc = opts.get("compute_capability")
        major, minor = torch.cuda.get_device_capability()
        if want_cc is not None and want_cc != f"{major}.{minor}":
            raise BundleError(f"bundle: engine built for compute capability {want_cc}, but this GPU "
                              f"({torch.cuda.get_device_name()}) is {major}.{minor} (rebuild it on this GPU)")
        engine_path = bundle / str(opts.get("engine", ""))
        if not engine_path.is_file():
            raise BundleError(f"bundle: engine file {opts.get('engine')!r} is missing")

        from r1c.plugins.tensorrt_common import register_plugins
        from r1c.runtime.trt_build import make_logger

        try:
            register_plugins(trt)
        except BuildError as e:
            raise BundleError(f"bundle: {e}") from None
        self._torch = torch
        self._logger = make_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(engine_path.read_bytes())
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
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._inputs[name] = dtype
            else:
                self._outputs[name] = dtype
        profiles = opts.get("profiles") or [{}]
        self._profile: dict[str, dict[str, list[int]]] = profiles[0]

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        p = self._profile.get(name)
        if p is None:
            return
        lo, hi = p["min"], p["max"]
        if len(shape) != len(lo) or any(not a <= s <= b for a, s, b in zip(lo, shape, hi)):
            raise RuntimeInputError(f"{name} has shape {list(shape)}, outside the engine's profile "
                                    f"{lo}..{hi} (rebuild with larger max_batch / max_seq / max_capacity)")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        missing = sorted(set(self._inputs) - set(feeds))
        if missing:
            raise RuntimeInputError(f"missing engine inputs {missing}")
        keep: list[Any] = []  # device tensors must outlive the launch
        with torch.cuda.stream(self._stream):
            for name, dtype in self._inputs.items():
                host: np.ndarray = np.ascontiguousarray(feeds[name], dtype=_NUMPY[dtype])
                self._check_shape(name, host.shape)
                dev = torch.from_numpy(host).to("cuda", non_blocking=False)
                keep.append(dev)
                self._context.set_input_shape(name, tuple(host.shape))
                self._context.set_tensor_address(name, dev.data_ptr())
            outputs: dict[str, Any] = {}
            for name, dtype in self._outputs.items():
                shape = tuple(self._context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise BundleError(f"bundle: TensorRT could not infer the shape of output {name} ({list(shape)})")
                dev = torch.empty(shape, dtype=getattr(torch, np.dtype(_NUMPY[dtype]).name), device="cuda")
                outputs[name] = dev
                self._context.set_tensor_address(name, dev.data_ptr())
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise BundleError(f"bundle: TensorRT execution failed: {'; '.join(self._logger.errors) or 'no detail'}")
        self._stream.synchronize()
        del keep
        return {name: t.cpu().numpy() for name, t in outputs.items()}
