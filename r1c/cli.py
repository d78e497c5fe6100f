"""The `r1c` command line: export, build, run, and the tools around them.

Every r1c error becomes one line on stderr (`r1c: error: ...`) and a non-zero exit code: 1 for bad input or
a failed stage, 2 for a command line that does not parse, 3 only for `r1c bench`'s regression gate, 130 on
SIGINT and 143 on SIGTERM (both remove what the command had half-written).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from r1c.errors import ExportError, R1CError, RuntimeInputError
from r1c.runtime.server.commands import (
    NATIVE_DECODE_OPTION,
    THREADS_OPTION,
    WEIGHTS_MEMORY_OPTION,
    session_choices,
)
from r1c.targets import CPU_MOE_CHOICES, DEFAULT_RTX_COMPUTE_CAPABILITY, WEIGHTS_MEMORY

logger = logging.getLogger("r1c")

INT64_MAX = 2**63 - 1


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like SIGINT's KeyboardInterrupt so that every cleanup on the way out runs."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated()


class _Group(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            _fail(ctx, e.format_message(), e.exit_code)
            raise  # not reached: ctx.exit raises

    def invoke(self, ctx: click.Context) -> Any:
        in_main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
        try:
            return super().invoke(ctx)
        except R1CError as e:
            _fail(ctx, str(e), e.exit_code)
        except click.ClickException as e:  # a subcommand's options that do not parse: one line too
            _fail(ctx, e.format_message(), e.exit_code)
        except Terminated:
            click.echo("r1c: terminated (SIGTERM); nothing half-written was left", err=True)
            ctx.exit(143)
        except KeyboardInterrupt:
            click.echo("r1c: interrupted; nothing half-written was left", err=True)
            ctx.exit(130)
        finally:
            if in_main:
                signal.signal(signal.SIGTERM, previous)


def _fail(ctx: click.Context, message: str, code: int) -> None:
    text = " ".join(message.split())  # one line, whatever the message
    click.echo(f"r1c: error: {text}", err=True)
    ctx.exit(code)


class _Formatter(logging.Formatter):
    """`r1c: level: message`; a library's exception as its last line, not a stack dump (unless -vv)."""

    def __init__(self, tracebacks: bool) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")
        self.tracebacks = tracebacks

    def format(self, record: logging.LogRecord) -> str:
        record.levelname = record.levelname.lower()
        return super().format(record)

    def formatException(self, ei: Any) -> str:
        if self.tracebacks:
            return super().formatException(ei)
        return f"  ({ei[0].__name__}: {str(ei[1]).strip().splitlines()[-1] if str(ei[1]).strip() else ''})"


def _setup_logging(verbose: int) -> None:
    """No flag: r1c's warnings only. -v: r1c's info, libraries' warnings, one line each. -vv: everything."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "r1c_cli", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)  # the current stderr (a test runner swaps it per call)
    handler.setFormatter(_Formatter(tracebacks=verbose >= 2))
    handler.r1c_cli = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING if verbose == 1 else logging.ERROR)
    logging.getLogger("r1c").setLevel(logging.DEBUG if verbose >= 2 else logging.INFO if verbose else logging.WARNING)


def _progress() -> bool:
    """Progress bars: on a terminal only (never in logs or pipes)."""
    return sys.stderr.isatty()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _summary(verb: str, out: Path, start: float, extra: str = "") -> str:
    """One line: what was written, its files and size, and the time it took."""
    files = (sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p.is_file() or p.is_dir())
             if out.is_dir() else [out.name])
    return (f"{verb} {out}{extra}: {', '.join(files)} ({_bytes(_size(out))}) in {time.perf_counter() - start:.1f} s")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="r1c")
@click.option("-v", "--verbose", count=True, help="More logging on stderr: -v r1c's steps, -vv everything.")
def main(verbose: int) -> None:
    """r1c: export DeepSeek-V3/R1-class MoE models to ONNX with r1c custom ops, optimize them with graph
    passes, build engine bundles (ONNX Runtime on CPU; TensorRT or TensorRT for RTX on NVIDIA GPUs) and run or
    benchmark them.

    \b
    Typical use, on a CPU:
      r1c export --preset tiny -o out/tiny          # or: r1c export /path/to/hf-checkpoint -o out/m
      r1c build out/tiny -o out/tiny.bundle          # --target onnxruntime (default) | tensorrt | tensorrt-rtx
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
    import functools

    from r1c.exporter.onnx_export import export_onnx
    from r1c.outdir import check_output_dir

    start = time.perf_counter()
    check_output_dir(out, ExportError, "export")  # before the long part
    show = progress and _progress()
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
    from r1c.exporter.precision_source import with_precision

    config, tensors, quantizer = with_precision(config, tensors, precision, dtype)  # streamed: per tensor as read
    source.update(precision=precision, dtype=dtype, weights=weights)
    from r1c.runtime.serving.text import tokenizer_files

    export_onnx(config, tensors, out, dtype=dtype, write_weights=weights == "all", progress=show,
                extra_files={"source.json": json.dumps(source, indent=2) + "\n",
                             **tokenizer_files(src)},  # the checkpoint's tokenizer travels with the model
                postprocess=functools.partial(_finish_export, quantizer, progress=show))
    if quantizer is not None:
        summary = quantizer.report()
        click.echo(f"fp8: quantized {summary['tensors']} tensors; relative error mean "
                   f"{summary['mean_relative_error']:.4f}, max {summary['max_relative_error']:.4f}", err=True)
    click.echo(_summary("exported", out, start))


