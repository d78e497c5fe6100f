"""`r1c inspect MODEL`: what is in an ONNX model, without reading its external weights.

`inspect_model(path)` returns a JSON-able dict: op histogram, parameters and bytes by dtype, the custom
ops (domain other than ONNX's) with whether each has a model-local function body, is a TensorRT plugin
node (carries `plugin_namespace`) or is left to a runtime's own kernel, and the graph inputs/outputs
with their symbolic dims. `format_report` renders it for a person.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import onnx_ir as ir

from r1c.passes.model_file import read_model

ONNX_DOMAINS = ("", "ai.onnx")


def _op_key(node: ir.Node) -> str:
    return node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}::{node.op_type}"


def _io(value: ir.Value) -> dict[str, Any]:
    dims: list[int | str | None] | None = None
    if value.shape is not None:
        dims = [d if isinstance(d, int) else d.value for d in value.shape.dims]
    return {"name": value.name, "dtype": None if value.dtype is None else value.dtype.name, "shape": dims}


def _custom_ops(model: ir.Model) -> list[dict[str, Any]]:
    nodes: dict[str, list[ir.Node]] = collections.defaultdict(list)
    for node in model.graph.all_nodes():
        if node.domain not in ONNX_DOMAINS:
            nodes[_op_key(node)].append(node)
    ops = []
    for key in sorted(nodes):
        first = nodes[key][0]
        has_body = (first.domain, first.op_type, first.overload) in model.functions
        namespaces = {n.attributes["plugin_namespace"].as_string() for n in nodes[key]
                      if "plugin_namespace" in n.attributes}
        plugin = len(namespaces) == 1 and all("plugin_namespace" in n.attributes for n in nodes[key])
        kind = "plugin" if plugin else "function" if has_body else "runtime kernel"
        ops.append({"op": key, "count": len(nodes[key]), "function_body": has_body, "plugin": plugin,
                    "plugin_namespace": next(iter(namespaces)) if plugin else None, "implemented_by": kind})
    return ops


def _parameters(model: ir.Model) -> dict[str, Any]:
    by_dtype: dict[str, dict[str, int]] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        entry = by_dtype.setdefault(tensor.dtype.name, {"tensors": 0, "parameters": 0, "bytes": 0})
        entry["tensors"] += 1
        entry["parameters"] += tensor.size
        entry["bytes"] += tensor.nbytes
    return {"total": sum(e["parameters"] for e in by_dtype.values()),
            "bytes": sum(e["bytes"] for e in by_dtype.values()),
            "by_dtype": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1]["bytes"]))}


def inspect_model(path: str | Path) -> dict[str, Any]:
    """A JSON-able summary of the model at `path` (its external data is never read)."""
    path = Path(path)
    model = read_model(path, "inspect", weights=False)
    histogram = collections.Counter(_op_key(n) for n in model.graph.all_nodes())
    data_files = sorted({str(t.const_value.location) for t in model.graph.initializers.values()
                         if isinstance(t.const_value, ir.ExternalTensor)})
    return {
        "path": str(path),
        "file_bytes": path.stat().st_size + sum((path.parent / f).stat().st_size for f in data_files
                                                if (path.parent / f).is_file()),
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "opsets": dict(sorted(model.opset_imports.items())),
        "nodes": sum(histogram.values()),
        "op_histogram": dict(sorted(histogram.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": _parameters(model),
        "custom_ops": _custom_ops(model),
        "functions": sorted(f"{d}::{n}" for d, n, _ in model.functions),
        "inputs": [_io(v) for v in model.graph.inputs],
        "outputs": [_io(v) for v in model.graph.outputs],
    }


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def format_report(info: dict[str, Any]) -> str:
    """The summary as text, for a person."""
    p = info["parameters"]
    lines = [f"{info['path']}  ({_bytes(info['file_bytes'])} on disk, producer {info['producer'] or '?'})",
             "opsets: " + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in info["opsets"].items()),
             f"parameters: {p['total']:,} ({_bytes(p['bytes'])})"]
    lines += [f"  {dt:<14} {e['parameters']:>14,} params {_bytes(e['bytes']):>11}  {e['tensors']} tensors"
              for dt, e in p["by_dtype"].items()]
    lines.append("inputs:")
    lines += [f"  {v['name']}: {v['dtype']} {v['shape']}" for v in info["inputs"]]
    lines.append("outputs:")
    lines += [f"  {v['name']}: {v['dtype']} {v['shape']}" for v in info["outputs"]]
    lines.append("custom ops:" if info["custom_ops"] else "custom ops: none")
    lines += [f"  {c['op']:<34} x{c['count']:<4} {c['implemented_by']}"
              f"{' (+ function body)' if c['function_body'] and c['plugin'] else ''}" for c in info["custom_ops"]]
    lines.append(f"nodes: {info['nodes']}")
    lines += [f"  {op:<40} {n}" for op, n in info["op_histogram"].items()]
    return "\n".join(lines)
