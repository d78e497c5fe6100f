"""r1c's CPU MLA attention kernel (`r1c.cpu::MLAAttention`, r1c/plugins/cpu_moe/attention_cpu.cc) against a float64
NumPy model of ATTENTION_SPEC's formula, and the pass that swaps it in for the export's attention subgraph
(passes/use_cpu_attention_kernel.py) against ONNX Runtime running that subgraph, end to end on the tiny preset;
`r1c.cpu::MLAAttentionInt8` (int8 W_UK / W_UV with column scales) against the same float64 model of the dequantized
weights, and in int8/int4 bundles against ONNX Runtime running the bundle with each DynamicQuantizeMatMul replaced
by a MatMul of its dequantized weight (the function the kernel computes: float activations, int8 weights).

Tolerance: max |ours - ref| <= 1e-5 * max |ref| (float32 against float64). Shapes cover cache lengths of 0, 1, 512
(8 chunks of 64 columns) and 600 (10 of 64), a chunk whose columns are all masked, new tokens 1, 3 and 20 (several
token blocks of the prefill path), odd head counts and dimensions not multiples of a vector; 1 and 2 threads; every
instruction-set level this CPU runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from mla_reference import feeds, reference

from r1c.passes.testing import make_model, max_rel_err, op_counts, run
from r1c.plugins import OpSpec, int_block
from r1c.plugins.cpu_moe import ATTENTION_INT8_SPEC, ATTENTION_SPEC, MLA_BLOCK_SPEC

TOL = 1e-5
info = onnx.helper.make_tensor_value_info
BOOL, FLOAT, INT8 = onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT, onnx.TensorProto.INT8


def attention_model(scale: float, spec: OpSpec = ATTENTION_SPEC) -> ir.Model:
    names = list(spec.inputs)
    node = onnx.helper.make_node(spec.name, names, ["y"], domain=spec.domain, scale=scale)
    inputs = [info(n, BOOL if n.endswith("valid") else INT8 if n.endswith("_q") else FLOAT, None) for n in names]
    return make_model([node], inputs, [info("y", FLOAT, None)], [], extra_opsets={spec.domain: 1})


def int8_feeds(x: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`feeds` with W_UK and W_UV quantized per head and output column (quantize_weights' form): (the int8 kernel's
    feeds, the float feeds holding the dequantized weights)."""
    out, deq = dict(x), dict(x)
    for name in ("w_uk", "w_uv_t"):
        q, scale = int_block.quantize_columns(out.pop(name))
        out[f"{name}_q"], out[f"{name}_scale"] = q, scale
        deq[name] = q.astype(np.float32) * scale
    return out, deq


@pytest.mark.parametrize("b,s,n,d,r,c,vd,p,lengths", [
    (1, 1, 16, 64, 32, 256, 64, 64, [40]),  # the benchmark model's decode
    (2, 1, 3, 8, 4, 40, 12, 600, [600, 5]),  # 10 chunks; row 1's later ones all masked, its first partly
    (1, 3, 5, 16, 8, 24, 8, 512, [512]),  # 8 full chunks, a few new tokens
    (2, 20, 16, 8, 4, 16, 8, 1, [1, 0]),  # several token blocks (8 tokens x 16 heads each), a 1-column cache
    (1, 7, 2, 4, 2, 9, 3, 0, [0]),  # no cache at all (a first prefill)
])
def test_attention_matches_float64(any_level: Path, b: int, s: int, n: int, d: int, r: int, c: int, vd: int, p: int,
                                   lengths: list[int]) -> None:
    rng = np.random.default_rng(b * 1000 + s * 100 + p)
    x = feeds(rng, b, s, n, d, r, c, vd, p, lengths)
    want = reference(x, 0.125)
    for threads in (1, 2):
        got = run(attention_model(0.125), x, threads=threads, custom_ops=[any_level])[0]
        assert got.shape == want.shape and got.dtype == np.float32
        assert max_rel_err(got, want) < TOL, threads


