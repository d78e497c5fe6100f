#!/usr/bin/env python
"""The real DeepSeek-R1 graph without its 690 GB: export, ONNX checker, TensorRT-RTX parse (and build).

1. `r1c export --preset r1 --weights none` writes the full 61-layer graph (FP8 layout, bf16 activations by
   default) with its external-data files as sparse holes.
2. `onnx.checker.check_model` on the file (external data located and sized).
3. In a child process (TensorRT for RTX's parser needs its library on LD_LIBRARY_PATH at start): the
   r1c plugins registered, the r1c function bodies dropped, and the model parsed into a strongly typed
   network through `OnnxParser.load_model_proto` + `load_initializer`: every initializer is handed its own
   range of one anonymous, read-only, never-written memory mapping (the kernel's zero page: no resident
   memory), so the parser never reads or holds 690 GB (DequantizeLinear scales, which the parser checks
   for positivity, get ones: ~1/32 of the 2-D FP8 weights' bytes, really resident). Checked: every r1c
   node became an r1c plugin layer; layer count, I/O dtypes.
4. `--build-layers N`: builds an engine for SM89 (`--compute-capability`) from a cut of the same export: its
   first N decoder layers with R1's per-layer shapes, but `--build-experts` routed experts (default 16) and a
   `--build-vocab` vocabulary (default 16384), because the plan holds the weights (zeros) and a 24 GiB
   machine cannot hold R1's: a weight-stripped plan (R1C_STRIP_PLAN=1: STRIP_PLAN + REFIT_IDENTICAL) fails
   on a CPU-only machine in TensorRT-RTX 1.7 (its Myelin JIT asks CUDA). The child's peak RSS is reported.
Prints one JSON report. Usage:
  python scripts/r1_graph_check.py [--workdir /tmp/scale-r1] [--build-layers 4] [--dtype bfloat16] [--keep]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click


def child(model_path: str, cc: str, build: bool, profile: dict[str, int]) -> dict[str, Any]:
    """Runs in the child: parse (and build) with TensorRT for RTX from user-provided zero initializers."""
    import mmap

    import numpy as np
    import onnx

    from r1c.config import ModelConfig
    from r1c.plugins.tensorrt_common import register_plugins
    from r1c.runtime import trt_build as tb
    from r1c.runtime import trt_lib

    trt = trt_lib.import_tensorrt_rtx()
    register_plugins(trt)
    path = Path(model_path)
    config = ModelConfig.from_json(path.parent / "config.json")
    model = onnx.load(str(path), load_external_data=False)
    r1c_nodes = [(n.name, n.op_type) for n in model.graph.node if n.domain == "r1c"]
    del model.functions[:]  # as the tensorrt lowering does: every parser version binds the plugin
    sizes = {}
    for t in model.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            sizes[t.name] = int({e.key: e.value for e in t.external_data}["length"])
    # one read-only anonymous mapping, a distinct page-aligned range per initializer (TensorRT keys weights by
    # address): address space only, every page the kernel's zero page, nothing resident
    offsets, end = {}, 0
    for name, size in sizes.items():
        offsets[name] = end
        end += -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
    zero = mmap.mmap(-1, end, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ)
    base = _mmap_address(zero)
    # the parser checks DequantizeLinear scales (> 0): those (float32, ~1/32 of a 2-D FP8 weight) hold 1.0
    dq_scales = {n.input[1] for n in model.graph.node if n.op_type == "DequantizeLinear"} & set(sizes)
    ones = np.ones(sum(sizes[n] // 4 for n in dq_scales) or 1, dtype=np.float32)
    at = 0
    for name in sorted(dq_scales):
        offsets[name] = int(ones.ctypes.data) + at - base
        at += sizes[name]
    t0 = time.perf_counter()
    log = trt_lib.make_logger(trt)
    builder = trt.Builder(log)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, log)
    if not parser.load_model_proto(model.SerializeToString(), str(path)):
        return {"error": "load_model_proto failed: " + "; ".join(log.errors)}
    for name, size in sizes.items():
        if not parser.load_initializer(name, base + offsets[name], size):
            return {"error": f"load_initializer({name}) failed: " + "; ".join(log.errors)}
    if not parser.parse_model_proto():
        errs = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        return {"error": "parse failed: " + "; ".join(errs)}
    parse_s = time.perf_counter() - t0
    layers = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.PLUGIN_V3:
            layer.__class__ = trt.IPluginV3Layer
            plugin = layer.plugin
            layers.append({"name": layer.name, "plugin": f"{plugin.plugin_namespace}::{plugin.plugin_name}"})
    tb.require_plugin_layers(r1c_nodes, layers)
    io = {network.get_input(i).name: network.get_input(i).dtype.name for i in range(network.num_inputs)}
    io.update({network.get_output(i).name: network.get_output(i).dtype.name for i in range(network.num_outputs)})
    report: dict[str, Any] = {
        "tensorrt": f"{trt.__name__} {trt_lib.module_version(trt)}", "onnx_nodes": len(model.graph.node),
        "network_layers": network.num_layers, "plugin_layers": len(layers), "r1c_nodes": len(r1c_nodes),
        "initializers_user_provided": len(sizes), "weight_bytes_not_read": int(np.sum(list(sizes.values()))),
        "dequantize_scales_provided_as_ones_bytes": int(ones.nbytes),
        "io_dtypes": {k: io[k] for k in ("past_c.0", "new_c", "logits") if k in io},
        "parse_seconds": round(parse_s, 2), "decoder_layers": config.num_hidden_layers,
    }
    if not build:
        return report
    cfg = builder.create_builder_config()
    tb._set_compute_capability(trt, cfg, tb.parse_compute_capability(cc))
    if os.environ.get("R1C_STRIP_PLAN", "0") == "1":  # measured: TRT-RTX 1.7's Myelin JIT then needs CUDA
        cfg.set_flag(trt.BuilderFlag.STRIP_PLAN)
        cfg.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    prof = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    for name, shapes in tb.profile_shapes(config, names, profile).items():
        prof.set_shape(name, shapes["min"], shapes["opt"], shapes["max"])
    cfg.add_optimization_profile(prof)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, cfg)
    report["build_seconds"] = round(time.perf_counter() - t0, 2)
    report["compute_capability"] = cc
    report["engine_bytes"] = None if plan is None else plan.nbytes
    if plan is None:
        report["build_error"] = "; ".join(log.errors) or "no detail"
    return report


def _mmap_address(buffer: Any) -> int:
    """The address of a (read-only) mapping, through numpy's view of it."""
    import numpy as np

    return int(np.frombuffer(buffer, dtype=np.uint8).__array_interface__["data"][0])


