#!/usr/bin/env python
"""Is a half-precision bundle's error bf16/fp16 noise or an r1c fault? Compares r1c and transformers' DeepseekV3,
each in the same half dtype, against transformers in float32/float64 on the same bf16 weights.

Two modes (ONNX Runtime CPU bundles; checkpoints with seeded random bf16 weights, made and exported once under
--workdir, default /tmp/r1c-half-study):
  ratio   For each weight seed and id seed: the test metric of tests/test_dtypes.py, error(x) = median over
          tokens of max_vocab |x - ref| / max |ref| (ref: transformers float32), for r1c and transformers in
          bfloat16 and float16, and their ratio r1c / transformers.
  layers  One run, layer by layer: the relative Frobenius error against transformers float64 of the inputs of
          every RMSNorm (layer input, q_a out, kv latent, post-attention residual, final norm), read from the
          bundle through extra graph outputs and from transformers through hooks; the tokens whose expert set
          differs from float64's per MoE layer ("flips"); and the same errors on the tokens neither half run
          flipped.
`--fault rmsnorm_half|router_half` (ratio mode) exports with a fault put into the lowering, to show that the
ratio sees it: RMSNorm statistics computed in the half dtype, or the router's weights rounded to it.
Configs: tiny, small (presets), experts64 (tiny widths, small's routing: top-8 of 64 experts in 8 groups, 4 kept,
1 dense + 3 MoE layers; the config of tests/test_dtypes.py).
Usage: python scripts/half_precision_study.py ratio --config tiny --weight-seeds 1,2,3 --id-seeds 8 [--batch 16 --seq 8]
       python scripts/half_precision_study.py layers --config small --dtype bfloat16 [--batch 4 --seq 64]
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import ml_dtypes
import numpy as np
import onnx
import torch
from onnx import helper

from r1c.config import ModelConfig, preset
from r1c.exporter.checkpoint import random_checkpoint, save_checkpoint
from r1c.runtime import load
from r1c.runtime.ort_backend import OrtBackend

CONFIGS: dict[str, ModelConfig] = {
    "tiny": preset("tiny"), "small": preset("small"),
    "experts64": preset("tiny").replace(n_routed_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4,
                                        num_hidden_layers=4),
}
DTYPES = ("float32", "bfloat16", "float16")


def prepare(work: Path, name: str, seed: int, fault: str | None = None) -> Path:
    """Checkpoint + one bundle per dtype under work/<name>-w<seed>[-<fault>] (made once)."""
    root = work / (f"{name}-w{seed}" + (f"-{fault}" if fault else ""))
    if not (root / "float16.bundle").is_dir():
        save_checkpoint(root / "ckpt", CONFIGS[name], random_checkpoint(CONFIGS[name], seed=seed,
                                                                        dtype=torch.bfloat16))
        for d in DTYPES:
            for cmd in (["export", str(root / "ckpt"), "--dtype", d, "--no-progress", "-o", str(root / d)],
                        ["build", str(root / d), "-o", str(root / f"{d}.bundle")]):
                if fault:  # in this process, where the fault is patched in
                    from r1c.cli import main

                    main.main(cmd, standalone_mode=False)
                else:
                    subprocess.run([sys.executable, "-m", "r1c.cli", *cmd], check=True, capture_output=True)
    return root


def inject(fault: str) -> None:
    """Patch a precision fault into the exporter's lowering (this process only)."""
    from onnx import TensorProto

    from r1c.exporter import onnx_export

    lowering: Any = onnx_export._Lowering
    if fault == "rmsnorm_half":
        def rms_norm(self: Any, x: str, weight_name: str) -> str:  # statistics in the export dtype
            g = self.g
            w = self.param(weight_name, weight_name)
            mean = g.op("ReduceMean", [g.op("Mul", [x, x]), g.const([-1])], keepdims=1)
            var = g.op("Add", [mean, g.const([self.c.rms_norm_eps], self.dt, scalar=True)])
            return g.op("Mul", [g.op("Mul", [x, g.op("Reciprocal", [g.op("Sqrt", [var])])]), w])
        lowering.rms_norm = rms_norm
    elif fault == "router_half":
        param = lowering.param
        half = {TensorProto.BFLOAT16: torch.bfloat16, TensorProto.FLOAT16: torch.float16}

        def rounded(self: Any, out: str, src: str, dims: Any = None, transform: Any = None, dtype: Any = None) -> str:
            if src.endswith("mlp.gate.weight") and self.dt in half:
                return param(self, out, src, dims, lambda t: t.to(half[self.dt]).to(torch.float32), dtype)
            return param(self, out, src, dims, transform, dtype)
        lowering.param = rounded


