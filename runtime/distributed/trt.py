"""TensorRT ranks of a sharded bundle (NCCL): the collective plugins, one engine per rank, and a parse check.

- `register_collective_plugins(trt, group_sizes)`: registers `r1c::AllReduce` / `r1c::AllGather` plugin creators
  (`plugins/all_reduce/tensorrt.py`, `plugins/all_gather/tensorrt.py`) with a TensorRT module, next to the MoE
  plugins; the group sizes come from the layout (the all-gather's output shape needs them when TensorRT builds).
- `TensorRTRank`: rank r's engine (`model.rank{r}.engine`) through `r1c.runtime.trt_backend.TensorRTBackend`,
  on cuda:LOCAL_RANK, its collectives on torch.distributed's NCCL groups (`groups.GROUPS`).
- `python -m r1c.runtime.distributed.trt rtx-check MODEL --config C --group-sizes JSON`: parses (and builds, for
  SM89) one rank's lowered model with TensorRT for RTX, which runs without a GPU: every r1c node, collectives
  included, must become a plugin layer.
Only the parse/build check runs here; engines executing over NCCL are NOT verified (no GPUs on this machine):
`scripts/dist_gpu_check.sh` is the one command for a machine with several GPUs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import numpy as np

from r1c.config import ModelConfig
from r1c.errors import BuildError
from r1c.manifest import Manifest

logger = logging.getLogger(__name__)

_REGISTERED: dict[int, Any] = {}


def register_collective_plugins(trt: types.ModuleType, group_sizes: dict[str, int]) -> None:
    """Register (once per TensorRT module) the collective plugin creators, and the MoE ones."""
    from r1c.plugins.all_gather.tensorrt import AllGatherOp
    from r1c.plugins.all_reduce.tensorrt import AllReduceOp
    from r1c.plugins.tensorrt_common import PLUGIN_NAMESPACE, plugin_classes, register_plugins, version_string

    register_plugins(trt)
    for op_class in (AllReduceOp, AllGatherOp):
        op_class.group_sizes = dict(group_sizes)
    if id(trt) in _REGISTERED:
        return
    registry = trt.get_plugin_registry()
    creators = []
    for op in (AllReduceOp(), AllGatherOp()):
        if registry.get_creator(op.spec.name, version_string(op.spec), PLUGIN_NAMESPACE) is not None:
            raise BuildError(f"tensorrt: a plugin creator is already registered as {op.spec.plugin_id}")
        creator = plugin_classes(trt, op)[1]()
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise BuildError(f"tensorrt: could not register the plugin creator {op.spec.plugin_id}")
        creators.append(creator)  # TensorRT keeps a pointer only: keep them alive
    _REGISTERED[id(trt)] = creators


def group_sizes(layout: dict[str, Any]) -> dict[str, int]:
    return {name: len(ranks[0]) for name, ranks in layout["groups"].items()}


class TensorRTRank:
    """Rank r's engine, as `TensorRTBackend` runs it, with the collective plugins registered first."""

    def __init__(self, bundle: Path, manifest: Manifest, rank: int) -> None:
        from r1c.runtime.trt_backend import TensorRTBackend, _import_tensorrt

        dist_opts = manifest.target_options["distributed"]
        register_collective_plugins(_import_tensorrt(), group_sizes(dist_opts))
        rank_options = {**manifest.target_options, "engine": dist_opts["ranks"][rank]["engine"]}
        self.backend = TensorRTBackend(bundle, dataclasses.replace(manifest, target_options=rank_options))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.backend.run(feeds)


# ---- TensorRT for RTX: the rank's model parses with every r1c node a plugin, on a machine with no GPU ---------
def check_rank_with_tensorrt_rtx(model_path: Path, config: ModelConfig, sizes: dict[str, int], *,
                                 build: bool = True, timeout_s: float = 900.0) -> dict[str, Any]:
    """Run `rtx-check` in a child whose LD_LIBRARY_PATH reaches TensorRT-RTX's parser library (see trt_build)."""
    import r1c
    from r1c.runtime.trt_build import _copy_model, link_rtx_library, rtx_library_dir

    with tempfile.TemporaryDirectory(prefix="r1c-dist-rtx-") as name:
        tmp = Path(name)
        model = _copy_model(model_path, tmp)
        (tmp / "lib").mkdir()
        link_rtx_library(rtx_library_dir(), tmp / "lib")
        (tmp / "config.json").write_text(config.to_json())
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(tmp / "lib"), env.get("LD_LIBRARY_PATH", "")) if p)
        root = str(Path(r1c.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
        report = tmp / "report.json"
        cmd = [sys.executable, "-m", "r1c.runtime.distributed.trt", "rtx-check", str(model), "--config",
               str(tmp / "config.json"), "--group-sizes", json.dumps(sizes), "--report", str(report)]
        proc = subprocess.run(cmd + ([] if build else ["--no-build"]), env=env, capture_output=True, text=True,
                              timeout=timeout_s)
        if not report.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise BuildError(f"build: the TensorRT for RTX check exited with code {proc.returncode}: "
                             f"{' | '.join(tail)}")
        raw = json.loads(report.read_text())
        if "error" in raw:
            raise BuildError(raw["error"])
        return raw


def main(argv: list[str] | None = None) -> int:
    from r1c.runtime.trt_build import DEFAULT_RTX_COMPUTE_CAPABILITY, import_tensorrt_rtx, parse_and_build

    ap = argparse.ArgumentParser(prog="python -m r1c.runtime.distributed.trt")
    sub = ap.add_subparsers(dest="cmd", required=True)
    rc = sub.add_parser("rtx-check", help="parse (and build) one rank's model with TensorRT for RTX")
    rc.add_argument("model", type=Path)
    rc.add_argument("--config", type=Path, required=True)
    rc.add_argument("--group-sizes", required=True, help='JSON, e.g. {"tp": 2, "world": 2}')
    rc.add_argument("--compute-capability", default=DEFAULT_RTX_COMPUTE_CAPABILITY)
    rc.add_argument("--no-build", action="store_true")
    rc.add_argument("--report", type=Path, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        trt = import_tensorrt_rtx()
        register_collective_plugins(trt, json.loads(args.group_sizes))
        report, _ = parse_and_build(trt, args.model, ModelConfig.from_json(args.config), build=not args.no_build,
                                    compute_capability=args.compute_capability)
        args.report.write_text(json.dumps(dataclasses.asdict(report)))
    except BuildError as e:
        args.report.write_text(json.dumps({"error": str(e)}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
