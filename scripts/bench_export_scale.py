#!/usr/bin/env python
"""Streaming export at DeepSeek-R1's per-layer shapes: peak RSS and time against copying the shards once.

Makes a synthetic FP8 checkpoint in DeepSeek's release layout (per-expert tensors, 128x128 block scales, one
shard per layer) with R1's per-layer shapes (hidden 7168, q/kv LoRA ranks 1536/512, 128 heads,
moe_intermediate 2048, dense intermediate 18432) but fewer layers, experts and vocabulary, so that it is
~6 GB. Then, in this one script:
  1. copies the shards once (shutil.copyfile, the baseline time; the copy is deleted right after);
  2. `r1c export CKPT -o OUT --no-progress` in a child process, timed, its peak RSS from /usr/bin/time
     (%M: the kernel's high-water mark of that child, not a sample);
  3. the fixed base: peak RSS of `r1c export --preset tiny` (the interpreter, torch, onnx, onnx-ir,
     onnxscript, the pass pipeline) measured the same way;
  4. checks that every FP8 tensor of the checkpoint is an FP8 initializer of the export, byte for byte.
Prints one JSON object (also written to --json) and exits 1 if a bound fails:
  peak RSS <= base + 2 x largest layer's bytes; export time <= 3 x copy time; every FP8 weight FP8.
Everything lives under --workdir (default /tmp/scale-bench) and is deleted at the end unless --keep.

With `--precision fp8|fp32`: the streamed (de)quantization instead. For each of two layer counts
(--precision-layers, default 2 and 4; the first layer dense, the rest MoE, so the largest layer is the same),
a checkpoint with R1's per-layer shapes (bfloat16 weights for fp8, FP8 for fp32) is made, exported with
`r1c export CKPT --precision P --dtype bfloat16` (peak RSS and time as above) and deleted. Bound: the peak RSS
does not grow with the model (bigger model's peak - smaller's <= 10% of the bytes the model grew by); the peak
against base + 2 x largest layer is reported too.
Usage: python scripts/bench_export_scale.py [--layers 6] [--experts 16] [--workdir DIR] [--json FILE] [--keep]
       python scripts/bench_export_scale.py --precision fp8 [--precision-layers 2,4] [--experts 8]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
from safetensors.torch import save_file

from r1c.config import preset
from r1c.exporter.checkpoint import FP8_QUANTIZATION_CONFIG, expected_shapes, is_quantizable
from r1c.exporter.checkpoint_layouts import SCALE_SUFFIX
from r1c.plugins import fp8


def synthetic_config(layers: int, experts: int, fp8_weights: bool = True, dense: int = 3) -> object:
    return preset("r1").replace(num_hidden_layers=layers, n_routed_experts=experts, n_group=4, topk_group=2,
                                vocab_size=16384, first_k_dense_replace=dense,
                                quantization_config=dict(FP8_QUANTIZATION_CONFIG) if fp8_weights else None)


def make_checkpoint(root: Path, config: object, seed: int = 0, fp8_weights: bool = True) -> dict[str, int]:
    """Writes the checkpoint (one shard per layer, plus one for embeddings/head); returns bytes per layer.
    `fp8_weights=False`: the linear and expert weights in bfloat16 (what `--precision fp8` quantizes)."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True)
    (root / "config.json").write_text(config.to_json() + "\n")  # type: ignore[attr-defined]

    def fp8_tensor(shape: tuple[int, ...]) -> torch.Tensor:  # finite e4m3fn bit patterns (no NaN)
        return torch.randint(0, 0x70, shape, dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)

    def add(group: dict[str, torch.Tensor], name: str, shape: tuple[int, ...], scale: float) -> None:
        if fp8_weights:
            group[name] = fp8_tensor(shape)
            group[name + SCALE_SUFFIX] = torch.rand(fp8.block_shape(*shape), generator=g) * scale
        else:
            group[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)

    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, shape in expected_shapes(config).items():  # type: ignore[arg-type]
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "other"
        group = groups.setdefault(key, {})
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            e, rows, cols = shape
            prefix = name.rsplit(".", 1)[0]
            projs = (("gate_proj", rows // 2), ("up_proj", rows // 2)) if name.endswith("gate_up_proj") else \
                (("down_proj", rows),)
            for ex in range(e):
                for proj, r in projs:
                    add(group, f"{prefix}.{ex}.{proj}.weight", (r, cols), 1.0)
        elif is_quantizable(name, len(shape)):
            add(group, name, shape, 1e-3)
        elif name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
            group[name] = torch.randn(shape, generator=g) * 0.01
        else:
            group[name] = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    weight_map: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for i, (key, tensors) in enumerate(groups.items()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(root / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        sizes[key] = sum(t.numel() * t.element_size() for t in tensors.values())
        print(f"  wrote {file}: {key}, {sizes[key] / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        del tensors
    groups.clear()
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index) + "\n")
    return sizes


def layer_sizes(root: Path) -> dict[str, int]:
    """Bytes per layer ("other": embeddings, final norm, head) of an existing checkpoint, from its headers."""
    from r1c.exporter.checkpoint_reader import CheckpointReader

    reader = CheckpointReader(root)
    sizes: dict[str, int] = {}
    for name in reader.names:
        key = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "other"
        sizes[key] = sizes.get(key, 0) + int(torch.tensor(reader.shape(name)).prod()) * reader.dtype(name).itemsize
    return sizes


def timed_child(cmd: list[str], work: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child, from `/usr/bin/time -f "%e %M"` (the kernel's
    high-water mark of that process, not a sample; measured from `time`'s own small fork, so this script's
    memory does not leak into it as it would through fork+exec of a large parent)."""
    out = work / "time.txt"
    subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", str(out), *cmd], check=True)
    seconds, kib = out.read_text().split()[-2:]
    return float(seconds), int(kib) * 1024


def fp8_check(ckpt: Path, export: Path) -> dict[str, int]:
    import onnx

    from r1c.exporter.checkpoint_reader import CheckpointReader

    reader = CheckpointReader(ckpt)
    want = {n: reader.shape(n) for n in reader.names if reader.dtype(n) == torch.float8_e4m3fn}
    model = onnx.load(str(export / "model.onnx"), load_external_data=False)
    got = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    want_bytes = sum(int(torch.tensor(s).prod()) for s in want.values())
    got_bytes = sum(int(torch.tensor(list(t.dims)).prod()) for t in got)
    return {"checkpoint_fp8_tensors": len(want), "export_fp8_initializers": len(got),
            "checkpoint_fp8_bytes": want_bytes, "export_fp8_bytes": got_bytes}


def precision_bench(work: Path, precision: str, precision_layers: list[int], experts: int,
                    r1c: list[str]) -> dict[str, Any]:
    """--precision fp8|fp32: peak RSS of the streamed (de)quantizing export at two model sizes."""
    work.mkdir(parents=True)
    _, base_rss = timed_child([*r1c, "export", "--preset", "tiny", "--no-progress", "-o", str(work / "tiny")], work)
    runs: list[dict[str, Any]] = []
    for layers in precision_layers:
        config = synthetic_config(layers, experts, fp8_weights=precision == "fp32", dense=1)
        print(f"making a {layers}-layer checkpoint in {work}/ckpt", file=sys.stderr, flush=True)
        sizes = make_checkpoint(work / "ckpt", config, fp8_weights=precision == "fp32")
        seconds, rss = timed_child([*r1c, "export", str(work / "ckpt"), "--precision", precision, "--dtype",
                                    "bfloat16", "--no-progress", "-o", str(work / "export")], work)
        out_bytes = sum(p.stat().st_size for p in (work / "export").iterdir())
        report = work / "export" / "quantization.json"
        runs.append({"layers": layers, "checkpoint_bytes": sum(sizes.values()), "largest_layer_bytes":
                     max(sizes.values()), "export_bytes": out_bytes, "export_seconds": round(seconds, 2),
                     "peak_rss_bytes": rss, "rss_above_base_over_largest_layer":
                     round((rss - base_rss) / max(sizes.values()), 3),
                     "quantized_tensors": json.loads(report.read_text())["tensors"] if report.exists() else None})
        shutil.rmtree(work / "ckpt")
        shutil.rmtree(work / "export")
    small, big = runs[0], runs[-1]
    growth = big["checkpoint_bytes"] - small["checkpoint_bytes"]
    rss_growth = big["peak_rss_bytes"] - small["peak_rss_bytes"]
    return {"precision": precision, "experts": experts, "base_peak_rss_bytes": base_rss, "runs": runs,
            "model_growth_bytes": growth, "peak_rss_growth_bytes": rss_growth,
            "ok": {"rss_does_not_grow": rss_growth <= 0.1 * growth}}


def _ints(ctx: click.Context, param: click.Parameter, text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"integers, comma-separated (e.g. 2,4), got {text!r}") from None


@click.command(help=(__doc__ or "").replace("\n\n", "\n\n\b\n"))  # \b: click prints the paragraph as written
@click.option("--layers", type=int, default=6, show_default=True, help="layers of the synthetic checkpoint")
@click.option("--experts", type=int, default=16, show_default=True, help="routed experts per MoE layer")
@click.option("--precision", type=click.Choice(["fp8", "fp32"]), default=None,
              help="bench the streamed --precision export instead")
@click.option("--precision-layers", default="2,4", show_default=True, callback=_ints,
              help="layer counts of the --precision runs, comma-separated (first and last compared)")
@click.option("--workdir", type=click.Path(path_type=Path), default=Path("/tmp/scale-bench"), show_default=True,
              help="checkpoint and export go here")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="also write the JSON result here")
@click.option("--keep", is_flag=True, help="keep the workdir (checkpoint and export) afterwards")
@click.option("--reuse", is_flag=True, help="reuse WORKDIR/ckpt from an earlier --keep run")
def main(layers: int, experts: int, precision: str | None, precision_layers: list[int], workdir: Path,
         json_path: Path | None, keep: bool, reuse: bool) -> None:
    sys.exit(bench(layers, experts, precision, precision_layers, workdir, json_path, keep, reuse))


def bench(layers: int, experts: int, precision: str | None, precision_layers: list[int], work: Path,
          json_path: Path | None, keep: bool, reuse: bool) -> int:
    """The whole benchmark; 0 if every bound holds, else 1."""
    reuse = reuse and (work / "ckpt" / "model.safetensors.index.json").is_file()
    for old in ([work / "tiny", work / "export", work / "copy"] if reuse else [work]):
        shutil.rmtree(old, ignore_errors=True)
    r1c = [sys.executable, "-m", "r1c.cli"]
    if precision:
        try:
            result = precision_bench(work, precision, precision_layers, experts, r1c)
            text = json.dumps(result, indent=2)
            print(text)
            if json_path:
                json_path.write_text(text + "\n")
            return 0 if all(result["ok"].values()) else 1
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
    try:
        config = synthetic_config(layers, experts)
        if reuse:
            sizes = layer_sizes(work / "ckpt")
        else:
            print(f"making the checkpoint in {work}/ckpt", file=sys.stderr, flush=True)
            sizes = make_checkpoint(work / "ckpt", config)
        shards = sorted((work / "ckpt").glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)

        # the fixed base first (a smaller child, so the big export's high-water mark is its own)
        _, base_rss = timed_child([*r1c, "export", "--preset", "tiny", "--no-progress", "-o", str(work / "tiny")],
                                  work)
        (work / "copy").mkdir()
        start = time.perf_counter()
        for p in shards:
            shutil.copyfile(p, work / "copy" / p.name)
        copy_s = time.perf_counter() - start
        shutil.rmtree(work / "copy")
        export_s, export_rss = timed_child([*r1c, "export", str(work / "ckpt"), "--no-progress", "-o",
                                            str(work / "export")], work)
        largest = max(sizes.values())
        out_bytes = sum(p.stat().st_size for p in (work / "export").iterdir())
        result = {
            "checkpoint": {"layers": layers, "experts": experts, "shards": len(shards),
                           "bytes": total, "largest_layer_bytes": largest,
                           "largest_layer": max(sizes, key=lambda k: sizes[k])},
            "export_bytes": out_bytes,
            "data_files": sorted(p.name for p in (work / "export").iterdir() if ".data" in p.name),
            "copy_seconds": round(copy_s, 2),
            "export_seconds": round(export_s, 2),
            "time_ratio": round(export_s / copy_s, 2),
            "base_peak_rss_bytes": base_rss,
            "export_peak_rss_bytes": export_rss,
            "rss_above_base_over_largest_layer": round((export_rss - base_rss) / largest, 3),
            "rss_bound_bytes": base_rss + 2 * largest,
            "fp8": fp8_check(work / "ckpt", work / "export"),
        }
        f = result["fp8"]
        ok = {
            "rss": export_rss <= base_rss + 2 * largest,
            "time": export_s <= 3 * copy_s,
            "fp8": f["checkpoint_fp8_tensors"] == f["export_fp8_initializers"] > 0
            and f["checkpoint_fp8_bytes"] == f["export_fp8_bytes"],
        }
        result["ok"] = ok
        text = json.dumps(result, indent=2)
        print(text)
        if json_path:
            json_path.write_text(text + "\n")
        return 0 if all(ok.values()) else 1
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