def _finish_export(quantizer: Any, export_dir: Path, progress: bool = False) -> None:
    """quantization.json (with --precision fp8: known once every tensor was quantized), then `_canonicalize`."""
    if quantizer is not None:
        (export_dir / "quantization.json").write_text(json.dumps(quantizer.report(), indent=2) + "\n")
    _canonicalize(export_dir, progress=progress)


def _canonicalize(export_dir: Path, progress: bool = False) -> None:
    """Run the target-independent `r1c` pass pipeline over a fresh export (cleanup, shapes, stable names).

    In place: the model file is rewritten, its weights stay where the exporter wrote them.
    """
    from r1c.passes.pipelines import lower_file

    lower_file(export_dir / "model.onnx", export_dir / "model.onnx", target="r1c", in_place=True, progress=progress)


@main.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Bundle directory to create (written whole or not at all).")
@click.option("--target", type=click.Choice(["onnxruntime", "tensorrt", "tensorrt-rtx"]), default="onnxruntime",
              show_default=True, help="onnxruntime: a CPU bundle; tensorrt: a TensorRT engine with the r1c plugins "
              "(needs TensorRT and the GPU); tensorrt-rtx: the same through TensorRT for RTX, for --arch (any "
              "machine).")
@click.option("--arch", default=None, metavar="SM",
              help="tensorrt-rtx: the compute capability to build for (sm89, sm90, sm120, ...); default "
                   f"{DEFAULT_RTX_COMPUTE_CAPABILITY.lower()} (Ada, the oldest with FP8 tensor cores). tensorrt "
                   "builds for the GPU it runs on.")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads (0: one per physical core).")
@click.option("--dump-after", metavar="PASS",
              help="Also write the model as it is after this pass (into OUTPUT.dumps/; `r1c passes` lists them).")
@click.option("--tensor-parallel", "tp", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split attention, dense MLPs, embedding and LM head over this many ranks (one bundle, T x E ranks).")
@click.option("--expert-parallel", "ep", type=click.IntRange(min=1), default=1, show_default=True,
              help="Split the routed experts into this many partitions (each holds E/EP experts).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "int8", "int4"]), default="auto", show_default=True,
              help="onnxruntime weights: int8 / int4 weight-only block quantization (MatMulNBits, QMoE); fp32; "
                   "auto: the export's, FP8 weights as int8 blocks (1 byte a weight).")
@click.option("--cpu-kernels", "--cpu-moe", "cpu_moe", type=click.Choice(CPU_MOE_CHOICES), default="auto",
              show_default=True,
              help="onnxruntime: float32 routed experts, float32 MatMuls by a constant and MLA attention (float32 "
                   "or int8 absorbed weights) on r1c's CPU kernels (compiled here with g++ against ONNX Runtime's "
                   "headers: scripts/fetch_ort_headers.sh), on ORT's own (MoE, MLAS, its attention nodes), or auto: "
                   "r1c's where they build. --cpu-moe is the older name.")
@click.option("--weights-memory", type=click.Choice(WEIGHTS_MEMORY), default=WEIGHTS_MEMORY[0],
              show_default=True,
              help="Where the weights of r1c's CPU kernels lie when the bundle is loaded (a bundle without those "
                   "kernels: no effect). hugepages: read into this process's own memory, advised for transparent "
                   "huge pages (a private copy the size of those weights; a faster decode). onnxruntime: mapped by "
                   "ONNX Runtime from model.onnx.data (the page cache, shared by every process that loads the "
                   "bundle). Recorded in the manifest; load(..., session_options={'weights_memory': ...}) "
                   "overrides it in Python.")
def build(export_dir: Path, out: Path, target: str, arch: str | None, threads: int, dump_after: str | None, tp: int,
          ep: int, precision: str, cpu_moe: str, weights_memory: str) -> None:
    """Build an engine bundle (manifest.json + engine files) from the output of `r1c export`.

    The target's pass pipeline (`r1c passes --target T` lists it) runs first. The manifest records the
    target, the model config and its hash, graph I/O, KV-cache layout, library versions and the sha256 of
    every file; `r1c run` and the Python runtime refuse a bundle that does not match.
    """
    from r1c.manifest import read_manifest
    from r1c.runtime.build import build_bundle

    start = time.perf_counter()
    verbose = logging.getLogger("r1c").getEffectiveLevel() <= logging.INFO
    session = {"intra_op_num_threads": threads, "weights_memory": weights_memory}
    build_bundle(export_dir, out, target=target, session=session, dump_after=dump_after, verbose=verbose, arch=arch,
                 tensor_parallel=tp, expert_parallel=ep, progress=_progress(), precision=precision, cpu_moe=cpu_moe)
    target_options = read_manifest(out, verify_hashes=False).target_options
    quant = target_options.get("quantization")
    if quant:
        click.echo(f"int{quant['bits']}: quantized {quant['tensors']} tensors; relative error mean "
                   f"{quant['mean_relative_error']:.4f}, max {quant['max_relative_error']:.4f}", err=True)
    kernels = ""
    if target_options.get("cpu_kernels"):
        ops = _cpu_kernel_ops(out / str(target_options.get("model", "model.onnx")))
        kernels = f", r1c CPU kernels: {', '.join(ops)}" if ops else ", r1c CPU kernels"
    click.echo(_summary("built", out, start, f" ({target}{kernels})"))


def _cpu_kernel_ops(model_path: Path) -> list[str]:
    """The r1c.cpu ops a built model runs (MoE, Linear, MLABlock, MLAAttention, MLAAttentionInt8), each with its
    count, in the graph's order: what the build summary names (an int8/int4 bundle ships the library for the
    attention alone, its experts on ONNX Runtime's QMoE). The graph only: the weights stay on disk."""
    import onnx

    from r1c.plugins.cpu_moe import CPU_DOMAIN

    if not model_path.is_file():
        return []
    counts: dict[str, int] = {}
    for node in onnx.load(str(model_path), load_external_data=False).graph.node:
        if node.domain == CPU_DOMAIN:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return [f"{op} x{n}" for op, n in counts.items()]


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise RuntimeInputError(f"--input-ids must be integers separated by spaces, got {text!r}") from None
    if not ids:
        raise RuntimeInputError("--input-ids is empty")
    bad = next((i for i in ids if not 0 <= i <= INT64_MAX), None)
    if bad is not None:
        raise RuntimeInputError(f"--input-ids: token id {bad} is not a token id (they are >= 0 and < the vocabulary)")
    return ids


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--input-ids", "input_ids", required=True, multiple=True,
              help='Prompt token ids, e.g. "1 2 3". Repeat the option for a batch of prompts.')
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=8, show_default=True,
              help="Tokens to generate (greedy), at least 1.")
