"""The pass manager side: pipelines as explicit lists, --dump-after, errors that name the pass and the node,
atomic output directories, byte-identical output, and the click commands. Small hand-built graphs;
numerical checks compare ONNX Runtime before/after exactly (these graphs have nothing to fuse).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from r1c.cli_passes import inspect_cmd, optimize_cmd, passes_cmd
from r1c.errors import PassError
from r1c.passes import PIPELINES, TARGETS, lower_file, optimize, pass_name, pipeline, run_pipeline
from r1c.passes import pipelines as pipelines_module
from r1c.passes._util import node_error
from r1c.passes.pipelines import save_model
from r1c.passes.testing import make_model, r1c_moe_model, run

FEEDS = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}


def small_model() -> ir.Model:
    """x -> Relu -> MatMul(w) -> y, plus a dead branch and a foldable shape computation."""
    return make_model(
        [oh.make_node("Concat", ["m1", "eight"], ["shape"], axis=0),
         oh.make_node("Reshape", ["x", "shape"], ["x2"]), oh.make_node("Relu", ["x2"], ["r"], name="relu"),
         oh.make_node("MatMul", ["r", "w"], ["y"], name="matmul"), oh.make_node("Neg", ["x"], ["dead"])],
        [oh.make_tensor_value_info("x", TP.FLOAT, ["batch", 8])],
        [oh.make_tensor_value_info("y", TP.FLOAT, ["batch", 4])],
        [nh.from_array(np.array([-1], np.int64), "m1"), nh.from_array(np.array([8], np.int64), "eight"),
         nh.from_array(np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32), "w")])


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    return save_model(small_model(), tmp_path / "src" / "model.onnx")


def test_each_target_has_one_explicit_pipeline_named_by_modules() -> None:
    assert set(TARGETS) == {"r1c", "onnxruntime", "tensorrt"}
    for target in TARGETS:
        passes = pipeline(target)
        assert [type(p) for p in passes] == list(PIPELINES[target])
        assert all(isinstance(p, ir.passes.PassBase) for p in passes)
    names = [pass_name(p) for p in pipeline("onnxruntime")]
    assert names.index("fuse_moe_router") < names.index("fuse_moe_experts") < names.index("lower_moe_to_ort")
    assert names.index("lower_moe_to_ort") < names.index("inline_r1c_functions")
    trt = [pass_name(p) for p in pipeline("tensorrt")]
    assert trt.index("drop_r1c_function_bodies") < trt.index("check_tensorrt_ops")
    assert "inline_r1c_functions" not in trt and "fuse_rmsnorm" not in trt
    with pytest.raises(PassError, match="unknown target"):
        pipeline("tpu")


@pytest.mark.parametrize("target", TARGETS)
def test_run_pipeline_keeps_outputs_and_dumps_after_a_pass(tmp_path: Path, target: str) -> None:
    before = run(small_model(), FEEDS)
    model = run_pipeline(small_model(), target, dump_after="remove_dead_code", dump_dir=tmp_path)
    assert {n.op_type for n in model.graph} == {"Reshape", "Relu", "MatMul"}  # Concat folded, Neg removed
    np.testing.assert_array_equal(run(model, FEEDS)[0], before[0])
    dumps = sorted(p.name for p in tmp_path.glob("*.onnx"))
    assert dumps and all(name.endswith("_remove_dead_code.onnx") for name in dumps)
    np.testing.assert_array_equal(run(tmp_path / dumps[0], FEEDS)[0], before[0])


def test_dump_after_an_unknown_pass_is_an_error_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(PassError, match="not a pass of the r1c pipeline"):
        run_pipeline(small_model(), "r1c", dump_after="fuse_everything", dump_dir=tmp_path)


class _FailsOnANode(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise node_error("fails_on_a_node", model.graph.node("relu"), "cannot handle this")


class _Crashes(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise ValueError("internal trouble")


def test_a_failing_pass_raises_pass_error_naming_itself_and_the_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PIPELINES, "r1c", (PIPELINES["r1c"][0], _FailsOnANode))
    with pytest.raises(PassError, match=r"fails_on_a_node: node relu \(Relu\): cannot handle this"):
        run_pipeline(small_model(), "r1c")
    monkeypatch.setitem(pipelines_module.PIPELINES, "r1c", (_Crashes,))
    with pytest.raises(PassError, match=r"pass test_passes_pipeline \(1/1 of r1c\) failed: ValueError: internal"):
        run_pipeline(small_model(), "r1c")


def test_optimize_writes_a_whole_directory_and_identical_bytes(model_file: Path, tmp_path: Path) -> None:
    first = optimize(model_file, tmp_path / "a", target="onnxruntime")
    second = optimize(model_file, tmp_path / "b", target="onnxruntime")
    for name in ("model.onnx", "model.onnx.data", "passes.json"):
        assert (first.parent / name).read_bytes() == (second.parent / name).read_bytes()
    report = json.loads((first.parent / "passes.json").read_text())
    assert [p["name"] for p in report["passes"]] == [pass_name(p) for p in PIPELINES["onnxruntime"]]
    np.testing.assert_array_equal(run(first, FEEDS)[0], run(model_file, FEEDS)[0])
    with pytest.raises(PassError, match="not an empty directory"):
        optimize(model_file, tmp_path / "a")


def test_optimize_leaves_nothing_behind_when_a_pass_fails(model_file: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PIPELINES, "r1c", (_Crashes,))
    with pytest.raises(PassError):
        optimize(model_file, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_lower_file_refuses_to_overwrite_its_input(model_file: Path) -> None:
    with pytest.raises(PassError, match="overwrite"):
        lower_file(model_file, model_file, target="r1c")
    with pytest.raises(PassError, match="not a file"):
        lower_file(model_file.parent / "missing.onnx", model_file.parent / "x.onnx", target="r1c")


def test_cli_commands(model_file: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    listed = runner.invoke(passes_cmd, ["--target", "tensorrt"])
    assert listed.exit_code == 0
    assert [line.split()[1] for line in listed.output.splitlines()[1:]] == [pass_name(p) for p in PIPELINES["tensorrt"]]
    done = runner.invoke(optimize_cmd, [str(model_file), "-o", str(tmp_path / "o"), "--dump-after", "fold_constants"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "o" / "model.onnx").is_file() and list((tmp_path / "o" / "dumps").glob("*_fold_constants.onnx"))
    shown = runner.invoke(inspect_cmd, [str(tmp_path / "o" / "model.onnx"), "--json"])
    assert shown.exit_code == 0
    assert json.loads(shown.output)["op_histogram"] == {"MatMul": 1, "Relu": 1, "Reshape": 1}
    failed = runner.invoke(optimize_cmd, [str(model_file), "-o", str(tmp_path / "o")])
    assert isinstance(failed.exception, PassError)  # the r1c group turns it into one line and exit code 1


@pytest.mark.slow  # two fresh interpreters importing torch: ~10 s
def test_identical_bytes_across_processes_and_hash_seeds(model_file: Path, tmp_path: Path) -> None:
    """Nothing in the output may depend on set order or object ids: two processes, two hash seeds."""
    script = ("import sys; from r1c.passes import optimize; "
              "optimize(sys.argv[1], sys.argv[2], target='onnxruntime')")
    outs = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(model_file), str(out)], check=True, env=env)
        outs.append(out)
    for name in ("model.onnx", "model.onnx.data", "passes.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()


def test_an_r1c_node_without_its_body_is_named_by_the_postcondition() -> None:
    model, _ = r1c_moe_model(np.random.default_rng(0), experts=16, hidden=16, inter=8)
    model.functions.clear()
    with pytest.raises(PassError, match=r"fuse_moe_router: node router \(r1c::MoERouter\): no model-local function"):
        run_pipeline(model, "onnxruntime")


def test_cli_target_names_match_the_pipelines() -> None:
    from r1c import cli_passes

    assert cli_passes.TARGETS == TARGETS