@click.command(help=(__doc__ or "").splitlines()[0])
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=Path("/tmp/scale-r1"),
              show_default=True, help="scratch directory (emptied first; removed at the end unless --keep)")
@click.option("--dtype", default="bfloat16", show_default=True, help="activation dtype of the export")
@click.option("--build-layers", type=int, default=-1, show_default=True,
              help="-1: parse only; 0: build all layers; N: first N")
@click.option("--build-experts", type=int, default=16, show_default=True,
              help="routed experts of the built cut (R1: 256)")
@click.option("--build-vocab", type=int, default=16384, show_default=True,
              help="vocabulary of the built cut (R1: 129280)")
@click.option("--compute-capability", default="SM89", show_default=True, help="TensorRT-RTX build target")
@click.option("--keep", is_flag=True, help="keep --workdir")
@click.option("--child", nargs=3, default=None, hidden=True)  # MODEL CC BUILD: the parse/build child process
def main(**options: Any) -> None:
    sys.exit(run(SimpleNamespace(**options)))


def run(args: SimpleNamespace) -> int:
    """The check with the parsed options (`main`'s); prints the JSON report, returns the exit status."""
    profile = {"max_batch": 4, "max_seq": 32, "max_capacity": 256}
    if args.child:
        try:
            report = child(args.child[0], args.child[1], args.child[2] == "1", profile)
        except Exception as e:
            report = {"error": f"{type(e).__name__}: {e}"}
        print("REPORT " + json.dumps(report), flush=True)
        return 0
    from r1c.runtime import trt_lib

    work: Path = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        export = work / "r1"
        subprocess.run([sys.executable, "-m", "r1c.cli", "export", "--preset", "r1", "--weights", "none",
                        "--dtype", args.dtype, "--no-progress", "-o", str(export)], check=True)
        export_s = time.perf_counter() - t0
        import onnx

        t0 = time.perf_counter()
        onnx.checker.check_model(str(export / "model.onnx"))
        check_s = time.perf_counter() - t0
        data = sorted(p for p in export.iterdir() if ".data" in p.name)
        result: dict[str, Any] = {
            "export_seconds": round(export_s, 1), "onnx_checker": "passed", "checker_seconds": round(check_s, 1),
            "data_files": len(data), "data_bytes_apparent": sum(p.stat().st_size for p in data),
            "data_bytes_on_disk": sum(p.stat().st_blocks * 512 for p in data),
        }
        libs = work / "lib"
        libs.mkdir()
        trt_lib.link_rtx_library(trt_lib.rtx_library_dir(), libs)
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in (str(libs),
                                                                            os.environ.get("LD_LIBRARY_PATH")) if p)}
        build = args.build_layers >= 0
        target = export
        if build and args.build_layers > 0:
            target = work / f"r1-{args.build_layers}layers"
            subprocess.run([sys.executable, "-c", _CUT, str(target), str(args.build_layers), args.dtype,
                            str(args.build_experts), str(args.build_vocab)], check=True)
        for what, model_dir, do_build in (("parse_full_r1", export, False),) + (
                (("build", target, True),) if build else ()):
            start = time.perf_counter()
            proc = subprocess.Popen([sys.executable, __file__, "--child", str(model_dir / "model.onnx"),
                                     args.compute_capability, "1" if do_build else "0"], env=env,
                                    stdout=subprocess.PIPE, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            out = proc.stdout.read() if proc.stdout else ""
            line = [ln for ln in out.splitlines() if ln.startswith("REPORT ")]
            report = json.loads(line[-1][7:]) if line else {"error": f"child exit {status}: {out[-500:]}"}
            report["child_seconds"] = round(time.perf_counter() - start, 1)
            report["child_peak_rss_bytes"] = usage.ru_maxrss * 1024
            result[what] = report
        print(json.dumps(result, indent=2))
        return 0 if all("error" not in v for v in result.values() if isinstance(v, dict)) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


_CUT = """
import sys
from pathlib import Path
from r1c.config import preset
from r1c.exporter.onnx_export import export_onnx
from r1c.exporter.tensor_source import ShapeSource
from r1c.cli import _canonicalize
import torch
config = preset("r1").replace(num_hidden_layers=int(sys.argv[2]), n_routed_experts=int(sys.argv[4]),
                              n_group=4 if int(sys.argv[4]) < 256 else 8, vocab_size=int(sys.argv[5]))
dtype = sys.argv[3]
export_onnx(config, ShapeSource(config, getattr(torch, dtype)), Path(sys.argv[1]), dtype=dtype,
            write_weights=False, progress=False, postprocess=_canonicalize)
"""


if __name__ == "__main__":
    main()
