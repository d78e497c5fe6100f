"""The `r1c` command line: export, build, run, and the tools around them.

Every r1c error becomes one line on stderr (`r1c: error: ...`) and a non-zero exit code.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from r1c.errors import ExportError, R1CError, RuntimeInputError

logger = logging.getLogger("r1c")


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except R1CError as e:
            click.echo(f"r1c: error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("r1c: interrupted", err=True)
            ctx.exit(130)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="r1c")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug), on stderr.")
def main(verbose: int) -> None:
    """r1c: export DeepSeek-V3/R1-class MoE models to ONNX with r1c custom ops, optimize them with graph
    passes, build engine bundles (ONNX Runtime on CPU; TensorRT on NVIDIA GPUs) and run or benchmark them.

    \b
    Typical use, on a CPU:
      r1c export --preset tiny -o out/tiny          # or: r1c export /path/to/hf-checkpoint -o out/m
      r1c build out/tiny -o out/tiny.bundle          # --target onnxruntime (default) | tensorrt
      r1c run out/tiny.bundle --input-ids "1 2 3" --max-new-tokens 8
    """
    _setup_logging(verbose)


def _load_source(src: Path | None, preset_name: str | None, seed: int, weights: str
                 ) -> tuple[Any, Any, dict[str, Any]]:
    """(config, tensor source, source description) from a checkpoint dir (read lazily) or a preset."""
    from r1c.config import preset

    if (src is None) == (preset_name is None):
        raise ExportError("export: give either a checkpoint directory or --preset NAME (not both)")
    if preset_name is not None:
        from r1c.exporter.checkpoint import random_checkpoint

        config = preset(preset_name)
        if weights == "none":
            return config, None, {"preset": preset_name, "weights": "none"}
        params = config.num_parameters()
        if params * 4 > 64 * 2**30:
            raise ExportError(f"export: preset {preset_name!r} has {params / 1e9:.0f}B parameters; random weights "
                              "of that size cannot be made here (export a real checkpoint directory instead, or "
                              "--weights none for the graph alone)")
        return config, random_checkpoint(config, seed=seed), {"preset": preset_name, "seed": seed}
    assert src is not None
    from r1c.exporter.checkpoint_reader import CheckpointReader

    reader = CheckpointReader(src)
    return reader.config, reader, {"checkpoint": str(src.resolve())}


def _auto_dtype(source: Any) -> str:
    """--dtype auto: the checkpoint's own dtype (that of its embedding; DeepSeek's FP8 release: bfloat16)."""
    import torch

    from r1c.exporter.tensor_source import DictSource

    if source is None:
        return "float32"
    source = DictSource(source) if isinstance(source, dict) else source
    t = source.dtype("model.embed_tokens.weight") if "model.embed_tokens.weight" in source else torch.float32
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(t, "float32")


@main.command()
@click.argument("src", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Output directory (must not exist or be empty); written whole or not at all.")
@click.option("--preset", "preset_name", type=click.Choice(["tiny", "small", "r1"]),
              help="Export a built-in config with seeded random weights instead of a checkpoint.")
@click.option("--seed", default=0, show_default=True, help="Seed of a preset's random weights.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp8"]), default="auto", show_default=True,
              help="auto: keep the checkpoint's weights (FP8 stays FP8); fp8: quantize weights to e4m3fn with "
                   "128x128 block scales; fp32: dequantize FP8 weights (to --dtype).")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True,
              help="Activations, latent KV cache and non-FP8 weights. auto: the checkpoint's own (bfloat16 for "
                   "DeepSeek's release; float32 for presets). Router and RMSNorm statistics stay float32.")
@click.option("--weights", type=click.Choice(["all", "none"]), default="all", show_default=True,
              help="none: the full graph and its data-file layout with no weight bytes (sparse files), e.g. "
                   "`--preset r1 --weights none` to check the real model's graph without its 690 GB.")
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
def export(src: Path | None, out: Path, preset_name: str | None, seed: int, precision: str, dtype: str,
           weights: str, progress: bool) -> None:
    """Export a DeepSeek-V3/R1 checkpoint (HF layout: config.json + safetensors) to ONNX.

    The graph holds r1c::MoERouter and r1c::MoEExperts nodes (each with an ONNX function body, so ONNX
    Runtime runs it as is), weights as external data (model.onnx.data, then model.onnx.data.1, ... per
    16 GiB), a latent KV cache (MLA's compressed KV, kv_lora_rank + qk_rope_head_dim values per token per
    layer) and one graph for both prefill and decode. graph_io.json describes the inputs, outputs and cache
    layout. Weights stream from the checkpoint's shards layer by layer: memory stays about one layer.
    """
    from r1c.exporter.onnx_export import export_onnx

    config, tensors, source = _load_source(src, preset_name, seed, weights)
    if dtype == "auto":
        dtype = _auto_dtype(tensors)
    if tensors is None or weights == "none":
        import torch

        from r1c.exporter.tensor_source import ShapeSource

        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
        tensors = ShapeSource(config, torch_dtype) if tensors is None else tensors
        if precision != "auto":
            raise ExportError("export: --precision needs weights (it cannot be combined with --weights none)")
    extra: dict[str, str] = {}
    if precision == "fp8":
        from r1c.exporter.checkpoint import quantize_checkpoint_fp8
        from r1c.exporter.quant_report import quantization_report

        original = _materialize(tensors)
        config, tensors = quantize_checkpoint_fp8(config, original)
        report = quantization_report(original, tensors)
        del original
        extra["quantization.json"] = json.dumps(report, indent=2) + "\n"
        click.echo(f"fp8: quantized {report['tensors']} tensors; relative error mean "
                   f"{report['mean_relative_error']:.4f}, max {report['max_relative_error']:.4f}", err=True)
    elif precision == "fp32":
        from r1c.exporter.checkpoint import dequantized

        config, tensors = config.replace(quantization_config=None), dequantized(_materialize(tensors))
    source.update(precision=precision, dtype=dtype, weights=weights)
    from r1c.runtime.serving.text import tokenizer_files

    extra.update(tokenizer_files(src))  # the checkpoint's tokenizer travels with the model
    export_onnx(config, tensors, out, dtype=dtype, write_weights=weights == "all",
                progress=progress and sys.stderr.isatty(),
                extra_files={"source.json": json.dumps(source, indent=2) + "\n", **extra},
                postprocess=_canonicalize)
    click.echo(f"exported {out}")


def _materialize(tensors: Any) -> dict[str, Any]:
    """Every tensor in memory (what --precision fp8/fp32 transforms need; not a streamed export)."""
    if isinstance(tensors, dict):
        return tensors
    return {name: tensors.get(name) for name in tensors.names}


def _canonicalize(export_dir: Path) -> None:
    """Run the target-independent `r1c` pass pipeline over a fresh export (cleanup, shapes, stable names).

    In place: the model file is rewritten, its weights stay where the exporter wrote them.
    """
    from r1c.passes.pipelines import lower_file

    lower_file(export_dir / "model.onnx", export_dir / "model.onnx", target="r1c", in_place=True)


@main.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to create (written whole or not at all).")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="onnxruntime: a CPU bundle; tensorrt: a TensorRT engine with the r1c plugins (needs TensorRT).")
@click.option("--threads", type=int, default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: one per physical core).")
@click.option("--dump-after", metavar="PASS",
              help="Also write the model as it is after this pass (into OUTPUT.dumps/; `r1c passes` lists them).")
def build(export_dir: Path, out: Path, target: str, threads: int, dump_after: str | None) -> None:
    """Build an engine bundle (manifest.json + engine files) from the output of `r1c export`.

    The target's pass pipeline (`r1c passes --target T` lists it) runs first. The manifest records the
    target, the model config and its hash, graph I/O, KV-cache layout, library versions and the sha256 of
    every file; `r1c run` and the Python runtime refuse a bundle that does not match.
    """
    from r1c.runtime.build import build_bundle

    verbose = logging.getLogger().level <= logging.INFO
    build_bundle(export_dir, out, target=target, session={"intra_op_num_threads": threads}, dump_after=dump_after,
                 verbose=verbose)
    click.echo(f"built {out} ({target})")


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise RuntimeInputError(f"--input-ids must be integers separated by spaces, got {text!r}") from None
    if not ids:
        raise RuntimeInputError("--input-ids is empty")
    return ids


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--input-ids", "input_ids", required=True, multiple=True,
              help='Prompt token ids, e.g. "1 2 3". Repeat the option for a batch of prompts.')
@click.option("--max-new-tokens", default=8, show_default=True, help="Tokens to generate (greedy).")
@click.option("--eos", "eos_token_id", type=int, default=None, help="Stop a row at this token id.")
@click.option("--logits-out", type=click.Path(path_type=Path),
              help="Save the first prompt's logits [S, V] (float32 .npy).")
def run(bundle: Path, input_ids: tuple[str, ...], max_new_tokens: int, eos_token_id: int | None,
        logits_out: Path | None) -> None:
    """Generate tokens greedily from a bundle; prints one line of new token ids per prompt."""
    import numpy as np

    from r1c.runtime import load

    prompts = [_parse_ids(t) for t in input_ids]
    engine = load(bundle)
    if logits_out is not None:
        logits = engine.forward(np.array([prompts[0]], dtype=np.int64))[0]
        tmp = logits_out.with_name(logits_out.name + ".partial.npy")
        np.save(tmp, logits)
        tmp.replace(logits_out)
    for row in engine.generate(prompts, max_new_tokens, eos_token_id=eos_token_id):
        click.echo(" ".join(map(str, row)))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def presets(as_json: bool) -> None:
    """List the built-in model presets with their sizes and KV-cache bytes per token."""
    from r1c.config import PRESETS

    rows: list[dict[str, Any]] = []
    for name, c in PRESETS.items():
        rows.append({
            "preset": name,
            "params": c.num_parameters(),
            "active_params": c.num_active_parameters(),
            "layers": c.num_hidden_layers,
            "experts": f"{c.num_experts_per_tok}/{c.n_routed_experts}",
            "latent_kv_bytes_per_token_bf16": c.kv_cache_bytes_per_token(2),
            "per_head_kv_bytes_per_token_bf16": c.per_head_kv_bytes_per_token(2),
        })
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'preset':8} {'params':>10} {'active':>10} {'layers':>6} {'top-k/E':>8} "
               f"{'latent KV/token':>16} {'per-head KV/token':>18} {'ratio':>6}")
    for r in rows:
        ratio = r["per_head_kv_bytes_per_token_bf16"] / r["latent_kv_bytes_per_token_bf16"]
        click.echo(f"{r['preset']:8} {_human(r['params']):>10} {_human(r['active_params']):>10} {r['layers']:>6} "
                   f"{r['experts']:>8} {_bytes(r['latent_kv_bytes_per_token_bf16']):>16} "
                   f"{_bytes(r['per_head_kv_bytes_per_token_bf16']):>18} {ratio:>5.1f}x")


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.1f}{unit}" if unit else f"{n:.0f}"
        n /= 1000
    return f"{n:.1f}T"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _register_stage_commands() -> None:
    """Commands whose modules live in other stages; registered here so `r1c --help` lists them all."""
    from r1c.cli_passes import inspect_cmd, optimize_cmd, passes_cmd
    from r1c.cli_verify import verify_cmd
    from r1c.runtime.bench.cli import bench_cmd
    from r1c.runtime.server.commands import register as register_serving_commands

    main.add_command(passes_cmd, "passes")
    main.add_command(inspect_cmd, "inspect")
    main.add_command(optimize_cmd, "optimize")
    main.add_command(bench_cmd, "bench")
    main.add_command(verify_cmd, "verify")
    register_serving_commands(main)  # serve, capi, bench-serving (r1c.runtime.server.commands)


_register_stage_commands()


if __name__ == "__main__":
    main()