@pytest.mark.parametrize("b,s,n,d,r,c,vd,p,lengths", [
    (1, 1, 16, 64, 32, 256, 64, 64, [40]),  # the benchmark model's decode
    (2, 1, 3, 8, 4, 40, 12, 600, [600, 5]),  # 10 chunks, rows of different lengths
    (2, 20, 16, 8, 4, 16, 8, 1, [1, 0]),  # a prefill: several token blocks
])
def test_attention_int8_matches_float64(any_level: Path, b: int, s: int, n: int, d: int, r: int, c: int, vd: int,
                                        p: int, lengths: list[int]) -> None:
    """MLAAttentionInt8 computes ATTENTION_SPEC's function of the dequantized weights (float32 against float64)."""
    rng = np.random.default_rng(b * 1000 + s * 100 + p + 7)
    x, deq = int8_feeds(feeds(rng, b, s, n, d, r, c, vd, p, lengths))
    want = reference(deq, 0.125)
    for threads in (1, 2):
        got = run(attention_model(0.125, ATTENTION_INT8_SPEC), x, threads=threads, custom_ops=[any_level])[0]
        assert got.shape == want.shape and got.dtype == np.float32
        assert max_rel_err(got, want) < TOL, threads


def test_attention_int8_refuses_a_scale_of_the_wrong_size(kernel: Path) -> None:
    x, _ = int8_feeds(feeds(np.random.default_rng(0), 1, 2, 4, 8, 4, 16, 8, 10, [10]))
    x["w_uv_t_scale"] = x["w_uv_t_scale"][:, :, :4]  # Vd 8 columns, 4 scales
    with pytest.raises(Exception, match=r"w_uv_t_scale N\*Vd"):
        run(attention_model(1.0, ATTENTION_INT8_SPEC), x, custom_ops=[kernel])


def test_attention_refuses_shapes_that_disagree(kernel: Path) -> None:
    x = feeds(np.random.default_rng(0), 1, 2, 4, 8, 4, 16, 8, 10, [10])
    x["w_uk"] = x["w_uk"][:, :, :8]  # C of 8 against the latents' 16
    with pytest.raises(Exception, match=r"r1c\.cpu::MLAAttention: shapes disagree"):
        run(attention_model(1.0), x, custom_ops=[kernel])
    x = feeds(np.random.default_rng(0), 1, 2, 4, 8, 4, 16, 8, 10, [10])
    x["past_valid"] = np.ones((1, 3, 10), bool)  # 3 rows: neither 1 nor S*N = 8
    with pytest.raises(Exception, match=r"past_valid does not broadcast to \[B, S\*N, 10\]"):
        run(attention_model(1.0), x, custom_ops=[kernel])


@pytest.mark.parametrize("fp8", [False, True], ids=["float32-export", "fp8-export"])
def test_pass_swaps_every_layers_attention_and_keeps_the_logits(kernel: Path, tmp_path: Path, fp8: bool) -> None:
    """The tiny preset (a float32 export, and an FP8 one, whose W_UK is computed from the dequantized kv_b_proj) built
    with r1c's kernels: one MLAAttention per layer (within its MLABlock: passes/fuse_cpu_mla_block.py) and none
    of the subgraph's Softmax nodes left; logits equal to the same export built with ORT's kernels (1e-5), greedy
    tokens equal."""
    from r1c.config import preset
    from r1c.exporter.checkpoint import quantize_checkpoint_fp8, random_checkpoint
    from r1c.exporter.onnx_export import export_onnx
    from r1c.runtime import load
    from r1c.runtime.build import build_bundle

    config = preset("tiny")
    export = tmp_path / "tiny"
    tensors = random_checkpoint(config, seed=4)
    if fp8:
        config, tensors = quantize_checkpoint_fp8(config, tensors)
    export_onnx(config, tensors, export, progress=False)
    ours = build_bundle(export, tmp_path / "r1c.bundle", cpu_moe="r1c", precision="fp32")
    theirs = build_bundle(export, tmp_path / "ort.bundle", cpu_moe="ort", precision="fp32")
    counts = op_counts(ir.load(ours / "model.onnx"))
    attention = f"{ATTENTION_SPEC.domain}::{ATTENTION_SPEC.name}"  # each inside its layer's MLABlock by now
    assert counts.get(attention, 0) + counts.get(f"{MLA_BLOCK_SPEC.domain}::{MLA_BLOCK_SPEC.name}", 0) == \
        config.num_hidden_layers
    assert counts.get("Softmax", 0) == 0
    assert f"{ATTENTION_SPEC.domain}::{ATTENTION_SPEC.name}" not in op_counts(ir.load(theirs / "model.onnx"))
    ea, eb = load(ours), load(theirs)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 9))
    assert max_rel_err(ea.forward(ids), eb.forward(ids)) < TOL
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    assert ea.generate(prompts, 8) == eb.generate(prompts, 8)


