"""`r1c build --tensor-parallel T --expert-parallel E`: one bundle holding every rank's engine files.

Layout of the bundle (flat, so the manifest's file list and hashes cover every rank):
    manifest.json                  world size, layout, groups, each rank's files (`target_options.distributed`)
    model.rank{r}.onnx (+ .data)   onnxruntime: rank r's lowered model and its weights
    model.rank{r}.engine           tensorrt / tensorrt-rtx: rank r's engine
    kernels/                       tensorrt / tensorrt-rtx: one kernel library with every rank's r1c kernels
Ranks are built one after another; each loads the export lazily (`onnx_ir.load`: weights stay on disk) and
writes only its own slices, tensor by tensor (see `r1c.passes.shard_util`), so no process ever holds the whole
model: peak memory is about one rank's largest tensor, plus ONNX Runtime's check of that rank's model.
A TensorRT rank is built exactly as a one-rank bundle is (`r1c.runtime.build.build_tensorrt_target`: kernel library
for `--arch`, parse with every r1c node a plugin, the collectives included, engine streamed to disk) in a work
directory; its engine and kernels then join the bundle (kernels that ranks share are stored once).
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
                progress: bool = False, arch: str | None = None,
                tensorrt_options: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, str]]:
    """Write every rank's files into `out`; returns the manifest's (target_options, libraries).

    `arch`, `tensorrt_options`: as for a one-rank TensorRT bundle (`r1c.runtime.build.build_bundle`)."""
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
    if (tensorrt_options or {}).get("keep_onnx"):
        raise BuildError("build: keep_onnx is not supported for sharded bundles (each rank's ONNX is built in a "
                         "work directory); build the ranks' models with r1c.passes.shard_pipelines.lower_rank_file")
    ranks: list[dict[str, Any]] = []
    libraries: dict[str, str] = {}
    target_options: dict[str, Any] = {}
    bar = tqdm(range(layout.world_size), desc=f"build {layout}", unit="rank", disable=not progress)
    for rank in bar:
        if target == "onnxruntime":
            entry, libraries, target_options = _onnxruntime_rank(export_dir, out, config, layout, rank, session,
                                                                 verbose)
        else:
            entry, libraries, target_options = _tensorrt_rank(export_dir, out, config, layout, rank, target=target,
                                                              arch=arch, options=tensorrt_options, verbose=verbose)
        ranks.append(entry)
        gc.collect()  # drop the rank's model (and the mapped export) before the next one
    if target != "onnxruntime":
        target_options["kernels_compiled"] = _merge_kernel_indexes(out, layout.world_size)
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


# what differs between the ranks of a TensorRT bundle: kept in each rank's entry, not in the bundle's options
_PER_RANK = ("engine", "layers", "plugin_layers", "plugins", "plugin_output_dtypes", "kernels_compiled", "seconds")


def _tensorrt_rank(export_dir: Path, out: Path, config: ModelConfig, layout: ShardLayout, rank: int, *, target: str,
                   arch: str | None, options: dict[str, Any] | None, verbose: bool
                   ) -> tuple[dict[str, Any], dict[str, str], dict[str, Any]]:
    """Rank r's lowered model -> its engine and kernels, by the one-rank TensorRT build; the engine becomes
    model.rank{r}.engine, the kernels join the bundle's kernels/ (index part `index.rank{r}.json`)."""
    from r1c.passes.shard_pipelines import lower_rank_file
    from r1c.runtime.build import build_tensorrt_target
    from r1c.runtime.trt_build import ENGINE_FILE, KERNELS_DIR, MODEL_FILE

    work = out / f".rank{rank}"
    work.mkdir()
    lower_rank_file(export_dir / "model.onnx", work / MODEL_FILE, target="tensorrt", config=config, layout=layout,
                    rank=rank, verbose=verbose)
    built, libraries = build_tensorrt_target(work, config, target=target, arch=arch, options=options)
    name = rank_engine_file(rank)
    (work / ENGINE_FILE).replace(out / name)
    _add_kernels(work / KERNELS_DIR, out / KERNELS_DIR, rank)
    shutil.rmtree(work)
    entry = {"rank": rank, "files": [name], **{k: built[k] for k in _PER_RANK if k in built}}
    entry["engine"] = name  # the bundle's name for it (the work directory's was model.engine)
    return entry, libraries, {k: v for k, v in built.items() if k not in _PER_RANK}


def _add_kernels(src: Path, dst: Path, rank: int) -> None:
    """Move a rank's kernel library into the bundle's: cubins another rank already stored (same key, so the same
    kernel) are not stored twice; its index becomes part `index.rank{r}.json` (`_merge_kernel_indexes`)."""
    from r1c.plugins.kernel_library import INDEX_FILE

    dst.mkdir(exist_ok=True)
    for f in src.iterdir():
        if f.name == INDEX_FILE:
            f.replace(dst / f"index.rank{rank}.json")
        elif not (dst / f.name).exists():
            f.replace(dst / f.name)


def _merge_kernel_indexes(out: Path, world_size: int) -> int:
    """Join the ranks' index parts into kernels/index.json (one compute capability, one Triton); its kernel count."""
    from r1c.plugins.kernel_library import merge_indexes
    from r1c.runtime.trt_build import KERNELS_DIR

    merged = merge_indexes(out / KERNELS_DIR, [f"index.rank{r}.json" for r in range(world_size)])
    return len(merged["kernels"])
