"""`r1c::MoEExperts`'s definition: name, inputs, outputs and attributes (no torch: the passes and `r1c passes`
read it without loading a framework). See shared ARCHITECTURE.md for the contract."""

from __future__ import annotations

from r1c.plugins import OpSpec

SPEC = OpSpec(
    name="MoEExperts",
    inputs=("hidden", "topk_weights", "topk_ids", "w13", "w2"),
    optional_inputs=("w13_scale", "w2_scale"),
    outputs=("output",),
    attributes={"quant": "none", "activation": "swiglu"},
)

QUANT_MODES = ("none", "fp8_block128")
