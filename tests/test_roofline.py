"""The decode roofline reads its byte counts from the bundle: each weight at the size it is stored, as its kernel
reads it (routed experts only when touched, FP8 folded to float32 at load, int8/int4 blocks as stored, scales at
their stored size), cache filled vs bound. Checked against the parameter counts of the config (float32, where
the two must agree) and against the formats a build chose (int8, FP8 at fp32, an unlowered dense body).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from r1c.cli import main
from r1c.config import preset
from r1c.manifest import read_manifest
from r1c.runtime.bench.roofline import (
    FP32_BYTES,
    ReadProbe,
    bundle_reads,
    config_reads,
    decode_floor,
    expected_distinct_experts,
    measure_read_bandwidth,
    tensor_reads,
    weight_bytes,
)


def cli(*args: str) -> None:
    r = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("roofline")
    cli("export", "--preset", "tiny", "-o", str(root / "e32"), "--no-progress")
    cli("export", "--preset", "tiny", "--precision", "fp8", "-o", str(root / "e8"), "--no-progress")
    cli("build", str(root / "e32"), "-o", str(root / "fp32"))
    cli("build", str(root / "e32"), "-o", str(root / "int8"), "--precision", "int8")
    cli("build", str(root / "e8"), "-o", str(root / "fp8_as_fp32"), "--precision", "fp32")
    return {p.name: p for p in root.iterdir()}


def test_expected_distinct_experts() -> None:
    assert expected_distinct_experts(64, 8, 1) == pytest.approx(8)
    assert expected_distinct_experts(64, 8, 8) == pytest.approx(64 * (1 - (56 / 64) ** 8))  # ~42.0
    assert expected_distinct_experts(64, 8, 10_000) == pytest.approx(64)
    assert expected_distinct_experts(64, 8, 0) == 0


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_config_estimate_matches_the_parameter_counts(name: str) -> None:
    c = preset(name)
    active, executed = weight_bytes(config_reads(c, fp8=False), c, 1)
    embed_rows = c.hidden_size  # one token's embedding row is read, not the table
    assert active == executed == pytest.approx(FP32_BYTES * (c.num_active_parameters() + embed_rows))
    a8, _ = weight_bytes(config_reads(c, fp8=False), c, 8)
    assert active < a8  # more rows, more experts touched
    q_active, _ = weight_bytes(config_reads(c, fp8=True), c, 1)
    assert q_active < active / 2


def test_bundle_reads_follow_its_formats(bundles: dict[str, Path]) -> None:
    c = preset("tiny")
    want = FP32_BYTES * (c.num_active_parameters() + c.hidden_size)
    fp32 = bundle_reads(bundles["fp32"], read_manifest(bundles["fp32"]))
    assert fp32[1] == "bundle"
    active, executed = weight_bytes(fp32[0], c, 1)
    # + rope tables and small constants; r1c's Linear and MoE kernels read their weights packed in panels of 32
    # rows, zero-padded (the tiny preset's odd sizes: ~3%), and the roofline counts what is read
    assert active == executed and want <= active <= want * 1.05

    int8, _ = bundle_reads(bundles["int8"], read_manifest(bundles["int8"]))
    i_active, i_executed = weight_bytes(int8, c, 1)
    assert i_active == i_executed < 0.6 * executed  # embeddings-sized float32 parts stay in the tiny preset
    assert any(r.name.endswith(".q8") and r.role == "experts" and r.routed for r in int8)

    fp8, _ = bundle_reads(bundles["fp8_as_fp32"], read_manifest(bundles["fp8_as_fp32"]))
    f_active, f_executed = weight_bytes(fp8, c, 1)
    # ORT folds the FP8 weights to float32 at load: read as the float32 model (dense ones unpadded: a MatMul by a
    # DequantizeLinear's output is not a constant at build, so it stays on ORT's MatMul)
    assert f_executed == pytest.approx(want, rel=0.01)
    assert f_active < 0.7 * f_executed  # what the step needs: the stored FP8 bytes
    dq_scales = [r for r in fp8 if r.name.endswith("_scale")]
    assert dq_scales and all(r.read == 0 for r in dq_scales)  # folded into the weights, never read per step


def test_a_dense_expert_body_reads_every_expert(bundles: dict[str, Path]) -> None:
    c = preset("tiny")
    reads = tensor_reads(bundles["e32"] / "model.onnx")  # the export: r1c::MoEExperts with its dense body
    experts = [r for r in reads if r.role == "experts"]
    assert experts and not any(r.routed for r in experts)
    active, executed = weight_bytes(reads, c, 1)
    all_experts = sum(r.read for r in experts)
    assert executed - active == pytest.approx(all_experts * (1 - c.num_experts_per_tok / c.n_routed_experts))


def test_decode_floor_counts_cache_and_bandwidth() -> None:
    c = preset("small")
    f = decode_floor(config_reads(c, fp8=False), c, 8, 128, 16, bandwidth=10e9)
    per_token_row = c.num_hidden_layers * c.latent_dim * 4
    assert f.cache_active == per_token_row * 8 * (128 + 8)
    assert f.cache_executed == per_token_row * 8 * (128 + 16)
    assert decode_floor(config_reads(c, fp8=False), c, 8, 128, 16, bandwidth=10e9, capacity=256,
                        cache_dtype_bytes=2).cache_executed == per_token_row / 2 * 8 * 256
    assert f.floor_executed_s == pytest.approx(f.bytes_executed / 10e9)
    d = f.to_dict(tpot_s=2 * f.floor_executed_s)
    assert d["achieved_over_executed_floor"] == pytest.approx(2.0)


def test_measure_read_bandwidth() -> None:
    bw = measure_read_bandwidth(64 << 20, repeats=2)
    assert 1e8 < bw < 1e13
    assert torch.get_num_threads() >= 1


def test_read_probe_times_one_read_per_step_in_the_runner() -> None:
    """The probe is a peer of the runner: one on_step per token, each after a read of the step's bytes (a window
    of a buffer larger than the step, cycled), zeros as tokens; its TPOT gives a bandwidth in the range a
    machine has, and it leaves torch's thread count as it found it."""
    from r1c.errors import BenchError
    from r1c.runtime.bench.runner import Settings, System, Workload, run_bench

    asked: list[int] = []

    def step_bytes(batch: int) -> int:
        asked.append(batch)
        return batch * (8 << 20)

    threads = torch.get_num_threads()
    probe = ReadProbe(step_bytes, threads=1, min_buffer=64 << 20, settle_s=0.0)
    steps: list[int] = []
    out = probe.generate([[5, 6], [7, 8]], 5, on_step=lambda i, tok: steps.append(i))
    assert steps == [0, 1, 2, 3, 4] and out == [[0] * 5, [0] * 5] and asked == [2]
    assert probe.info["kernel"] in ("sum", "dot", "gemv") and torch.get_num_threads() == threads
    series = run_bench([System("probe", probe, required=True)], [Workload(2, 4, 6)], 100,
                       Settings(warmup=1, repeat=3))
    tpot = series[0].summary()["tpot_s"].p50
    assert 1e8 < 2 * (8 << 20) / tpot < 1e13
    for bad in (0, float("nan"), float("inf")):
        with pytest.raises(BenchError, match="positive byte count"):
            ReadProbe(lambda b, v=bad: v, threads=1).generate([[1]], 2)
