"""r1c's CPU MoE kernel (`r1c.cpu::MoE`, r1c/plugins/cpu_moe) against an independent float64 NumPy model of the
function it and ONNX Runtime's com.microsoft.MoE compute (top-k of the router probs, softmax weights, interleaved
SwiGLU, down projection), and against ORT's own MoE on the same inputs; then the pass that swaps it in, and bundles
built with `--cpu-moe r1c` against `--cpu-moe ort` and the PyTorch references.

Tolerance: max |ours - ref| <= 1e-5 * max |ref| (float32 dot products of at most 1024 terms against float64).
Shapes cover the vector tails (H, I not multiples of 16 or 8), a token alone (the decode tile), a few and many
tokens per expert (the multi-token tiles), k = 1 and k = E, both routing normalizations, 1 and 2 threads, and a
3-D input, for each level's build this CPU can run (both on an AVX-512 host). The library is compiled once per
session; without a compiler or ONNX Runtime's headers the tests skip saying so, except under CI (CI=true), where
`.ci/run` fetches the headers and a skip would hide a failure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from r1c.passes.fold_moe_output_scale import FoldMoEOutputScalePass
from r1c.passes.lower_moe_to_ort import LowerMoEToOrtPass
from r1c.passes.remove_dead_code import RemoveDeadCodePass
from r1c.passes.split_moe_experts import SplitMoEExpertsPass
from r1c.passes.testing import copy, make_model, max_rel_err, moe_reference, op_counts, r1c_moe_model, run
from r1c.passes.use_cpu_moe_kernel import UseCpuMoEKernelPass
from r1c.plugins.cpu_moe import SPEC, pack_experts
from r1c.plugins.cpu_moe import library as cpu_library

TOL = 1e-5
SENTINEL = -1e30


def reference(x: np.ndarray, probs: np.ndarray, w13: np.ndarray, w2: np.ndarray, k: int, normalize: int
              ) -> np.ndarray:
    """float64: per token the k largest probs (ties: the higher index, as ORT's MoE), softmax over them
    (normalize=1) or over all E (0), h = silu(gate) * up with gate/up rows interleaved, y = sum of weight * w2_e h."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).astype(np.float64)
    p = probs.astype(np.float64)
    y = np.zeros_like(x2)
    for t in range(x2.shape[0]):
        ids = sorted(range(p.shape[1]), key=lambda e: (-p[t, e], -e))[:k]
        top = p[t, ids[0]]
        den = np.exp(p[t, ids] - top).sum() if normalize else np.exp(p[t] - top).sum()
        for e in ids:
            a = w13[e].astype(np.float64) @ x2[t]
            gate, up = a[0::2], a[1::2]
            h = gate / (1 + np.exp(-gate)) * up
            y[t] += np.exp(p[t, e] - top) / den * (w2[e].astype(np.float64) @ h)
    return y.reshape(shape)


def one_node(domain: str, w13: np.ndarray, w2: np.ndarray, k: int, normalize: int, rank: int = 2) -> onnx.ModelProto:
    info = onnx.helper.make_tensor_value_info
    e, hidden = w13.shape[0], w13.shape[2]  # [E, 2I, H] or packed [E, P1, H, 32]
    if domain == SPEC.domain:
        node = onnx.helper.make_node(SPEC.name, ["x", "probs", "w13", "w2"], ["y"], domain=SPEC.domain, k=k,
                                     normalize_routing_weights=normalize)
        if w13.ndim == 3:  # given in ORT's form: packed as the pass packs them
            w13, w2 = pack_experts(w13, w2)
    else:
        node = onnx.helper.make_node("MoE", ["x", "probs", "w13", "", "w2"], ["y"], domain=domain, k=k,
                                     activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=normalize,
                                     activation_alpha=1.0, activation_beta=0.0)
    x_shape = ["B", "S", hidden] if rank == 3 else ["T", hidden]
    return make_model([node], [info("x", 1, x_shape), info("probs", 1, ["T", e])], [info("y", 1, None)],
                      [onnx.numpy_helper.from_array(w13, "w13"), onnx.numpy_helper.from_array(w2, "w2")],
                      extra_opsets={domain: 1})


def routed(rng: np.random.Generator, tokens: int, experts: int, k: int, normalize: int) -> np.ndarray:
    """Router probs as the lowering feeds them: k finite log-weights, a sentinel elsewhere (normalize=1), or every
    score finite (normalize=0: ORT's softmax over all E)."""
    if not normalize:
        return rng.standard_normal((tokens, experts)).astype(np.float32)
    probs = np.full((tokens, experts), SENTINEL, np.float32)
    for t in range(tokens):
        probs[t, rng.choice(experts, k, replace=False)] = np.log(rng.uniform(0.05, 1.0, k))
    return probs


@pytest.mark.parametrize("experts,hidden,inter,k", [(8, 40, 24, 2), (16, 128, 64, 4), (4, 72, 20, 4),
                                                    (32, 256, 96, 8), (6, 24, 12, 1), (5, 33, 7, 2)])
@pytest.mark.parametrize("normalize", [1, 0])
def test_kernel_matches_float64_reference_and_ort(any_level: Path, experts: int, hidden: int, inter: int, k: int,
                                                   normalize: int) -> None:
    rng = np.random.default_rng(experts * 100 + hidden + normalize)
    w13 = (rng.standard_normal((experts, 2 * inter, hidden)) / hidden**0.5).astype(np.float32)
    w2 = (rng.standard_normal((experts, hidden, inter)) / inter**0.5).astype(np.float32)
    ours, ort_moe = one_node(SPEC.domain, w13, w2, k, normalize), one_node("com.microsoft", w13, w2, k, normalize)
    for tokens in (1, 3, 17, 40):
        x = rng.standard_normal((tokens, hidden)).astype(np.float32)
        probs = routed(rng, tokens, experts, k, normalize)
        want = reference(x, probs, w13, w2, k, normalize)
        theirs = run(ort_moe, {"x": x, "probs": probs})[0]
        assert max_rel_err(theirs, want) < TOL  # the reference is ORT's function too
        for threads in (1, 2):
            got = run(ours, {"x": x, "probs": probs}, threads=threads, custom_ops=[any_level])[0]
            assert got.shape == x.shape and got.dtype == np.float32
            assert max_rel_err(got, want) < TOL, (tokens, threads)


def test_kernel_takes_a_3d_input_and_ties(any_level: Path) -> None:
    """[B, S, H] input (T = B*S); equal probs pick the higher expert index first (ORT's MoE does, measured)."""
    rng = np.random.default_rng(5)
    e, hidden, inter, k = 8, 32, 16, 3
    w13 = (rng.standard_normal((e, 2 * inter, hidden)) / hidden**0.5).astype(np.float32)
    w2 = (rng.standard_normal((e, hidden, inter)) / inter**0.5).astype(np.float32)
    x = rng.standard_normal((2, 5, hidden)).astype(np.float32)
    probs = np.zeros((10, e), np.float32)  # every score tied: experts 7, 6, 5
    probs[3, 6] = 1.0
    got = run(one_node(SPEC.domain, w13, w2, k, 1, rank=3), {"x": x, "probs": probs}, custom_ops=[any_level])[0]
    assert got.shape == x.shape
    assert max_rel_err(got, reference(x, probs, w13, w2, k, 1)) < TOL
    theirs = run(one_node("com.microsoft", w13, w2, k, 1, rank=3), {"x": x, "probs": probs})[0]
    assert max_rel_err(got, theirs) < TOL


def test_kernel_refuses_shapes_that_disagree(kernel: Path) -> None:
    rng = np.random.default_rng(1)
    w13, _ = pack_experts(*(rng.standard_normal(s).astype(np.float32) for s in ((4, 16, 8), (4, 8, 8))))
    _, w2 = pack_experts(*(rng.standard_normal(s).astype(np.float32) for s in ((4, 80, 8), (4, 8, 40))))
    # fc1 packs I = 8 (one panel: 16 intermediates), fc2 packs I = 40 (48)
    with pytest.raises(Exception, match="shapes disagree"):
        run(one_node(SPEC.domain, w13, w2, 2, 1), {"x": np.zeros((3, 8), np.float32),
                                                   "probs": np.zeros((3, 4), np.float32)}, custom_ops=[kernel])


def test_kernel_takes_no_tokens_and_reports_a_missing_attribute(kernel: Path) -> None:
    """T = 0 gives an empty output; a node without `k` is an ONNX Runtime error naming the op (the kernel's
    constructor must not throw through ORT's C interface: before, this aborted or escaped as a C++ exception)."""
    rng = np.random.default_rng(7)
    w13 = rng.standard_normal((4, 16, 8)).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 8)).astype(np.float32)
    model = one_node(SPEC.domain, w13, w2, 2, 1)
    got = run(model, {"x": np.zeros((0, 8), np.float32), "probs": np.zeros((0, 4), np.float32)},
              custom_ops=[kernel])[0]
    assert got.shape == (0, 8)
    del next(iter(model.graph)).attributes["k"]
    with pytest.raises(Exception, match=r"r1c\.cpu::MoE: .*k"):
        run(model, {"x": np.zeros((2, 8), np.float32), "probs": np.zeros((2, 4), np.float32)}, custom_ops=[kernel])


