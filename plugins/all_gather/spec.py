"""`r1c::AllGather`'s definition: name, inputs, outputs and attributes (no torch: the passes and `r1c passes`
read it without loading a framework). The contract is in reference.py and shared ARCHITECTURE.md."""

from __future__ import annotations

from r1c.plugins import OpSpec

SPEC = OpSpec(
    name="AllGather",
    inputs=("input",),
    optional_inputs=(),
    outputs=("output",),
    attributes={"group": "tp", "axis": -1, "group_size": 0},
)