def hf_model(root: Path, dtype: torch.dtype, eager: bool = False) -> Any:
    """transformers' model; `eager`: its per-expert loop (its default grouped_mm has no float64 kernel)."""
    import transformers

    cls: Any = transformers.DeepseekV3ForCausalLM
    if eager:
        return cls.from_pretrained(str(root / "ckpt"), dtype=dtype, experts_implementation="eager").eval()
    return cls.from_pretrained(str(root / "ckpt"), dtype=dtype).eval()


def metric(x: np.ndarray, ref: np.ndarray) -> float:
    return float(np.median(np.abs(x - ref).max(-1) / np.abs(ref).max()))


def ratio(args: SimpleNamespace) -> None:
    if args.fault:
        inject(args.fault)
    for w in args.weight_seeds:
        root = prepare(args.workdir, args.config, w, args.fault)
        hf = {d: hf_model(root, getattr(torch, d)) for d in DTYPES}
        engines = {d: load(root / f"{d}.bundle") for d in DTYPES}
        for s in range(args.id_seeds):
            ids = np.random.default_rng(s).integers(0, CONFIGS[args.config].vocab_size, size=(args.batch, args.seq))
            with torch.no_grad():
                want = {d: m(torch.from_numpy(ids)).logits.float().numpy() for d, m in hf.items()}
            ref = want["float32"]
            label = args.config + (f" {args.fault}" if args.fault else "")
            line = f"{label} weights {w} ids {s}: r1c float32 {metric(engines['float32'].forward(ids), ref):.1e}"
            for d in ("bfloat16", "float16"):
                ours, theirs = metric(engines[d].forward(ids), ref), metric(want[d], ref)
                line += f" | {d} r1c {ours:.2e} transformers {theirs:.2e} ratio {ours / theirs:.2f}"
            print(line, flush=True)