def lowered(seed: int, **router: object) -> tuple[object, dict[str, object]]:
    model, w = r1c_moe_model(np.random.default_rng(seed), experts=16, hidden=48, inter=24, **router)
    assert LowerMoEToOrtPass()(model).modified
    RemoveDeadCodePass()(model)
    FoldMoEOutputScalePass()(model)
    return model, w


V2_SOFTMAX = {"scoring": "softmax", "topk_method": "group_limited_greedy", "norm_topk_prob": 0}


@pytest.mark.parametrize("router", [{}, {"norm_topk_prob": 0}, V2_SOFTMAX])
def test_pass_swaps_ort_moe_for_the_kernel(kernel: Path, router: dict[str, object]) -> None:
    model, w = lowered(3, **router)
    before = copy(model)  # type: ignore[arg-type]
    assert not SplitMoEExpertsPass(threads=2, cpu_moe="r1c")(model).modified  # type: ignore[arg-type]
    assert not UseCpuMoEKernelPass(cpu_moe="ort")(model).modified  # type: ignore[arg-type]
    assert UseCpuMoEKernelPass(cpu_moe="r1c")(model).modified  # type: ignore[arg-type]
    counts = op_counts(model)  # type: ignore[arg-type]
    assert counts.get("r1c.cpu::MoE") == 1 and "com.microsoft::MoE" not in counts
    h = np.random.default_rng(4).standard_normal((9, 48)).astype(np.float32)
    got = run(model, {"h": h}, threads=2, custom_ops=[kernel])[0]  # type: ignore[arg-type]
    assert max_rel_err(got, run(before, {"h": h})[0]) < TOL
    assert max_rel_err(got, moe_reference(h, w)) < TOL