def test_pass_leaves_other_forms_to_onnx_runtime(tmp_path: Path) -> None:
    """The attention subgraph of an ORT-kernel build of the tiny preset: swapped as it is; left alone when W_UV's
    output is transposed another way (the same shapes, other columns), or when a value inside is also a graph
    output."""
    from r1c.config import preset
    from r1c.exporter.checkpoint import random_checkpoint
    from r1c.exporter.onnx_export import export_onnx
    from r1c.passes.use_cpu_attention_kernel import UseCpuAttentionKernelPass
    from r1c.runtime.build import build_bundle

    config = preset("tiny")
    export_onnx(config, random_checkpoint(config, seed=5), tmp_path / "e", progress=False)
    bundle = build_bundle(tmp_path / "e", tmp_path / "ort.bundle", cpu_moe="ort", precision="fp32")
    layers = config.num_hidden_layers

    def swapped(edit: Callable[[ir.Model], None]) -> int:
        model = ir.load(bundle / "model.onnx")
        edit(model)
        report: dict[str, int] = {}
        UseCpuAttentionKernelPass("r1c", report)(model)
        return report["nodes"]

    def w_uv_transposes(model: ir.Model) -> list[ir.Node]:
        out = []
        for node in model.graph:
            mm = node.inputs[0].producer() if node.op_type == "Transpose" and node.inputs[0] is not None else None
            if mm is not None and mm.op_type == "MatMul" and "w_uv" in str(mm.inputs[1].name if mm.inputs[1] else ""):
                out.append(node)
        return out

    def permute(model: ir.Model) -> None:
        for node in w_uv_transposes(model):
            node.attributes["perm"] = ir.AttrInt64s("perm", [0, 2, 3, 1])

    def expose(model: ir.Model) -> None:  # the first layer's masked past scores become a graph output
        where = next(n for n in model.graph if n.op_type == "Where")
        model.graph.outputs.append(where.outputs[0])

    assert swapped(lambda m: None) == layers
    assert len(w_uv_transposes(ir.load(bundle / "model.onnx"))) == layers
    assert swapped(permute) == 0
    assert swapped(expose) == layers - 1


