"""TensorRT ranks of a sharded bundle (`tensorrt` or `tensorrt-rtx`, collectives over NCCL).

`TensorRTRank(bundle, manifest, rank)`: rank r's engine (`model.rank{r}.engine`) run by the one TensorRT backend
(`r1c.runtime.trt_backend.TensorRTBackend`: the bundle's kernel library, every r1c plugin registered, the
collectives among them), on cuda:LOCAL_RANK. Its `r1c::AllReduce` / `r1c::AllGather` layers find their groups in
`groups.GROUPS` (NCCL), which `launch` initialises before any rank loads its engine. Engines executing over NCCL
are NOT verified here (no GPUs on this machine): `scripts/dist_gpu_check.sh` is the command for a machine with
several GPUs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from r1c.manifest import Manifest


class TensorRTRank:
    """Rank r's engine, as `TensorRTBackend` runs a one-rank bundle's, with the rank's engine file."""

    def __init__(self, bundle: Path, manifest: Manifest, rank: int) -> None:
        from r1c.runtime.trt_backend import TensorRTBackend

        dist_opts = manifest.target_options["distributed"]
        rank_options = {**manifest.target_options, "engine": dist_opts["ranks"][rank]["engine"]}
        self.backend = TensorRTBackend(bundle, dataclasses.replace(manifest, target_options=rank_options))

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.backend.run(feeds)
