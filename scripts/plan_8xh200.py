"""The 8 x H200 plan for DeepSeek-R1 FP8, computed from r1c's `r1` preset (see docs/multi_gpu_plan.md).

    python scripts/plan_8xh200.py                 # markdown tables: memory, communication, decode latency
    python scripts/plan_8xh200.py --json plan.json

Every size comes from `r1c.config.preset("r1")` through `r1c.runtime.distributed.plan`; the hardware numbers and
the efficiency / latency assumptions are the fields of `plan.Hardware` (printed with the tables).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from r1c.config import preset
from r1c.passes.shard_layout import ShardLayout
from r1c.runtime.distributed.plan import Hardware, parts, plan, total_parameters

LAYOUTS = [(8, 1), (4, 2), (2, 4), (1, 8)]
TRTLLM_TOKENS_PER_S_PER_USER = 158.0  # the figure issue 13 quotes for TensorRT-LLM, DeepSeek-R1, 8 x H200


@click.command(help=(__doc__ or "").replace("\n\n    python", "\n\n\b\n    python", 1))  # \b: keep the usage lines
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="also write the hardware and every row as JSON to this file")
@click.option("--contexts", default="1024,32768", show_default=True, help="comma-separated context lengths (tokens)")
@click.option("--batches", default="1,8", show_default=True, help="comma-separated batch sizes")
def main(json_path: Path | None, contexts: str, batches: str) -> None:
    c, hw = preset("r1"), Hardware()
    p = parts(c)
    print(f"DeepSeek-R1 (preset r1): {total_parameters(c) / 1e9:.1f} B parameters "
          f"(ModelConfig.num_parameters: {c.num_parameters() / 1e9:.1f} B); one routed expert "
          f"{p.expert[1] / 1e6:.1f} MB FP8; latent KV {c.latent_dim} values/token/layer\n")
    print("Hardware and assumptions: " + ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(hw).items()) + "\n")
    rows = []
    print("| layout | weights GB/rank | KV GB / 32K seq | free for KV GB | 32K seqs | collectives/step | "
          "AR message B (B=1) |")
    print("|---|---|---|---|---|---|---|")
    for t, e in LAYOUTS:
        r = plan(c, ShardLayout(t, e), hw, batch=1, context=32768)
        rows.append(r)
        print(f"| {r['layout']} | {r['weights_gb_per_rank']:.1f} | {r['kv_gb_per_sequence']:.2f} | "
              f"{r['free_for_kv_gb']:.1f} | {r['sequences_at_context']} | {r['collectives_per_step']} | "
              f"{r['comm_per_layer_bytes']['moe_allreduce_message']} |")
    print()
    print("| layout | batch | context | busiest partition experts/step | GB read/rank/step | memory ms | "
          f"collectives ms | kernels ms | step ms | tok/s/user | vs {TRTLLM_TOKENS_PER_S_PER_USER:.0f} |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for context in (int(x) for x in contexts.split(",")):
        for batch in (int(x) for x in batches.split(",")):
            for t, e in LAYOUTS:
                r = plan(c, ShardLayout(t, e), hw, batch=batch, context=context)
                rows.append(r)
                d = r["decode_ms"]
                print(f"| {r['layout']} | {batch} | {context} | {r['busiest_partition_experts_per_step']:.2f} | "
                      f"{r['bytes_read_per_step_gb']:.2f} | {d['memory']:.2f} | {d['communication']:.2f} | "
                      f"{d['kernels']:.2f} | {d['total']:.2f} | {r['tokens_per_s_per_user']:.0f} | "
                      f"{r['tokens_per_s_per_user'] / TRTLLM_TOKENS_PER_S_PER_USER:.2f} |")
    if json_path:
        json_path.write_text(json.dumps({"hardware": dataclasses.asdict(hw), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
