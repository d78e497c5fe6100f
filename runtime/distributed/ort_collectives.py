"""The collectives as ONNX Runtime Python custom ops (onnxruntime-extensions), for the in-graph mechanism.

`shard_lower_collectives_to_ort` renames the bundle's collective nodes to `ai.onnx.contrib::R1cAllReduce` /
`R1cAllGather`; importing this module defines those ops (float32 in and out; their attributes as in the SPECs),
and `session_options` registers onnxruntime-extensions' library with a session. The ops call
`collectives.all_reduce` / `all_gather`, i.e. the rank's torch.distributed group.

Cost: onnxruntime-extensions passes a Python op's output back through a Python list, a per-call cost that grows
with the tensor (measured: ~0.3 ms for [1, 512] float32, ~25 ms for [16, 8192]); see `rank` for the comparison.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from r1c.errors import BundleError
from r1c.passes.shard_lower_collectives_to_ort import ORT_OPS
from r1c.plugins.all_gather import SPEC as ALL_GATHER
from r1c.plugins.all_reduce import SPEC as ALL_REDUCE
from r1c.runtime.distributed.collectives import all_gather, all_reduce

_DEFINED = False


def define_ops() -> None:
    """Define the two Python ops once per process (onnxruntime-extensions keeps them in a global table)."""
    global _DEFINED
    if _DEFINED:
        return
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as e:
        raise BundleError(f"bundle: the in-graph collectives need onnxruntime-extensions ({e}); "
                          "pip install onnxruntime-extensions, or run with collectives='split'") from None
    f32, text, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_string, PyCustomOpDef.dt_int64

    @onnx_op(op_type=ORT_OPS[ALL_REDUCE.name], inputs=[f32], outputs=[f32], attrs={"group": text, "reduction": text})
    def r1c_all_reduce(x: np.ndarray, group: str, reduction: str) -> np.ndarray:
        return all_reduce(x, group, reduction)

    @onnx_op(op_type=ORT_OPS[ALL_GATHER.name], inputs=[f32], outputs=[f32], attrs={"group": text, "axis": i64,
                                                                                          "group_size": i64})
    def r1c_all_gather(x: np.ndarray, group: str, axis: int, group_size: int) -> np.ndarray:
        return all_gather(x, group, int(axis), int(group_size))

    _DEFINED = True


def register(session_options: Any) -> Any:
    """Register onnxruntime-extensions' custom-op library (and the r1c ops) with `session_options`."""
    define_ops()
    from onnxruntime_extensions import get_library_path

    session_options.register_custom_ops_library(get_library_path())
    return session_options
