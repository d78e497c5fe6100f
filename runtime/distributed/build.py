"""`r1c build --tensor-parallel T --expert-parallel E`: one bundle holding every rank's engine files.

Layout of the bundle (flat, so the manifest's file list and hashes cover every rank):
    manifest.json                  world size, layout, groups, each rank's files (`target_options.distributed`)
    model.rank{r}.onnx (+ .data)   onnxruntime: rank r's lowered model and its weights
    model.rank{r}.engine           tensorrt: rank r's engine
Ranks are built one after another; each loads the export lazily (`onnx_ir.load`: weights stay on disk) and
writes only its own slices, tensor by tensor (see `r1c.passes.shard_util`), so no process ever holds the whole
model: peak memory is about one rank's largest tensor, plus ONNX Runtime's check of that rank's model.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from tqdm import tqdm

from r1c.config import ModelConfig
from r1c.errors import BuildError
from r1c.passes.shard_layout import ShardLayout

logger = logging.getLogger(__name__)

MECHANISM = "split"  # how ONNX Runtime ranks run their collectives by default (rank.MECHANISMS)


def rank_model_file(rank: int) -> str:
    return f"model.rank{rank}.onnx"


def rank_engine_file(rank: int) -> str:
    return f"model.rank{rank}.engine"


def build_ranks(export_dir: Path, out: Path, config: ModelConfig, *, target: str, tensor_parallel: int,
                expert_parallel: int, session: dict[str, Any] | None = None, verbose: bool = False,
                progress: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """Write every rank's files into `out`; returns the manifest's (target_options, libraries)."""
    from r1c.errors import PassError

    layout = ShardLayout(tensor_parallel, expert_parallel)
    try:
        layout.check(config)
    except PassError as e:
        raise BuildError(f"build: {e}") from None
    dtype = json.loads((export_dir / "graph_io.json").read_text()).get("kv_cache", {}).get("dtype", "float32")
    if target == "onnxruntime" and dtype != "float32":
        # the collectives hand arrays between ONNX Runtime and torch as numpy, which has no bfloat16 of its own
        raise BuildError(f"build: sharded onnxruntime bundles need a float32 export; this one is {dtype} "
                         "(r1c export --dtype float32)")
    ranks: list[dict[str, Any]] = []
    libraries: dict[str, str] = {}
    target_options: dict[str, Any] = {}
    bar = tqdm(range(layout.world_size), desc=f"build {layout}", unit="rank", disable=not progress)
    for rank in bar:
        if target == "onnxruntime":
            entry, libraries, target_options = _onnxruntime_rank(export_dir, out, config, layout, rank, session,
                                                                 verbose)
        else:
            entry, libraries, target_options = _tensorrt_rank(export_dir, out, config, layout, rank, verbose)
        ranks.append(entry)
        gc.collect()  # drop the rank's model (and the mapped export) before the next one
    target_options["distributed"] = {**layout.to_dict(), "ranks": ranks, "collectives": MECHANISM,
                                     "backend": "gloo" if target == "onnxruntime" else "nccl"}
    return target_options, libraries


def _onnxruntime_rank(export_dir: Path, out: Path, config: ModelConfig, layout: ShardLayout, rank: int,
                      session: dict[str, Any] | None, verbose: bool) -> tuple[dict[str, Any], dict[str, str],
                                                                             dict[str, Any]]:
    import onnxruntime as ort

    from r1c.passes.shard_pipelines import lower_rank_file
    from r1c.runtime.distributed.rank import rank_runner
    from r1c.runtime.ort_backend import DEFAULT_OPTIONS

    name = rank_model_file(rank)
    lower_rank_file(export_dir / "model.onnx", out / name, target="onnxruntime", config=config, layout=layout,
                    rank=rank, verbose=verbose)
    options = {**DEFAULT_OPTIONS, **(session or {})}
    rank_runner(out / name, options, MECHANISM)  # ONNX Runtime loads it (nothing runs): never a dead bundle
    gc.collect()
    entry = {"rank": rank, "model": name, "files": [name, name + ".data"]}
    return entry, {"onnxruntime": ort.__version__}, {"session": options}


def _tensorrt_rank(export_dir: Path, out: Path, config: ModelConfig, layout: ShardLayout, rank: int,
                   verbose: bool) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """Not verified here (no TensorRT on this machine): the rank's lowered model -> its engine, with the
    collective plugins registered (they bind to the NCCL communicator when the engine runs)."""
    from r1c.passes.shard_pipelines import lower_rank_file
    from r1c.runtime.distributed.trt import group_sizes, register_collective_plugins
    from r1c.runtime.trt_build import ENGINE_FILE, MODEL_FILE, build_tensorrt, import_tensorrt

    trt = import_tensorrt()
    register_collective_plugins(trt, group_sizes(layout.to_dict()))
    work = out / f".rank{rank}"
    work.mkdir()
    lower_rank_file(export_dir / "model.onnx", work / MODEL_FILE, target="tensorrt", config=config, layout=layout,
                    rank=rank, verbose=verbose)
    options, libraries = build_tensorrt(work, config, module=trt)
    name = rank_engine_file(rank)
    (work / ENGINE_FILE).replace(out / name)
    shutil.rmtree(work)
    return {"rank": rank, "engine": name, "files": [name]}, libraries, {k: v for k, v in options.items()
                                                                         if k != "engine"}
