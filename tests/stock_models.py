"""The stock `torch.onnx` export of transformers' DeepseekV3 on the tiny preset (seed 1), shared by the test
modules that need one (conftest.py's session fixture `stock_tiny` makes it once: ~10 s of CPU).

It is exported at opset 18, torch's native opset (torch reaches other opsets with onnxscript's version
converter afterwards); `at_opset` gives the same model at 19-21 the way torch would, through that converter.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir
import torch

from r1c.config import preset
from r1c.exporter.checkpoint import random_checkpoint
from r1c.exporter.stock import export_stock, hf_config

CONFIG = preset("tiny")
NATIVE_OPSET = 18


def hf_model() -> torch.nn.Module:
    import transformers

    model = transformers.DeepseekV3ForCausalLM(hf_config(CONFIG)).eval()
    model.load_state_dict(random_checkpoint(CONFIG, seed=1), strict=False)  # rotary inv_freq stays computed
    return model


def export_tiny_stock(root: Path) -> dict[str, object]:
    model = hf_model()
    path = export_stock(model, root / str(NATIVE_OPSET) / "model.onnx", opset=NATIVE_OPSET)
    return {"root": root, "model": model, "path": path}


def at_opset(path: Path, opset: int, out: Path) -> Path:
    """The model at `path` converted up to `opset` with onnxscript's version converter (as torch.onnx does)."""
    from onnxscript.version_converter import convert_version

    model = ir.load(path)
    convert_version(model, opset)
    out.parent.mkdir(parents=True, exist_ok=True)
    ir.save(model, out, external_data=out.name + ".data")
    return out