def test_pass_leaves_what_the_kernel_does_not_compute() -> None:
    rng = np.random.default_rng(2)
    w13 = rng.standard_normal((4, 16, 8)).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 8)).astype(np.float32)
    proto = one_node("com.microsoft", w13, w2, 2, 1)
    for name, value in (("activation_alpha", 1.702), ("activation_beta", 1.0), ("swiglu_fusion", 2)):
        model = copy(proto)  # type: ignore[arg-type]
        node = next(iter(model.graph))
        node.attributes[name] = ir.AttrFloat32(name, value) if isinstance(value, float) else ir.AttrInt64(name, value)
        assert not UseCpuMoEKernelPass(cpu_moe="r1c")(model).modified, name


def test_pass_leaves_weights_it_cannot_repack_alone(kernel: Path) -> None:
    """fc1 / fc2 are repacked in place of the originals, so the pass swaps only a node that is their sole reader:
    weights shared by two MoE nodes, a graph input (no initializer), and an initializer that is also a graph input
    (a default the caller may override: repacking it left `w13` an unread, required input) stay with ORT, and the
    models still run (against the float64 reference)."""
    info = onnx.helper.make_tensor_value_info
    rng = np.random.default_rng(6)
    w13 = rng.standard_normal((4, 16, 8)).astype(np.float32)
    w2 = rng.standard_normal((4, 8, 8)).astype(np.float32)
    weights = [onnx.numpy_helper.from_array(w13, "w13"), onnx.numpy_helper.from_array(w2, "w2")]
    inputs = [info("x", 1, ["T", 8]), info("probs", 1, ["T", 4])]
    attrs = {"k": 2, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": 1,
             "activation_alpha": 1.0, "activation_beta": 0.0}
    moe = onnx.helper.make_node("MoE", ["x", "probs", "w13", "", "w2"], ["y"], domain="com.microsoft", **attrs)
    first = onnx.helper.make_node("MoE", ["x", "probs", "w13", "", "w2"], ["y1"], domain="com.microsoft", **attrs)
    second = onnx.helper.make_node("MoE", ["y1", "probs", "w13", "", "w2"], ["y"], domain="com.microsoft", **attrs)
    opsets = {"com.microsoft": 1}
    x = rng.standard_normal((5, 8)).astype(np.float32)
    probs = routed(rng, 5, 4, 2, 1)
    once = reference(x, probs, w13, w2, 2, 1)
    cases = {
        "shared": (make_model([first, second], inputs, [info("y", 1, None)], weights, extra_opsets=opsets),
                   {}, reference(once, probs, w13, w2, 2, 1)),
        "graph input": (make_model([moe], [*inputs, info("w13", 1, [4, 16, 8])], [info("y", 1, None)], weights[1:],
                                   extra_opsets=opsets), {"w13": w13}, once),
        "overridable": (make_model([moe], [*inputs, info("w13", 1, [4, 16, 8])], [info("y", 1, None)], weights,
                                   extra_opsets=opsets), {"w13": w13}, once),
    }
    for name, (proto, extra, want) in cases.items():
        model = copy(proto)  # type: ignore[arg-type]
        assert not UseCpuMoEKernelPass(cpu_moe="r1c")(model).modified, name  # type: ignore[arg-type]
        assert op_counts(model).get("com.microsoft::MoE") in (1, 2), name  # type: ignore[arg-type]
        got = run(model, {"x": x, "probs": probs, **extra}, custom_ops=[kernel])[0]  # type: ignore[arg-type]
        assert max_rel_err(got, want) < TOL, name


