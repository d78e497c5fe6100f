"""The pass pipeline of one rank: the target's pipeline (`pipelines.PIPELINES`) with the sharding steps inserted.

    onnxruntime  ... fuse_moe_experts, [shard_model], fuse_rmsnorm, fuse_swiglu, remove_dead_code,
                 [shard_lower_moe_to_ort], lower_moe_to_ort, [shard_lower_collectives_to_ort], inline_r1c_functions ...
    tensorrt     ... drop_r1c_function_bodies, [shard_model], check_tensorrt_ops ...
    r1c          ... fuse_moe_experts, [shard_model], ...
Sharding comes after the MoE fusions (whose postconditions check that r1c nodes have function bodies, which the
collectives never have) and before the SwiGLU fusion (which merges gate and up weights that sharding slices).
For TensorRT it comes after the function bodies are dropped (that pass only knows the MoE ops' specs).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import onnx_ir as ir

from r1c.config import ModelConfig
from r1c.errors import PassError, R1CError
from r1c.passes.pipelines import _r1c_cause, pass_name, pipeline, save_model
from r1c.passes.shard_layout import ShardLayout
from r1c.passes.shard_lower_collectives_to_ort import LowerCollectivesToOrtPass
from r1c.passes.shard_lower_moe_to_ort import LowerShardedMoEToOrtPass
from r1c.passes.shard_model import ShardModelPass

logger = logging.getLogger(__name__)

# target -> (pass after which the model is sharded, [(pass name, lowering inserted before it)])
_INSERTIONS: dict[str, tuple[str, list[tuple[str, type[ir.passes.PassBase]]]]] = {
    "r1c": ("fuse_moe_experts", []),
    "onnxruntime": ("fuse_moe_experts", [("lower_moe_to_ort", LowerShardedMoEToOrtPass),
                                         ("inline_r1c_functions", LowerCollectivesToOrtPass)]),
    "tensorrt": ("drop_r1c_function_bodies", []),
}


def sharded_pipeline(target: str, config: ModelConfig, layout: ShardLayout, rank: int) -> list[ir.passes.PassBase]:
    """Fresh pass instances for `rank` of `layout` on `target`, in order."""
    passes = pipeline(target)
    if target not in _INSERTIONS:
        raise PassError(f"passes: no sharded pipeline for target {target!r}")
    after, before = _INSERTIONS[target]
    names = [pass_name(p) for p in passes]
    for name, factory in before:
        passes.insert(names.index(name), factory())
        names = [pass_name(p) for p in passes]
    passes.insert(names.index(after) + 1, ShardModelPass(config, layout, rank))
    return passes


def run_sharded_pipeline(model: ir.Model, target: str, config: ModelConfig, layout: ShardLayout, rank: int,
                         *, verbose: bool = False) -> ir.Model:
    """Run rank `rank`'s pipeline on `model`; a failing pass raises PassError naming itself."""
    passes = sharded_pipeline(target, config, layout, rank)
    level = logging.INFO if verbose else logging.DEBUG
    for index, pass_ in enumerate(passes):
        name = pass_name(pass_)
        start = time.perf_counter()
        try:
            model = pass_(model).model
        except R1CError:
            raise
        except Exception as e:
            cause = _r1c_cause(e)  # an r1c error raised in a requires/ensures, wrapped by onnx_ir
            if cause is not None:
                raise cause from e
            raise PassError(f"pass {name} ({index + 1}/{len(passes)} of {target}, rank {rank} of {layout}) failed: "
                            f"{type(e).__name__}: {e}") from e
        logger.log(level, "rank %d: %2d %-34s %6.2fs %5d nodes", rank, index, name, time.perf_counter() - start,
                   len(model.graph))
    return model


def lower_rank_file(src: str | Path, dst: str | Path, *, target: str, config: ModelConfig, layout: ShardLayout,
                    rank: int, verbose: bool = False) -> Path:
    """Load `src` (weights stay on disk, read lazily), shard and lower it for `rank`, write `dst` (+ `dst.data`).

    Only the rank's slice of each weight is read, one tensor at a time, while `dst.data` is written.
    """
    src = Path(src)
    try:
        model = ir.load(src)
    except Exception as e:
        raise PassError(f"passes: cannot read {src} as ONNX ({type(e).__name__}: {e})") from e
    model = run_sharded_pipeline(model, target, config, layout, rank, verbose=verbose)
    return save_model(model, dst)
