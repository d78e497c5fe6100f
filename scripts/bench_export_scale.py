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
Usage: python scripts/bench_export_scale.py [--layers 6] [--experts 16] [--workdir DIR] [--json FILE] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from r1c.config import preset
from r1c.exporter.checkpoint import FP8_QUANTIZATION_CONFIG, expected_shapes, is_quantizable
from r1c.plugins import fp8

SCALE = "_scale_inv"


def synthetic_config(layers: int, experts: int) -> object:
    return preset("r1").replace(num_hidden_layers=layers, n_routed_experts=experts, n_group=4, topk_group=2,
                                vocab_size=16384, quantization_config=dict(FP8_QUANTIZATION_CONFIG))


def make_checkpoint(root: Path, config: object, seed: int = 0) -> dict[str, int]:
    """Writes the checkpoint (one shard per layer, plus one for embeddings/head); returns bytes per layer."""
    g = torch.Generator().manual_seed(seed)
    root.mkdir(parents=True)
    (root / "config.json").write_text(config.to_json() + "\n")  # type: ignore[attr-defined]

    def fp8_tensor(shape: tuple[int, ...]) -> torch.Tensor:  # finite e4m3fn bit patterns (no NaN)
        return torch.randint(0, 0x70, shape, dtype=torch.uint8, generator=g).view(torch.float8_e4m3fn)

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
                    group[f"{prefix}.{ex}.{proj}.weight"] = fp8_tensor((r, cols))
                    group[f"{prefix}.{ex}.{proj}.weight{SCALE}"] = torch.rand(fp8.block_shape(r, cols), generator=g)
        elif is_quantizable(name, len(shape)):
            group[name] = fp8_tensor(shape)
            group[name + SCALE] = torch.rand(fp8.block_shape(*shape), generator=g) * 1e-3
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scale-bench"))
    ap.add_argument("--json", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the workdir (checkpoint and export) afterwards")
    ap.add_argument("--reuse", action="store_true", help="reuse WORKDIR/ckpt from an earlier --keep run")
    args = ap.parse_args()
    work: Path = args.workdir
    reuse = args.reuse and (work / "ckpt" / "model.safetensors.index.json").is_file()
    for old in ([work / "tiny", work / "export", work / "copy"] if reuse else [work]):
        shutil.rmtree(old, ignore_errors=True)
    r1c = [sys.executable, "-m", "r1c.cli"]
    try:
        config = synthetic_config(args.layers, args.experts)
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
            "checkpoint": {"layers": args.layers, "experts": args.experts, "shards": len(shards),
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
        if args.json:
            args.json.write_text(text + "\n")
        return 0 if all(ok.values()) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
