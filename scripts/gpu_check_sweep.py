"""The GPU check's `sweep` step: other tile configs of the experts, the FP8 linear and the router's gate GEMM, timed
next to the default each op picks (`select_config`), so that the next round of tuning starts from measurements;
and the time of each launch of the default 4096-token experts plan (where the prefill time goes).

Per op and token count the first row is the config the plan picks ("(default)"), then the alternatives. Every
config is compiled by the aot step; its outputs must equal the default's within accumulation-order noise
(experts and linear: relative Frobenius 1e-2 — different tiles sum the same FP8 products in another order, which
can move an e4m3 rounding; router: ids equal in >= 99% of rows, as the correct step). Why these alternatives:
  * experts: GEMM2 on 4 warps won by 4% in the H200's second run (now the default); more stages; the run-2 default.
  * FP8 linear, decode: the activation quantization fused into the GEMM (default: 2 launches) against its own launch
    (run 2's 3 launches), and twice the split-K programs (more loads in flight). Prefill: 64 x 128 tiles on one
    warpgroup (default: 2 programs per SM hide each other's per-128-K promotion; the shape vLLM's H200 tuning of
    its block-FP8 Triton GEMM picks at K = 7168) against run 2's 128 x 128 on two warpgroups (1 program per SM),
    fewer stages, and 128 x 64.
  * router gate GEMM (TF32-split tensor cores): prefill tiles 64 x 64 (default) / 128 x 64 / 64 x 128 / deeper K
    steps; decode with and without the split over H.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gpu_check_report import Row, Table, check_deadline
from gpu_check_steps import Ctx, graph_ms, launch_op, rel


def experts_configs() -> list[tuple[str, Any]]:
    """Alternative tile configs of the experts' sorted path at the largest token count (note, config)."""
    from r1c.plugins.moe_experts.plan import ExpertsConfig

    return [
        ("run-2 default", ExpertsConfig("sorted", 64, 8, 3, 8, 4)),
        ("", ExpertsConfig("sorted", 64, 8, 4, 4, 4)),
        ("", ExpertsConfig("sorted", 64, 8, 3, 4, 3)),
        ("swapAB", ExpertsConfig("sorted", 32, 4, 3, 4, 4)),
    ]


def linear_configs(decode: bool) -> list[tuple[str, Any]]:
    """Alternative FP8 linear configs at 1 token (`decode`) or at the largest token count (note, config)."""
    from r1c.plugins.fp8_linear.plan import TARGET_PROGRAMS
    from r1c.plugins.fp8_linear.plan import LinearConfig as C

    if decode:
        return [("run-3 default", C(16, 64, True, 4, 4, split_to=TARGET_PROGRAMS, fuse_quant=True)),
                ("", C(16, 64, True, 4, 4, split_to=2 * TARGET_PROGRAMS))]
    return [("run-2 tiles", C(128, 128, False, 8, 3, group_m=8)), ("", C(64, 128, False, 4, 3, group_m=8)),
            ("", C(128, 64, False, 4, 4, group_m=8))]


def router_configs(decode: bool) -> list[tuple[str, Any]]:
    """Alternative gate GEMM configs at 1 token (`decode`) or at the largest token count (note, config)."""
    from r1c.plugins.moe_router.plan import GateConfig as G

    if decode:
        return [("", G(16, 32, 64, 4, 4, False))]
    return [("run-3 default", G(64, 64, 32, 4, 4, False)), ("", G(64, 128, 32, 4, 3, False)),
            ("", G(64, 64, 64, 4, 3, False))]


def describe(c: Any) -> str:
    """A config in a few characters (experts, FP8 linear or gate GEMM config)."""
    if hasattr(c, "gemm1_warps"):
        return f"experts m{c.block_m} w{c.gemm1_warps}/{c.gemm2_warps} s{c.gemm1_stages}/{c.gemm2_stages}"
    if hasattr(c, "fuse_quant"):
        return (f"linear {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}{' fused' if c.fuse_quant else ''}"
                f"{f' sk{c.split_to}' if c.split_to else ''}")
    return f"gate {c.block_t}x{c.block_e} k{c.block_k} w{c.num_warps} s{c.num_stages}{' split' if c.split else ''}"


def _problems(dry: bool) -> tuple[dict[str, Any], int]:
    from r1c.plugins.r1_kernels import R1, SMALL, problems

    shapes, tokens, dtype = (SMALL, 40, "float32") if dry else (R1, 4096, "bfloat16")
    return problems(shapes, tokens, dtype), tokens


