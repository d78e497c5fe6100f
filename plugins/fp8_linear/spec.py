"""`r1c::FP8Linear`'s definition: name, inputs, outputs and attributes (no torch: the passes and `r1c passes`
read it without loading a framework). The contract is in reference.py and shared ARCHITECTURE.md."""

from __future__ import annotations

from r1c.plugins import OpSpec
from r1c.plugins.fp8 import BLOCK

SPEC = OpSpec(
    name="FP8Linear",
    inputs=("x", "weight", "weight_scale"),
    optional_inputs=(),
    outputs=("y",),
    attributes={"block_size": BLOCK},
)