def r1c_taps(bundle: Path, ids: np.ndarray, config: ModelConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """RMSNorm inputs (in graph order) and each MoE layer's chosen experts (sorted) from the bundle."""
    model = onnx.load(str(bundle / "model.onnx"), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    taps, topk = [], []
    for n in model.graph.node:
        if n.op_type == "SimplifiedLayerNormalization":  # ORT's fused RMSNorm (float32 bundles)
            taps.append(n.input[0])
        elif n.op_type == "Mul" and n.input[0] == n.input[1] and any(
                c.op_type == "ReduceMean" for c in consumers.get(n.output[0], [])):  # x*x of an RMSNorm
            x = n.input[0]
            taps.append(producer[x].input[0] if x in producer and producer[x].op_type == "Cast" else x)
        elif n.op_type == "TopK" and n.name.startswith("TopK_2"):  # the router body's final top-k
            topk.append(n.output[1])
    types = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    for t in taps + topk:
        model.graph.output.append(helper.make_tensor_value_info(t, types[t], None))
    path = bundle / "study.onnx"
    onnx.save(model, str(path))
    backend = OrtBackend(path, {})
    b = ids.shape[0]
    feeds: dict[str, np.ndarray] = {"input_ids": ids, "past_lengths": np.zeros(b, np.int64)}
    if any(i.name == "logits_index" for i in backend.session.get_inputs()):  # every position
        feeds["logits_index"] = np.tile(np.arange(ids.shape[1], dtype=np.int64), (b, 1))
    cache = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
    for i in backend.session.get_inputs():
        if i.name.startswith(("past_c.", "past_pe.")):
            dim = config.kv_lora_rank if i.name.startswith("past_c.") else config.qk_rope_head_dim
            feeds[i.name] = np.zeros((b, dim, 1), cache.get(i.type, ml_dtypes.bfloat16))  # one masked slot
    out = backend.run(feeds)
    path.unlink()
    t = ids.size
    return ([np.asarray(out[n], np.float64).reshape(t, -1) for n in taps],
            [np.sort(out[n].reshape(t, -1), -1) for n in topk])


def hf_taps(root: Path, dtype: torch.dtype, ids: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    model = hf_model(root, dtype, eager=True)
    t = ids.size
    taps: list[np.ndarray] = []
    chosen: list[np.ndarray] = []

    def keep(_: Any, a: tuple[torch.Tensor, ...]) -> None:
        taps.append(a[0].detach().double().reshape(t, -1).numpy())

    for layer in model.model.layers:
        for m in (layer.input_layernorm, layer.self_attn.q_a_layernorm, layer.self_attn.kv_a_layernorm,
                  layer.post_attention_layernorm):
            m.register_forward_pre_hook(keep)
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda _m, _a, o: chosen.append(np.sort(o[2].numpy(), -1)))
    model.model.norm.register_forward_pre_hook(keep)
    with torch.no_grad():
        model(torch.from_numpy(ids))
    return taps, chosen


def layers(args: SimpleNamespace) -> None:
    root = prepare(args.workdir, args.config, args.weight_seeds[0])
    config = CONFIGS[args.config]
    ids = np.random.default_rng(args.id_seeds).integers(0, config.vocab_size, size=(args.batch, args.seq))
    ref, ref_ids = hf_taps(root, torch.float64, ids)
    runs = {"transformers": hf_taps(root, getattr(torch, args.dtype), ids),
            "r1c": r1c_taps(root / f"{args.dtype}.bundle", ids, config)}
    f32, _ = r1c_taps(root / "float32.bundle", ids, config)
    flipped = {k: [np.any(a != r, -1) for a, r in zip(c, ref_ids, strict=True)] for k, (_, c) in runs.items()}
    clean = ~np.any(flipped["transformers"] + flipped["r1c"], 0)
    print(f"{args.config} {args.dtype}, {ids.size} tokens (batch {args.batch} x seq {args.seq}, ids seed "
          f"{args.id_seeds}); relative Frobenius error vs transformers float64")
    for k, f in flipped.items():
        print(f"  {k}: tokens whose experts differ from float64's, per MoE layer: {[int(x.sum()) for x in f]}")
    kinds = ["input", "q_a out", "kv latent", "post-attn residual"]
    print(f"  {'tap':28s} {'transformers':>12s} {'r1c':>10s} {'r1c fp32':>9s} | on the {int(clean.sum())} "
          "tokens neither flipped: transformers, r1c, ratio")
    rel = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))
    for i, r in enumerate(ref):
        name = f"layer {i // 4} {kinds[i % 4]}" if i < len(ref) - 1 else "final norm input"
        h, o = runs["transformers"][0][i], runs["r1c"][0][i]
        hc, oc = rel(h[clean], r[clean]), rel(o[clean], r[clean])
        print(f"  {name:28s} {rel(h, r):12.3e} {rel(o, r):10.3e} {rel(f32[i], r):9.1e} | {hc:.3e} {oc:.3e} "
              f"{oc / hc if hc else float('nan'):.2f}")


def _seeds(_ctx: click.Context, _param: click.Parameter, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"comma-separated integers, got {text!r}") from None


@click.command(help=(__doc__ or "").split("\n\n")[0] + "\n\nMODE is ratio or layers (what each measures: the top of "
               "scripts/half_precision_study.py).")
@click.argument("mode", type=click.Choice(["ratio", "layers"]))
@click.option("--config", type=click.Choice(list(CONFIGS)), default="tiny", show_default=True)
@click.option("--dtype", type=click.Choice(["bfloat16", "float16"]), default="bfloat16", show_default=True,
              help="layers mode")
@click.option("--weight-seeds", default="1", show_default=True, callback=_seeds,
              help="comma-separated weight seeds (layers: the first)")
@click.option("--id-seeds", type=int, default=8, show_default=True,
              help="ratio: how many id seeds; layers: the id seed")
@click.option("--batch", type=int, default=16, show_default=True, help="sequences of random ids")
@click.option("--seq", type=int, default=8, show_default=True, help="tokens per sequence")
@click.option("--fault", type=click.Choice(["rmsnorm_half", "router_half"]), default=None,
              help="ratio: a fault in the lowering")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/r1c-half-study"),
              show_default=True, help="the checkpoints and their bundles, made once")
def main(**options: Any) -> None:
    args = SimpleNamespace(**options)
    ratio(args) if args.mode == "ratio" else layers(args)


if __name__ == "__main__":
    main()