def test_host_level_choice() -> None:
    files = {"x86-64-v4": "v4.so", "x86-64-v3": "v3.so"}
    v3 = cpu_library.LEVELS["x86-64-v3"][1]
    assert cpu_library.for_host(files, v3 | cpu_library.LEVELS["x86-64-v4"][1]) == "v4.so"
    assert cpu_library.for_host(files, v3) == "v3.so"
    from r1c.errors import BundleError

    with pytest.raises(BundleError, match="rebuild it with `r1c build --cpu-moe ort`"):
        cpu_library.for_host(files, frozenset({"sse2"}))


def test_bundles_r1c_kernel_equals_ort_moe(kernel: Path, tmp_path: Path) -> None:
    """The tiny preset built both ways: same logits (1e-5) and greedy tokens; the manifest names the kernels; the
    r1c build runs its routed experts on MoE and its dense float32 MatMuls on Linear, the ORT build neither."""
    from r1c.config import preset
    from r1c.exporter.checkpoint import random_checkpoint
    from r1c.exporter.onnx_export import export_onnx
    from r1c.manifest import read_manifest
    from r1c.runtime import load
    from r1c.runtime.build import build_bundle

    config = preset("tiny")
    export = tmp_path / "tiny"
    export_onnx(config, random_checkpoint(config, seed=2), export, progress=False)
    a = build_bundle(export, tmp_path / "r1c.bundle", cpu_moe="r1c")
    b = build_bundle(export, tmp_path / "ort.bundle", cpu_moe="ort")
    opts = read_manifest(a).target_options
    assert opts["cpu_moe"] == "r1c" and set(opts["cpu_kernels"]) == set(cpu_library.LEVELS)
    assert read_manifest(b).target_options["cpu_moe"] == "ort" and "cpu_kernels" not in read_manifest(b).target_options
    ours, theirs = op_counts(ir.load(a / "model.onnx")), op_counts(ir.load(b / "model.onnx"))
    assert ours[f"{SPEC.domain}::MoE"] == config.num_moe_layers
    # the attention projections, in each layer's MLABlock (passes/fuse_cpu_mla_block.py) or as Linear nodes
    assert ours[f"{SPEC.domain}::Linear"] + 4 * ours.get(f"{SPEC.domain}::MLABlock", 0) >= 4 * config.num_hidden_layers
    assert not any(op.startswith(f"{SPEC.domain}::") for op in theirs)
    ea, eb = load(a), load(b)
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 7))
    assert max_rel_err(ea.forward(ids), eb.forward(ids)) < TOL
    prompts = [[1, 2, 3], [4, 5]]
    assert ea.generate(prompts, 6) == eb.generate(prompts, 6)
    # int8: experts on ORT's QMoE, dense weights on MatMulNBits, the attention on r1c's int8 kernel (so the bundle
    # ships the library)
    q = build_bundle(export, tmp_path / "int8.bundle", cpu_moe="r1c", precision="int8")
    counts = op_counts(ir.load(q / "model.onnx"))
    assert counts["com.microsoft::QMoE"] == config.num_moe_layers and f"{SPEC.domain}::MoE" not in counts
    assert counts[f"{SPEC.domain}::MLAAttentionInt8"] == config.num_hidden_layers
    assert read_manifest(q).target_options["cpu_moe"] == "r1c" and (q / "kernels").exists()


