"""`r1c inspect`: the summary of a small hand-built model (r1c plugin op with a body, an ORT contrib op, FP8
weights, symbolic dims), as a dict, as JSON from the command, and as text."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from r1c.cli_passes import inspect_cmd
from r1c.errors import PassError
from r1c.passes import inspect_model
from r1c.passes.inspect_model import format_report
from r1c.passes.pipelines import save_model
from r1c.passes.testing import make_model, r1c_moe_model


@pytest.fixture()
def model_path(tmp_path: Path) -> Path:
    model, _ = r1c_moe_model(np.random.default_rng(0), experts=16, hidden=128, inter=128, quant="fp8_block128")
    gelu = ir.node("QuickGelu", [model.graph.node("experts").outputs[0]], {"alpha": 1.0}, domain="com.microsoft")
    gelu.outputs[0].name, gelu.outputs[0].dtype = "y", ir.DataType.FLOAT
    gelu.outputs[0].shape = ir.Shape(["tokens", 128])
    model.graph.append(gelu)
    model.graph.outputs[0] = gelu.outputs[0]
    model.opset_imports["com.microsoft"] = 1
    return save_model(model, tmp_path / "m" / "model.onnx")


def test_inspect_model_summarises_ops_parameters_custom_ops_and_io(model_path: Path) -> None:
    info = inspect_model(model_path)
    assert info["op_histogram"] == {"com.microsoft::QuickGelu": 1, "r1c::MoEExperts": 1, "r1c::MoERouter": 1}
    assert info["nodes"] == 3
    fp8 = info["parameters"]["by_dtype"]["FLOAT8E4M3FN"]
    experts = 16 * (2 * 128) * 128 + 16 * 128 * 128  # w13 [E, 2I, H] + w2 [E, H, I]
    assert fp8 == {"tensors": 2, "parameters": experts, "bytes": experts}  # one byte each
    assert info["parameters"]["by_dtype"]["FLOAT"]["parameters"] == 16 * 128 + 16 + 16 * 2 + 16  # router + scales
    custom = {c["op"]: c for c in info["custom_ops"]}
    assert custom["r1c::MoERouter"]["function_body"] and custom["r1c::MoERouter"]["plugin"]
    assert custom["r1c::MoERouter"]["plugin_namespace"] == "r1c"
    assert custom["com.microsoft::QuickGelu"]["implemented_by"] == "runtime kernel"
    assert info["inputs"] == [{"name": "h", "dtype": "FLOAT", "shape": ["tokens", 128]}]
    assert info["outputs"][0]["shape"] == ["tokens", 128]
    assert info["opsets"] == {"": 21, "com.microsoft": 1, "r1c": 1}
    assert info["file_bytes"] > fp8["bytes"]  # model file + its external data
    text = format_report(info)
    assert "r1c::MoEExperts" in text and "FLOAT8E4M3FN" in text and "h: FLOAT ['tokens', 128]" in text


def test_inspect_command_json_and_errors(model_path: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(inspect_cmd, [str(model_path), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.output) == json.loads(json.dumps(inspect_model(model_path)))
    assert "custom ops:" in runner.invoke(inspect_cmd, [str(model_path)]).output
    with pytest.raises(PassError, match="is not a file"):
        inspect_model(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(PassError, match="cannot read"):
        inspect_model(tmp_path / "junk.onnx")


def test_inspect_never_reads_external_weights(tmp_path: Path) -> None:
    w = nh.from_array(np.zeros((64, 64), ml_dtypes.float8_e4m3fn), "w")
    model = make_model([oh.make_node("Cast", ["w"], ["wf"], to=TP.FLOAT), oh.make_node("MatMul", ["x", "wf"], ["y"])],
                       [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 64])],
                       [oh.make_tensor_value_info("y", TP.FLOAT, ["n", 64])], [w])
    path = save_model(model, tmp_path / "model.onnx")
    (tmp_path / "model.onnx.data").write_bytes(b"")  # truncated weights: inspect must not care
    assert inspect_model(path)["parameters"]["by_dtype"]["FLOAT8E4M3FN"]["bytes"] == 64 * 64