def _with_dequantized_products(bundle: Path, out: Path) -> Path:
    """A copy of `bundle` whose DynamicQuantizeMatMul nodes are MatMuls by their dequantized weights (q * scale):
    the function MLAAttentionInt8 computes, run by ONNX Runtime's float kernels (load it with verify_hashes=False)."""
    import shutil

    shutil.copytree(bundle, out)
    model = ir.load(bundle / "model.onnx")
    for node in list(model.graph):
        if node.op_type != "DynamicQuantizeMatMul":
            continue
        w, scale = (v.const_value.numpy() for v in node.inputs[1:3])  # type: ignore[union-attr]
        const = ir.Value(name=f"{node.inputs[1].name}.dequantized",  # type: ignore[union-attr]
                         const_value=ir.tensor(w.astype(np.float32) * scale))
        model.graph.register_initializer(const)
        matmul = ir.node("MatMul", [node.inputs[0], const], name=f"{node.name}.dequantized")
        model.graph.insert_before(node, matmul)
        node.outputs[0].replace_all_uses_with(matmul.outputs[0], replace_graph_outputs=True)
        model.graph.remove(node, safe=True)
    for name in ("model.onnx", "model.onnx.data"):
        (out / name).unlink()
    ir.save(model, out / "model.onnx", external_data="model.onnx.data")
    return out


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_pass_swaps_int8_attention_in_quantized_bundles(kernel: Path, tmp_path: Path, precision: str) -> None:
    """An int8 / int4 build of the tiny preset with r1c's kernels: one MLAAttentionInt8 per layer and no
    DynamicQuantizeMatMul left; logits equal (1e-5) to ONNX Runtime running the ORT-kernel build of the same
    precision with its W_UK / W_UV products dequantized, greedy tokens equal."""
    from r1c.config import preset
    from r1c.exporter.checkpoint import random_checkpoint
    from r1c.exporter.onnx_export import export_onnx
    from r1c.runtime import load
    from r1c.runtime.build import build_bundle

    config = preset("tiny")
    export_onnx(config, random_checkpoint(config, seed=4), tmp_path / "e", progress=False)
    ours = build_bundle(tmp_path / "e", tmp_path / "r1c.bundle", cpu_moe="r1c", precision=precision)
    theirs = build_bundle(tmp_path / "e", tmp_path / "ort.bundle", cpu_moe="ort", precision=precision)
    counts = op_counts(ir.load(ours / "model.onnx"))
    assert counts[f"{ATTENTION_INT8_SPEC.domain}::{ATTENTION_INT8_SPEC.name}"] == config.num_hidden_layers
    assert counts.get("com.microsoft::DynamicQuantizeMatMul", 0) == 0
    dqmm = op_counts(ir.load(theirs / "model.onnx"))["com.microsoft::DynamicQuantizeMatMul"]
    assert dqmm == 2 * config.num_hidden_layers
    ref = load(_with_dequantized_products(theirs, tmp_path / "deq.bundle"), verify_hashes=False)
    ea = load(ours)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, size=(2, 9))
    assert max_rel_err(ea.forward(ids), ref.forward(ids)) < TOL
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    assert ea.generate(prompts, 8) == ref.generate(prompts, 8)


def test_build_summary_names_the_kernels_the_bundle_runs(kernel: Path, tmp_path: Path) -> None:
    """`r1c build` names the r1c.cpu ops in the built graph: an int8 bundle runs only the attention kernel (its
    experts on ONNX Runtime's QMoE), not "r1c CPU MoE kernel"; a float32 one runs the MLA block (the attention
    inside it), Linear and MoE."""
    from click.testing import CliRunner

    from r1c.cli import main

    cli = CliRunner()
    r = cli.invoke(main, ["export", "--preset", "tiny", "-o", str(tmp_path / "e"), "--no-progress"])
    assert r.exit_code == 0, r.output
    r = cli.invoke(main, ["build", str(tmp_path / "e"), "-o", str(tmp_path / "q"), "--precision", "int8",
                          "--cpu-kernels", "r1c"])
    assert r.exit_code == 0, r.output
    assert "(onnxruntime, r1c CPU kernels: MLAAttentionInt8 x3)" in r.output and "MoE" not in r.output
    r = cli.invoke(main, ["build", str(tmp_path / "e"), "-o", str(tmp_path / "f"), "--cpu-kernels", "r1c"])
    assert r.exit_code == 0, r.output
    assert "MLABlock x3" in r.output and "MoE x2" in r.output and "Linear x" in r.output