def test_build_without_headers_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No ONNX Runtime headers: `--cpu-moe r1c` fails in one line naming the remedy and writes nothing; `auto`
    builds with ORT's MoE and records that."""
    from clitools import cli, error_line

    from r1c.config import preset
    from r1c.exporter.checkpoint import random_checkpoint
    from r1c.exporter.onnx_export import export_onnx
    from r1c.manifest import read_manifest

    config = preset("tiny")
    export_onnx(config, random_checkpoint(config, seed=1), tmp_path / "e", progress=False)
    monkeypatch.setenv("R1C_ORT_INCLUDE", str(tmp_path / "no-headers"))
    monkeypatch.setenv("R1C_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(cpu_library, "SYSTEM_HEADERS", tmp_path / "no-system-headers")
    code, out, err = cli("build", tmp_path / "e", "-o", tmp_path / "b", "--cpu-moe", "r1c")
    line = error_line(code, err)
    assert code == 1 and not out and "scripts/fetch_ort_headers.sh" in line and "--cpu-moe r1c" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    code, _, err = cli("build", tmp_path / "e", "-o", tmp_path / "b")
    assert code == 0, err
    assert "not r1c's CPU kernel" in err and "fetch_ort_headers" in err
    opts = read_manifest(tmp_path / "b").target_options
    assert opts["cpu_moe"] == "ort" and "cpu_kernels" not in opts


@pytest.mark.parametrize("env,message", [
    ({"R1C_CACHE": "/proc/r1c-cache"}, "kernel cache /proc/r1c-cache is not writable"),
    ({"CXX": "false"}, "compiling r1c's CPU kernels (x86-64-v4) failed: no output"),
])
def test_build_where_the_kernel_does_not_compile(kernel: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 env: dict[str, str], message: str) -> None:
    """Headers found but the library cannot be made (an unwritable cache, a failing compiler): `--cpu-moe r1c`
    fails in one line naming why and writes nothing; `auto` builds with ORT's MoE and says why."""
    from clitools import cli, error_line

    from r1c.config import preset
    from r1c.exporter.checkpoint import random_checkpoint
    from r1c.exporter.onnx_export import export_onnx
    from r1c.manifest import read_manifest

    include = cpu_library.find_headers()
    assert include is not None  # the kernel fixture found them
    config = preset("tiny")
    export_onnx(config, random_checkpoint(config, seed=1), tmp_path / "e", progress=False)
    monkeypatch.setenv("R1C_ORT_INCLUDE", str(include))
    monkeypatch.setenv("R1C_CACHE", str(tmp_path / "cache"))  # nothing cached: the compiler runs
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = cli("build", tmp_path / "e", "-o", tmp_path / "b", "--cpu-moe", "r1c")
    line = error_line(code, err)
    assert code == 1 and not out and message in line and "--cpu-moe r1c" in line, line
    assert not (tmp_path / "b").exists()
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # no partial library in the cache
    code, _, err = cli("build", tmp_path / "e", "-o", tmp_path / "b")
    assert code == 0, err
    assert "not r1c's CPU kernel" in err and message in err
    opts = read_manifest(tmp_path / "b").target_options
    assert opts["cpu_moe"] == "ort" and "cpu_kernels" not in opts


def test_a_compile_is_announced_and_a_cached_library_is_not(kernel: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """`compile_libraries(notice)` (r1c build's progress) says when it runs the compiler (the first build on a
    machine takes about a minute) and says nothing when the cache has the libraries."""
    said: list[str] = []
    cpu_library.compile_libraries(said.append)  # the kernel fixture compiled them: cached
    assert said == []
    include = cpu_library.find_headers()
    assert include is not None  # the kernel fixture found them
    monkeypatch.setenv("R1C_ORT_INCLUDE", str(include))  # (they are found in the cache, which changes here)
    monkeypatch.setenv("R1C_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "false")  # the compiler runs (and fails at once)
    with pytest.raises(cpu_library.KernelLibraryError):
        cpu_library.compile_libraries(said.append)
    assert len(said) == 1 and said[0].startswith("compiling r1c's CPU kernels for x86-64-v4 into "), said


def test_kernel_ranks_a_nan_score_last(kernel: Path) -> None:
    """A NaN router score is never chosen (it ranks below every number: no undefined sort); the token's output is
    then the reference's with that score at -inf (normalize=1), and NaN where the softmax over all E takes it in."""
    rng = np.random.default_rng(9)
    e, hidden, inter, k = 8, 32, 16, 2
    w13 = (rng.standard_normal((e, 2 * inter, hidden)) / hidden**0.5).astype(np.float32)
    w2 = (rng.standard_normal((e, hidden, inter)) / inter**0.5).astype(np.float32)
    x = rng.standard_normal((3, hidden)).astype(np.float32)
    probs = rng.standard_normal((3, e)).astype(np.float32)
    probs[1, [0, 5]] = np.nan
    probs[2, :] = np.nan
    probs[2, [3, 6]] = [0.5, 0.25]
    got = run(one_node(SPEC.domain, w13, w2, k, 1), {"x": x, "probs": probs}, custom_ops=[kernel])[0]
    want = reference(x, np.where(np.isnan(probs), -np.inf, probs), w13, w2, k, 1)
    assert np.isfinite(got).all() and max_rel_err(got, want) < TOL
    got0 = run(one_node(SPEC.domain, w13, w2, k, 0), {"x": x, "probs": probs}, custom_ops=[kernel])[0]
    assert np.isfinite(got0[0]).all() and np.isnan(got0[1:]).all()


def test_kernel_swiglu_over_the_whole_float_range(any_level: Path) -> None:
    """The kernel's vector exp (Taylor series on a reduced argument, clamped to float's range): gate values
    beyond +-100, where silu is ~0 or ~identity and exp(-g) would overflow, against the float64 reference."""
    rng = np.random.default_rng(11)
    e, hidden, inter, k = 4, 64, 48, 2
    w13 = (rng.standard_normal((e, 2 * inter, hidden)) * 6).astype(np.float32)  # dots of ~ +-50 ... 200
    w2 = (rng.standard_normal((e, hidden, inter)) / inter**0.5).astype(np.float32)
    x = rng.standard_normal((9, hidden)).astype(np.float32)
    probs = routed(rng, 9, e, k, 1)
    gates = np.einsum("eih,th->tei", w13[:, 0::2].astype(np.float64), x)
    assert gates.min() < -100 and gates.max() > 100
    got = run(one_node(SPEC.domain, w13, w2, k, 1), {"x": x, "probs": probs}, custom_ops=[any_level])[0]
    assert max_rel_err(got, reference(x, probs, w13, w2, k, 1)) < TOL


def test_pack_experts_refuses_weights_that_disagree() -> None:
    with pytest.raises(ValueError, match="disagree"):
        pack_experts(np.zeros((2, 8, 4), np.float32), np.zeros((2, 4, 5), np.float32))


def test_kernel_source_compiles_without_warnings(tmp_path: Path) -> None:
    """The shipped flags leave out -Werror (a user's newer compiler must not stop a build); here they get it."""
    import subprocess

    include = cpu_library.find_headers()
    if include is None or cpu_library.why_unavailable():
        pytest.skip(f"r1c's CPU kernels cannot be built here: {cpu_library.why_unavailable()}")
    for level, (march, _) in cpu_library.LEVELS.items():
        cmd = ["g++", *cpu_library.FLAGS, "-Werror", f"-march={march}", "-I", str(include),
               *map(str, cpu_library.SOURCES), "-o", str(tmp_path / f"{level}.so")]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
