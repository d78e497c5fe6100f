"""Kernels, TensorRT plugin registrations and CPU references for the r1c custom ops.

One package per op; each holds the op's single definition (`SPEC`), which the exporter, the passes and
the plugin registrations all read, so the name, namespace, version and attributes cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

R1C_DOMAIN = "r1c"
R1C_OPSET_VERSION = 1
PLUGIN_NAMESPACE = "r1c"


@dataclasses.dataclass(frozen=True)
class OpSpec:
    name: str
    inputs: tuple[str, ...]  # in order; optional inputs last
    optional_inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, Any]  # name -> default value (its Python type is the ONNX attribute type)
    domain: str = R1C_DOMAIN
    version: int = R1C_OPSET_VERSION

    @property
    def plugin_id(self) -> str:
        """The `ns::name` id of the TensorRT plugin that implements this op."""
        return f"{PLUGIN_NAMESPACE}::{self.name}"

    def attrs(self, **given: Any) -> dict[str, Any]:
        """The full attribute dict: defaults overridden by `given`; unknown names are an error."""
        unknown = set(given) - set(self.attributes)
        if unknown:
            raise ValueError(f"{self.name}: unknown attributes {sorted(unknown)}")
        return {**self.attributes, **given}
