"""The few CUDA driver API calls that launch an ahead-of-time cubin: load a module, find a function, raise its
dynamic shared memory limit, launch it on a stream. Through ctypes on `libcuda.so.1` (the driver every CUDA
machine has; no cuda-python, no Triton, no compiler at run time).

Errors are `BundleError`s carrying the driver's own name for the error (`cuGetErrorName`). A launch runs in the
context current on the calling thread; `CudaDriver` makes the primary context of the device current where a
thread has none (TensorRT may call a plugin's enqueue from a thread torch never touched).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from r1c.errors import BundleError

CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
STATIC_SHARED_LIMIT = 48 * 1024  # above this a function needs the attribute raised (Triton's launcher does the same)


class CudaDriver:
    """ctypes bindings of the CUDA driver calls r1c needs (cuModuleLoadData, cuLaunchKernel, ...)."""

    def __init__(self, library: str = "libcuda.so.1", device: int = 0) -> None:
        try:
            self.lib = ctypes.CDLL(library)
        except OSError as e:
            raise BundleError(f"kernels: the CUDA driver library {library} cannot be loaded ({e}); running the r1c "
                              "kernel library needs an NVIDIA driver") from None
        self._check(self.lib.cuInit(0), "cuInit")
        self.device = device
        self.context = self._primary_context()

    def _check(self, rc: int, what: str) -> None:
        if rc == 0:
            return
        name = ctypes.c_char_p()
        self.lib.cuGetErrorName(rc, ctypes.byref(name))
        raise BundleError(f"kernels: {what} failed: {name.value.decode() if name.value else rc}")

    def _primary_context(self) -> ctypes.c_void_p:
        ctx = ctypes.c_void_p()
        self._check(self.lib.cuCtxGetCurrent(ctypes.byref(ctx)), "cuCtxGetCurrent")
        if ctx.value:
            return ctx
        dev = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), self.device), "cuDeviceGet")
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
        self._check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        return ctx

    def make_current(self) -> None:
        """Make this driver's context current on the calling thread (cheap when it already is)."""
        cur = ctypes.c_void_p()
        self._check(self.lib.cuCtxGetCurrent(ctypes.byref(cur)), "cuCtxGetCurrent")
        if cur.value != self.context.value:
            self._check(self.lib.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")

    def load_function(self, cubin: bytes, name: str, shared: int) -> ctypes.c_void_p:
        """Load `cubin` as a module and return its function `name`, allowed `shared` bytes of dynamic shared memory."""
        module, fn = ctypes.c_void_p(), ctypes.c_void_p()
        self._check(self.lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(cubin)),
                    f"cuModuleLoadData ({name})")
        self._check(self.lib.cuModuleGetFunction(ctypes.byref(fn), module, name.encode()),
                    f"cuModuleGetFunction ({name})")
        if shared > STATIC_SHARED_LIMIT:  # as Triton's launcher: allow up to the opt-in limit minus static memory
            static, optin, dev = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
            self._check(self.lib.cuFuncGetAttribute(ctypes.byref(static), CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES, fn),
                        "cuFuncGetAttribute")
            self._check(self.lib.cuCtxGetDevice(ctypes.byref(dev)), "cuCtxGetDevice")
            self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(optin),
                                                      CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev),
                        "cuDeviceGetAttribute")
            if shared + static.value > optin.value:
                raise BundleError(f"kernels: {name} needs {shared} + {static.value} bytes of shared memory; this GPU "
                                  f"allows {optin.value} per block (the library was built for another GPU?)")
            self._check(self.lib.cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                    optin.value - static.value),
                        f"cuFuncSetAttribute ({name}, {shared} bytes of shared memory)")
        return fn

    def driver_version(self) -> int:
        """The driver's CUDA version, e.g. 13000."""
        v = ctypes.c_int()
        self._check(self.lib.cuDriverGetVersion(ctypes.byref(v)), "cuDriverGetVersion")
        return v.value

    def launch(self, fn: Any, grid: Sequence[int], block: int, shared: int, stream: int, params: Any) -> None:
        """cuLaunchKernel(fn, grid, (block, 1, 1), shared, stream, params): `params` is a void* array pointing at
        each argument's value."""
        gx, gy, gz = grid
        self._check(self.lib.cuLaunchKernel(fn, gx, gy, gz, block, 1, 1, shared, ctypes.c_void_p(stream), params,
                                            None), "cuLaunchKernel")
