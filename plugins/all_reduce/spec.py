"""`r1c::AllReduce`'s definition: name, inputs, outputs and attributes (no torch: the passes and `r1c passes`
read it without loading a framework). The contract is in reference.py and shared ARCHITECTURE.md."""

from __future__ import annotations

from r1c.plugins import OpSpec

SPEC = OpSpec(
    name="AllReduce",
    inputs=("input",),
    optional_inputs=(),
    outputs=("output",),
    attributes={"group": "tp", "reduction": "sum"},
)

REDUCTIONS = ("sum",)