@click.option("--eos", "eos_token_id", type=int, default=None, help="Stop a row at this token id.")
@click.option("--logits-out", type=click.Path(path_type=Path),
              help="Save the first prompt's logits [S, V] (float32 .npy); written whole or not at all.")
@click.option("--json", "as_json", is_flag=True, help="Print the prompts and new tokens as JSON (for scripts).")
@THREADS_OPTION
@WEIGHTS_MEMORY_OPTION
@NATIVE_DECODE_OPTION
def run(bundle: Path, input_ids: tuple[str, ...], max_new_tokens: int, eos_token_id: int | None,
        logits_out: Path | None, as_json: bool, threads: int | None, weights_memory: str | None,
        native_decode: bool | None) -> None:
    """Generate tokens greedily from a bundle; prints each prompt's new token ids, one labelled line per prompt."""
    import numpy as np

    from r1c.outdir import atomic_output_file, check_output_file
    from r1c.runtime import load

    prompts = [_parse_ids(t) for t in input_ids]
    if logits_out is not None:
        check_output_file(logits_out, RuntimeInputError, "--logits-out")  # before the model runs
    engine = load(bundle, session_options=session_choices(threads, weights_memory, native_decode))
    bad = next((i for p in prompts for i in p if i >= engine.vocab_size), None)
    if bad is not None:
        raise RuntimeInputError(f"--input-ids: token id {bad} is out of range [0, {engine.vocab_size}) (the "
                                "model's vocabulary)")
    if eos_token_id is not None and not 0 <= eos_token_id < engine.vocab_size:
        raise RuntimeInputError(f"--eos {eos_token_id} is not a token of this model (vocabulary: 0 to "
                                f"{engine.vocab_size - 1})")
    rows = engine.generate(prompts, max_new_tokens, eos_token_id=eos_token_id)
    if logits_out is not None:
        logits = engine.forward(np.array([prompts[0]], dtype=np.int64))[0]
        with atomic_output_file(logits_out, RuntimeInputError, "--logits-out") as tmp, tmp.open("wb") as f:
            np.save(f, logits)
        click.echo(f"r1c run: wrote the first prompt's logits, float32 {list(logits.shape)}, to {logits_out}",
                   err=True)
    if as_json:
        click.echo(json.dumps([{"input_ids": p, "new_tokens": r} for p, r in zip(prompts, rows)]))
        return
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        click.echo(f"prompt {i} ({len(prompt)} tokens) -> {len(row)} new tokens: {' '.join(map(str, row))}")


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
