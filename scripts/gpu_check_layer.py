"""The GPU check's `layer` step: the tiny preset's whole model on the GPU, its r1c ops (and, FP8, its dense
projections as FP8Linear) launched through the plugin kernels exactly as `gpu_check_steps.launch_op` launches them.

float32: the logits against the CPU bundle (`r1c build`, ONNX Runtime) of the same weights, within 1e-4 of max |logit|.

FP8: every op launch is checked on the inputs it got on the GPU, against the float64 model of what its kernels
compute (`r1c.plugins.fp8_matched`: the same 1x128 activation quantization, accumulation aside), within the kernel
tests' budgets: FP8Linear and the experts 2e-3 of the sum of |products| per output (1e-5 in the interpreter), plus
for the experts one e4m3 step for each SwiGLU value within that noise of a rounding midpoint; the router's ids equal
and weights within 1e-4 of the largest. The logits are also compared with the same-quantization CPU model, for
information only: on this tiny random model that comparison is chaotic, not a budget. Hopper's FP8 tensor cores
accumulate with ~14 bits inside a 128-deep block (DeepSeek-V3 report, 3.3.2); a differently rounded partial sum
moves a value across an e4m3 rounding midpoint of the next quantization (one step: 1/16-1/8 of the value) or a
token to another expert, and 3 layers amplify that. Measured on the CPU (issue-12-gpu2 notes): replacing the
float64 GEMMs of the same-quantization model by an error model of that accumulation (`hopper_fp8_dot`, 13 bits)
moves the logits by 7.3e-2 of max |logit| with 86% top-1 agreement — what the H200 showed (7.4e-2, 86%) — and
random perturbations of 2^-14 of the sum of |products| per block move them by 4.7e-2 to 2.7e-1 (the whole FP8
activation quantization moves them by 2.8e-1). The row prints that model's distance next to the GPU's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gpu_check_report import Row, Table, check_deadline
from gpu_check_steps import Ctx, launch_op

LAYER_TOKENS = (2, 7)  # the layer step's batch x sequence
HOPPER_BITS = 13  # accumulation bits of the error model the FP8 logits row prints for comparison


def tiny_checkpoint(fp8: bool) -> tuple[Any, dict[str, torch.Tensor]]:
    from r1c.config import preset
    from r1c.exporter.checkpoint import quantize_checkpoint_fp8, random_checkpoint

    config = preset("tiny")
    tensors = random_checkpoint(config, seed=0)
    return quantize_checkpoint_fp8(config, tensors) if fp8 else (config, tensors)


def fp8_linears(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """module name -> weight name of the FP8 linear layers the TensorRT lowering makes FP8Linear (kv_b is absorbed
    into the attention instead, and stays dequantized)."""
    return {n.removesuffix(".weight"): n for n, t in tensors.items()
            if n.endswith(".weight") and t.dtype == torch.float8_e4m3fn and t.dim() == 2 and "kv_b_proj" not in n}


def experts_problem(config: Any, tokens: int, fp8: bool) -> Any:
    from r1c.plugins.moe_experts.plan import ExpertsProblem

    return ExpertsProblem(tokens, config.num_experts_per_tok, config.n_routed_experts, config.hidden_size,
                          config.moe_intermediate_size, "float32", "float8_e4m3fn" if fp8 else "float32")


def tiny_problems(fp8: bool) -> list[tuple[Any, dict[str, Any], Any]]:
    """The plugin problems of the tiny model at LAYER_TOKENS tokens (what the layer step launches)."""
    from r1c.plugins.fp8_linear.plan import LinearProblem
    from r1c.plugins.fp8_linear.tensorrt import FP8LinearOp
    from r1c.plugins.moe_experts.tensorrt import MoEExpertsOp
    from r1c.plugins.moe_router.plan import RouterProblem
    from r1c.plugins.moe_router.tensorrt import MoERouterOp

    config, tensors = tiny_checkpoint(fp8)
    tokens = LAYER_TOKENS[0] * LAYER_TOKENS[1]
    attrs = router_attrs(config)
    out: list[tuple[Any, dict[str, Any], Any]] = [
        (MoERouterOp(), attrs, RouterProblem(tokens, config.hidden_size, config.n_routed_experts, "float32",
                                             tuple(sorted(attrs.items())))),
        (MoEExpertsOp(), {}, experts_problem(config, tokens, fp8)),
    ]
    shapes = {tuple(tensors[w].shape) for w in fp8_linears(tensors).values()}
    out += [(FP8LinearOp(), {}, LinearProblem(tokens, k, n, "float32")) for n, k in sorted(shapes)]
    return out


def router_attrs(config: Any) -> dict[str, Any]:
    from r1c.exporter.model import Router
    from r1c.plugins.moe_router.reference import SPEC

    with torch.device("meta"):
        return SPEC.attrs(**Router(config).op_attributes())


@dataclasses.dataclass
class Call:
    """One op launch inside the model: its inputs and outputs, copied to the CPU."""

    op: str  # router | experts | linear
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


def _patch(ctx: Ctx, model: Any, tensors: dict[str, torch.Tensor], fp8: bool) -> list[Call]:
    """Route the model's r1c ops (and, FP8, its FP8 linears) through the plugin kernels; returns the list the
    launches are recorded into."""
    from r1c.plugins.fp8_linear.tensorrt import FP8LinearOp
    from r1c.plugins.moe_experts.tensorrt import MoEExpertsOp
    from r1c.plugins.moe_router.tensorrt import MoERouterOp

    calls: list[Call] = []
    dev = ctx.device
    attrs = router_attrs(model.config)

    def run(name: str, op: Any, a: dict[str, Any], inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = launch_op(ctx, name, op, a, inputs).outputs
        calls.append(Call(name, [t.cpu() for t in inputs], [t.cpu() for t in out]))
        return out

    for i, layer in enumerate(model.model.layers):
        if not hasattr(layer.mlp, "experts"):
            continue
        gate, experts = layer.mlp.gate, layer.mlp.experts
        p = f"model.layers.{i}.mlp.experts."
        if fp8:
            ew = [tensors[p + n].to(dev) for n in ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv",
                                                   "down_proj_scale_inv")]
        else:
            ew = [experts.gate_up_proj.data, experts.down_proj.data]

        def route(x: torch.Tensor, gate: Any = gate) -> tuple[torch.Tensor, torch.Tensor]:
            out = run("router", MoERouterOp(), attrs, [x.contiguous(), gate.weight.data,
                                                       gate.e_score_correction_bias.data])
            return out[0], out[1]

        def experts_fn(x: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, ew: Any = ew) -> torch.Tensor:
            a = MoEExpertsOp.spec.attrs(quant="fp8_block128" if fp8 else "none")
            return run("experts", MoEExpertsOp(), a, [x.contiguous(), w.float().contiguous(), ids.int().contiguous(),
                                                      *ew])[0]

        gate.forward = route
        experts.forward = experts_fn
    if fp8:
        modules = dict(model.named_modules())
        for name, weight in fp8_linears(tensors).items():
            wq, sc = tensors[weight].to(dev), tensors[weight + "_scale_inv"].to(dev)

            def linear(x: torch.Tensor, wq: torch.Tensor = wq, sc: torch.Tensor = sc) -> torch.Tensor:
                out = run("linear", FP8LinearOp(), {"block_size": 128}, [x.reshape(-1, x.shape[-1]).contiguous(),
                                                                         wq, sc])[0]
                return out.view(*x.shape[:-1], -1)

            modules[name].forward = linear
    return calls


def step_layer(ctx: Ctx, table: Table, deadline: float) -> None:
    """The float32 model against the CPU bundle, the FP8 model op by op (module docstring)."""
    from r1c.exporter.checkpoint import Checkpoint, model_from_checkpoint
    from r1c.exporter.onnx_export import export_onnx

    if ctx.runner is None:
        table.add(Row("layer", "needs the aot step", status="FAIL"))
        return
    ids = np.random.default_rng(0).integers(0, 100, size=LAYER_TOKENS)
    for fp8 in (True,) if ctx.quick else (False, True):
        name = "fp8" if fp8 else "fp32"
        check_deadline(deadline, f"the {name} model")
        config, tensors = tiny_checkpoint(fp8)
        export = ctx.work / f"tiny-{name}"
        export_onnx(config, tensors, export, progress=False)
        bundle, what = _cpu_logits(export, ctx.work / f"tiny-{name}.bundle", ids)
        model = model_from_checkpoint(Checkpoint(config, tensors, export)).to(ctx.device)
        calls = _patch(ctx, model, tensors, fp8)
        with torch.no_grad():
            gpu = model(torch.from_numpy(ids).to(ctx.device)).float().cpu().numpy()
        counts = {op: sum(c.op == op for c in calls) for op in ("router", "experts", "linear")}
        launches = "+".join(f"{v} {k[:3]}" for k, v in counts.items() if v)
        to_bundle = float(np.abs(gpu - bundle).max() / np.abs(bundle).max())
        if not fp8:
            table.add(Row("layer", f"tiny fp32 {config.num_hidden_layers} layers vs {what}", int(ids.size),
                          check=f"rel {to_bundle:.1e} (<= 1e-04); {launches}"[:44],
                          status="ok" if to_bundle <= 1e-4 and counts["experts"] else "FAIL"))
            continue
        check_deadline(deadline, "the FP8 per-op checks")
        _check_fp8_ops(ctx, table, config, tensors, calls, int(ids.size))
        check_deadline(deadline, "the same-quantization CPU model")
        matched = matched_fp8_logits(config, tensors, ids)
        err = float(np.abs(gpu - matched).max() / np.abs(matched).max())
        top1 = float((gpu.argmax(-1) == matched.argmax(-1)).mean())
        check_deadline(deadline, "the Hopper accumulation model")
        hopper = matched_fp8_logits(config, tensors, ids, hopper_bits=HOPPER_BITS)
        model_err = float(np.abs(hopper - matched).max() / np.abs(matched).max())
        model_top1 = float((hopper.argmax(-1) == matched.argmax(-1)).mean())
        table.add(Row("layer", "  fp8 logits vs same-quant (info)", int(ids.size),
                      check=f"{err:.1e} top1 {100 * top1:.0f}%; model {model_err:.1e} {100 * model_top1:.0f}%"[:44],
                      status="ok" if np.isfinite(gpu).all() and all(counts.values()) else "FAIL"))
        table.add(Row("layer", f"  tiny fp8 vs {what} (info)", int(ids.size),
                      check=f"rel {to_bundle:.1e}: 1x128 FP8 activations (budget)"[:44]))


def _check_fp8_ops(ctx: Ctx, table: Table, config: Any, tensors: dict[str, torch.Tensor], calls: list[Call],
                   tokens: int) -> None:
    """One row per op kind: every launch of the FP8 model against its matched reference on the same inputs."""
    from r1c.plugins.fp8_matched import experts_matched, linear_matched
    from r1c.plugins.moe_experts.plan import quantizes_activations
    from r1c.plugins.moe_router.reference import moe_router_reference

    noise = 2e-3 if ctx.cuda else 1e-5  # of the sum of |products| (fp8_matched's docstring)
    attrs = router_attrs(config)
    worst: dict[str, float] = {"router": 0.0, "experts": 0.0, "linear": 0.0}
    rows_equal = rows_total = 0
    for c in calls:
        if c.op == "router":
            ref_w, ref_ids = moe_router_reference(*c.inputs, **attrs)
            same = (c.outputs[1] == ref_ids).all(dim=1)
            rows_equal, rows_total = rows_equal + int(same.sum()), rows_total + same.numel()
            if same.any():
                w_err = float((c.outputs[0][same] - ref_w[same]).abs().max() / ref_w.abs().max())
                worst["router"] = max(worst["router"], w_err)
        elif c.op == "experts":
            quantize = quantizes_activations(experts_problem(config, c.inputs[0].shape[0], True))
            m = experts_matched(*c.inputs[:5], *c.inputs[5:7], quantize_act=quantize, noise=noise)
            worst["experts"] = max(worst["experts"], float(((c.outputs[0].double() - m.out).abs()
                                                            / m.bound(noise)).max()))
        else:
            lm = linear_matched(*c.inputs)
            worst["linear"] = max(worst["linear"], float(((c.outputs[0].double() - lm.out).abs()
                                                          / (noise * lm.mag + 1e-30)).max()))
    n = {op: sum(c.op == op for c in calls) for op in worst}
    table.add(Row("layer", f"fp8 router x{n['router']} on GPU inputs", tokens,
                  check=f"ids {rows_equal}/{rows_total} rows, w {worst['router']:.0e} (1e-4)",
                  status="ok" if n["router"] and rows_equal == rows_total and worst["router"] <= 1e-4 else "FAIL"))
    table.add(Row("layer", f"fp8 experts x{n['experts']} vs matched f64", tokens,
                  check=f"worst {worst['experts']:.2f} of bound ({noise:.0e} sum|p| + flips)",
                  status="ok" if n["experts"] and worst["experts"] <= 1 else "FAIL"))
    table.add(Row("layer", f"fp8 FP8Linear x{n['linear']} vs matched f64", tokens,
                  check=f"worst {worst['linear']:.2f} of bound ({noise:.0e} sum|p|)",
                  status="ok" if n["linear"] and worst["linear"] <= 1 else "FAIL"))


def matched_fp8_logits(config: Any, tensors: dict[str, torch.Tensor], ids: Any,
                       hopper_bits: int | None = None) -> Any:
    """The FP8 tiny model on the CPU with every FP8 op as `r1c.plugins.fp8_matched` models its kernels (activations
    quantized 1x128 where the kernels quantize them, float64 GEMMs; `hopper_bits`: the FP8 GEMMs through
    `hopper_fp8_dot` instead), the router and everything else in float32."""
    from functools import partial

    from r1c.exporter.checkpoint import Checkpoint, model_from_checkpoint
    from r1c.plugins.fp8_matched import experts_matched, hopper_fp8_dot, linear_matched
    from r1c.plugins.moe_experts.plan import quantizes_activations

    dot = partial(hopper_fp8_dot, bits=hopper_bits) if hopper_bits else None
    model = model_from_checkpoint(Checkpoint(config, tensors, Path(".")))
    modules = dict(model.named_modules())
    for name, weight in fp8_linears(tensors).items():
        wq, sc = tensors[weight], tensors[weight + "_scale_inv"]
        modules[name].forward = lambda x, wq=wq, sc=sc: linear_matched(x, wq, sc, dot).out.float().view(
            *x.shape[:-1], -1)
    for i, layer in enumerate(model.model.layers):
        if not hasattr(layer.mlp, "experts"):
            continue
        p = f"model.layers.{i}.mlp.experts."
        ew = [tensors[p + n] for n in ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv")]

        def experts(x: torch.Tensor, w: torch.Tensor, e_ids: torch.Tensor, ew: Any = ew) -> torch.Tensor:
            quantize = quantizes_activations(experts_problem(config, x.shape[0], True))
            return experts_matched(x, w, e_ids, *ew, quantize_act=quantize, block_dot=dot).out.float()

        layer.mlp.experts.forward = experts
    with torch.no_grad():
        return model(torch.from_numpy(ids)).numpy()


def _check_build_requirements() -> None:
    """ImportError when an installed graph library is older than r1c's pyproject.toml asks (this script runs from
    a checkout on a machine whose packages r1c's install did not choose: an H200 image had onnx-ir 1.0, whose
    `ir.save` lacks the `alignment` the build passes)."""
    import re
    from importlib.metadata import PackageNotFoundError, version

    import tomllib

    deps = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "dependencies"]
    for dep in deps:
        m = re.fullmatch(r"(onnx-ir|onnxscript)>=([0-9.]+)", dep.replace(" ", ""))
        if not m:
            continue
        try:
            have = version(m.group(1))
        except PackageNotFoundError:
            raise ImportError(f"{m.group(1)} is not installed") from None
        as_tuple = [tuple(int(p) for p in re.findall(r"\d+", v)[:3]) for v in (have, m.group(2))]
        if as_tuple[0] < as_tuple[1]:
            raise ImportError(f"{m.group(1)} {have} is older than r1c's {m.group(2)}")


def _cpu_logits(export: Path, bundle: Path, ids: Any) -> tuple[Any, str]:
    """Logits of the CPU bundle (`r1c build`, ONNX Runtime); if this machine's onnx-ir/onnxscript cannot run the
    build, ONNX Runtime on the export itself (the graph the bundle is lowered from), and the row says so."""
    from r1c.errors import R1CError
    from r1c.runtime import load
    from r1c.runtime.build import build_bundle

    try:
        _check_build_requirements()
        build_bundle(export, bundle)
        return load(bundle).forward(ids), "CPU bundle"
    except (R1CError, ImportError) as e:
        print(f"layer: the CPU bundle did not build here ({e}); ONNX Runtime on the export instead", flush=True)
    import onnxruntime as ort

    from r1c.config import ModelConfig

    c = ModelConfig.from_json(export / "config.json")
    sess = ort.InferenceSession(str(export / "model.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": ids.astype(np.int64), "past_lengths": np.zeros(ids.shape[0], np.int64)}
    if any(i.name == "logits_index" for i in sess.get_inputs()):  # every position's logits
        feeds["logits_index"] = np.tile(np.arange(ids.shape[1], dtype=np.int64), (ids.shape[0], 1))
    for layer in range(c.num_hidden_layers):
        feeds[f"past_c.{layer}"] = np.zeros((ids.shape[0], c.kv_lora_rank, 1), np.float32)
        feeds[f"past_pe.{layer}"] = np.zeros((ids.shape[0], c.qk_rope_head_dim, 1), np.float32)
    return sess.run(["logits"], feeds)[0], "ORT on export"
