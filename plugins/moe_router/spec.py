"""`r1c::MoERouter`'s definition: name, inputs, outputs and attributes (no torch: the passes and `r1c passes`
read it without loading a framework). See shared ARCHITECTURE.md for the contract."""

from __future__ import annotations

from r1c.plugins import OpSpec

SPEC = OpSpec(
    name="MoERouter",
    inputs=("hidden", "gate_weight", "correction_bias"),
    optional_inputs=(),
    outputs=("topk_weights", "topk_ids"),
    attributes={
        "top_k": 8,
        "n_group": 8,
        "topk_group": 4,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": 1,
        "scoring": "sigmoid",
    },
)