def sweep_plans(dry: bool) -> list[tuple[str, int, str, str, Any]]:
    """(op, tokens, config, note, plan) of every sweep entry: per op and token count the plan's own pick first
    (note "default"), then the alternatives that differ from it."""
    from r1c.plugins.fp8_linear import plan as linear
    from r1c.plugins.moe_experts import plan as experts
    from r1c.plugins.moe_router import plan as router

    ops, big = _problems(dry)
    groups = [("experts", big, experts.select_config, experts.experts_plan, experts_configs())]
    for t in (1, big):
        groups.append(("linear", t, linear.select_config, linear.linear_plan, linear_configs(t == 1)))
        groups.append(("router", t, router.select_config, router.router_plan, router_configs(t == 1)))
    out = []
    for op, t, select, plan_of, alternatives in groups:
        problem = dataclasses.replace(ops[op][2], tokens=t)
        default = select(problem)
        out.append((op, t, describe(default), "default", plan_of(problem, default)))
        out += [(op, t, describe(c), note, plan_of(problem, c)) for note, c in alternatives if c != default]
    return out


def sweep_specs(dry: bool) -> list[Any]:
    """Every kernel the sweep launches (the aot step compiles them)."""
    return [s for *_, plan in sweep_plans(dry) for s in plan.specs()]


def step_sweep(ctx: Ctx, table: Table, deadline: float) -> None:
    t = max(ctx.tokens)
    if ("experts", t) not in ctx.launched:
        table.add(Row("sweep", "needs the correct step", status="FAIL"))
        return
    s = ctx.shapes
    k_in, n = s.linear
    inputs = {key: la.inputs for key, la in ctx.launched.items()}
    first: dict[tuple[str, int], Any] = {}
    entries = sweep_plans(ctx.dry)
    if ctx.quick:  # the test suite's dry run: each list's default and one alternative
        groups = [e[:2] for e in entries]
        entries = [e for i, e in enumerate(entries) if groups[:i].count(groups[i]) < 2]
    for op, tokens, label, note, plan in entries:
        check_deadline(deadline, label)
        key = (op, tokens)
        ins = inputs.get(key)
        if ins is None:
            continue
        problem_op, attrs = _op(op, ctx)
        la = launch_op(ctx, op, problem_op, attrs, ins, plan=plan)
        ms = graph_ms(ctx, lambda la=la: la.run(ctx))
        base = first.setdefault(key, (ms, la))
        same, what = _same(op, la, base[1])
        flops, peak, nbytes = {
            "experts": (6.0 * t * s.top_k * s.hidden * s.inter, "fp8", None),
            "linear": (2.0 * tokens * k_in * n, "fp8", n * k_in * (1 + 4 / 128**2) + tokens * (k_in + n) * 2),
            "router": (2.0 * tokens * s.experts * s.hidden, "tf32", s.experts * s.hidden * 4 + tokens * s.hidden * 2),
        }[op]
        note = "default" if note == "default" else f"{base[0] / ms:.2f}x default{f', {note}' if note else ''}"
        table.add(Row("sweep", label[:34], tokens, ms, flops, peak, nbytes, baseline_ms=None,
                      check=f"{note}; {what}"[:44], status="ok" if same else "FAIL"))
    _stage_times(ctx, table, deadline, ctx.launched[("experts", t)])


def _op(name: str, ctx: Ctx) -> tuple[Any, dict[str, Any]]:
    ops, _ = _problems(ctx.dry)
    op, attrs, _ = ops[name]
    return op, attrs


def _same(op: str, la: Any, base: Any) -> tuple[bool, str]:
    """Whether `la`'s outputs equal the default's (module docstring), and what was compared."""
    if op == "router":
        rows = float((la.outputs[1] == base.outputs[1]).all(dim=1).float().mean())
        return rows >= 0.99, f"ids {100 * rows:.1f}% rows"
    diff = rel(la.outputs[0].float(), base.outputs[0].float())
    return diff <= 1e-2, f"out rel diff {diff:.0e}"


def _stage_times(ctx: Ctx, table: Table, deadline: float, default: Any) -> None:
    """Each launch of the default experts plan alone, replayed after a full run (every intermediate valid)."""
    from r1c.plugins.kernel_library import PreparedPlan

    t = max(ctx.tokens)
    default.run(ctx)
    for i, one in enumerate(default.prepared.launches):
        check_deadline(deadline, "stage timings")
        single = dataclasses.replace(default, prepared=PreparedPlan((one,), default.prepared.offsets),
                                     plan=dataclasses.replace(default.plan, launches=(default.plan.launches[i],)))
        ms = graph_ms(ctx, lambda single=single: single.run(ctx))
        table.add(Row("sweep", f"  stage {default.plan.launches[i].spec.name}", t, ms,
                      check=f"grid {list(one.grid)}, {one.block // 32} warps, smem {one.shared}"))
