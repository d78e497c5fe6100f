"""Run every rank of a sharded model in ONE process, in lockstep, with the collectives' PyTorch references.

A check of the sharding itself, apart from process groups and launchers: each rank's model is split at its
collectives (`segments.split`), every rank runs up to its next collective, then `all_reduce_reference` /
`all_gather_reference` combine the ranks' values. Used by the unit tests of the sharding passes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch

from r1c.passes.shard_layout import ShardLayout
from r1c.plugins.all_gather import SPEC as ALL_GATHER
from r1c.plugins.all_gather import all_gather_reference
from r1c.plugins.all_reduce import all_reduce_reference
from r1c.runtime.distributed.segments import Collective, Segment, split


def _session(model: ir.Model, base_dir: str | None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    if base_dir is not None:  # external tensors stay where they are; ORT reads them from there
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", base_dir)
    return ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), so,
                                providers=["CPUExecutionProvider"])


def run_lockstep(models: Sequence[ir.Model], layout: ShardLayout, feeds: Mapping[str, np.ndarray], *,
                 base_dir: str | None = None) -> list[dict[str, np.ndarray]]:
    """Each rank's outputs (by graph output name) for the same `feeds`; models[r] is rank r's model.

    `base_dir`: where the models' external data lives (the directory of the file they were loaded from).
    """
    plans = [split(m) for m in models]
    sessions: list[dict[int, Any]] = [{i: _session(st.model, base_dir) for i, st in enumerate(p)
                                       if isinstance(st, Segment)} for p in plans]
    env: list[dict[str, np.ndarray]] = [dict(feeds) for _ in models]
    cursor = [0] * len(models)
    while True:
        pending: list[Collective | None] = []
        for r, plan in enumerate(plans):  # run each rank up to its next collective
            while cursor[r] < len(plan) and isinstance(plan[cursor[r]], Segment):
                seg = plan[cursor[r]]
                assert isinstance(seg, Segment)
                outs = sessions[r][cursor[r]].run(seg.outputs, {k: env[r][k] for k in seg.inputs})
                env[r].update(zip(seg.outputs, outs))
                cursor[r] += 1
            step = plan[cursor[r]] if cursor[r] < len(plan) else None
            pending.append(step if isinstance(step, Collective) else None)
        if all(p is None for p in pending):
            break
        if any(p is None or (p.op, p.group) != (pending[0].op, pending[0].group) for p in pending):  # type: ignore[union-attr]
            raise AssertionError(f"ranks disagree on the next collective: {pending}")
        for members in layout.groups()[pending[0].group]:  # type: ignore[union-attr]
            parts = [torch.from_numpy(env[r][pending[r].input]) for r in members]  # type: ignore[union-attr]
            step0 = pending[members[0]]
            assert step0 is not None
            if step0.op == ALL_GATHER.name:
                assert step0.group_size == len(members), (step0, members)
                result = all_gather_reference(parts, axis=step0.axis).numpy()
            else:
                result = all_reduce_reference(parts).numpy()
            for r in members:
                env[r][pending[r].output] = result.copy()  # type: ignore[union-attr]
        cursor = [c + 1 for c in cursor]
    return [{str(v.name): env[r][str(v.name)] for v in m.graph.outputs} for r, m in enumerate(models)]
