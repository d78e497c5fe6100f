"""Reading an ONNX model file for a pass pipeline or `r1c inspect`: anything that is not a usable model is one
`PassError` line (an empty file, bytes that are not ONNX, a model without a graph, external weights whose data
file is missing or too short), never a crash in a later pass.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from r1c.errors import PassError


def read_model(path: str | Path, stage: str, *, weights: bool = True) -> ir.Model:
    """The model at `path` (external weights stay on disk, read when a pass needs them). `weights=False`: the
    external data files are not looked at (`r1c inspect` reads the graph only)."""
    path = Path(path)
    if not path.is_file():
        raise PassError(f"{stage}: {path} is not a file")
    if path.stat().st_size == 0:
        raise PassError(f"{stage}: {path} is empty (0 bytes), not an ONNX model")
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf's DecodeError, onnx_ir's own errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PassError(f"{stage}: cannot read {path} as ONNX ({reason})") from None
    if model.ir_version <= 0 or not model.opset_imports or not model.graph.outputs:
        raise PassError(f"{stage}: {path} is not an ONNX model (no IR version, opset import or graph output)")
    for value in model.graph.initializers.values() if weights else ():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            data = Path(tensor.base_dir) / tensor.location
            end = (tensor.offset or 0) + (tensor.length or 0)
            if not data.is_file() or data.stat().st_size < end:
                state = "is missing" if not data.is_file() else f"is {data.stat().st_size} bytes, shorter than {end}"
                raise PassError(f"{stage}: weight {value.name} of {path.name} lives in {data.name}, which {state}")
    return model
