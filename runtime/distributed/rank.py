"""One rank's share of a sharded ONNX Runtime bundle, run with its collectives in one of two ways.

    custom_op  the rank's whole model in one session; the collectives are the onnxruntime-extensions Python ops
               of `ort_collectives`, which call torch.distributed from inside ONNX Runtime's graph execution.
    split      the model cut at its collectives (`segments.split`): one session per sub-graph; Python runs the
               collectives between them with torch.distributed (`collectives`).
Both compute the same thing. Measured side by side in one process with no peer (scripts/dist_mechanisms.py,
rank 0 of TP2, batch 1): a decode step costs custom_op 0.71x split on the tiny preset and 0.93x on the small one
(one session run instead of 9 sub-graph runs), but a 64-token prefill 1.64x and 2.20x (onnxruntime-extensions
hands a Python op's output back through a Python list, so its cost grows with the tensor: the logits all-gather
most). `split` is the default: its cost does not grow with the tensors and it needs no extra package; with
several processes on the 2 shared cores here both are dominated by the wait in gloo (3-8 ms a collective).
Inputs are bound in place (the KV cache is never copied in), as in `r1c.runtime.ort_backend`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from r1c.errors import BundleError
from r1c.plugins.all_gather import SPEC as ALL_GATHER
from r1c.runtime.distributed.collectives import all_gather, all_reduce
from r1c.runtime.ort_backend import OrtBackend, _address, _element_type, session_options
from r1c.runtime.step import StepIO

logger = logging.getLogger(__name__)

MECHANISMS = ("split", "custom_op")
EXTERNAL_DATA_FOLDER = "session.model_external_initializers_file_folder_path"


def _error(model: Path, e: Exception) -> BundleError:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return BundleError(f"bundle: ONNX Runtime could not load {model.name}: {msg}")


class CustomOpRank(OrtBackend):
    """The rank's model in one session, with the collectives as Python custom ops; run as `OrtBackend` runs a
    one-rank bundle (`step(io)` binds every input and output by address)."""

    def _session_options(self, options: dict[str, Any]) -> Any:
        from r1c.runtime.distributed.ort_collectives import register

        return register(session_options(options))


class SplitRank:
    """The rank's model as sub-graphs between its collectives; the collectives run here, in Python."""

    def __init__(self, model_path: Path, options: dict[str, Any]) -> None:
        import onnx_ir as ir
        import onnxruntime as ort

        from r1c.runtime.distributed.segments import Segment, split

        self.steps = split(ir.load(model_path))
        self.output_names = [name for name in _graph_outputs(model_path)]
        self.sessions: dict[int, Any] = {}
        self._parts: dict[int, list[Any]] = {}  # per AllGather step: its receive buffers, reused while shapes hold
        for i, step in enumerate(self.steps):
            if isinstance(step, Segment):
                so = session_options(options)
                so.add_session_config_entry(EXTERNAL_DATA_FOLDER, str(model_path.parent))
                proto = ir.serde.serialize_model(step.model).SerializeToString()
                try:
                    self.sessions[i] = ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"])
                except Exception as e:
                    raise _error(model_path, e) from None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run once; the outputs are new arrays."""
        env = self._execute(dict(feeds), {})
        return {name: env[name] for name in self.output_names}

    def step(self, io: StepIO) -> None:
        """Run once on a step's buffers (`r1c.runtime.step`): every graph output is written straight into the io's
        buffer — bound by address on the sub-graph that makes it, or gathered into it by the collective that makes
        it — so the outputs are neither allocated nor copied; the inputs are bound in place as by `run`."""
        self._execute(dict(io.feeds()), io.outputs())

    def _execute(self, env: dict[str, np.ndarray], out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the steps over the values `env` (by name); graph outputs named in `out` go into those buffers."""
        import onnxruntime as ort

        from r1c.runtime.distributed.segments import Collective

        for i, step in enumerate(self.steps):
            if isinstance(step, Collective):
                x = env[step.input]
                target = out.get(step.output)
                if step.op == ALL_GATHER.name:
                    env[step.output] = all_gather(x, step.group, step.axis, step.group_size, out=target,
                                                  parts=self._parts.setdefault(i, []))
                else:
                    env[step.output] = all_reduce(x, step.group)
                    if target is not None:
                        target[...] = env[step.output]
                        env[step.output] = target
                continue
            session = self.sessions[i]
            binding = session.io_binding()
            for name in step.inputs:
                arr = env[name]
                if not arr.flags.c_contiguous:
                    arr = env[name] = np.ascontiguousarray(arr)
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr))
            made = [name for name in step.outputs if name not in out]
            for name in step.outputs:
                if name in out:  # a graph output: into the caller's buffer
                    arr = out[name]
                    binding.bind_output(name, "cpu", 0, _element_type(arr.dtype), arr.shape, _address(name, arr))
                    env[name] = arr
                else:
                    binding.bind_output(name, "cpu")
            session.run_with_iobinding(binding)
            if made:
                values = dict(zip(step.outputs, binding.get_outputs(), strict=True))
                env.update({name: values[name].numpy() for name in made})
        return env


def _graph_outputs(model_path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(model_path), load_external_data=False).graph.output]


def rank_runner(model_path: Path, options: dict[str, Any], mechanism: str) -> CustomOpRank | SplitRank:
    if mechanism not in MECHANISMS:
        raise BundleError(f"bundle: unknown collective mechanism {mechanism!r} (choose from {', '.join(MECHANISMS)})")
    if not model_path.is_file():
        raise BundleError(f"bundle: rank model {model_path.name} is missing")
    return CustomOpRank(model_path, options) if mechanism == "custom_op" else SplitRank(model_path, options)
