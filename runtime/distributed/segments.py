"""Split a rank's model at its collectives: ONNX sub-graphs between them, the collectives run in Python.

This is one of the two ways a rank runs its collectives on ONNX Runtime (the other keeps them in the graph as
Python custom ops; see `r1c.runtime.distributed.rank`). Each node gets a stage: the number of collectives on its
longest path from the graph inputs. Stage s's nodes form sub-graph s; after it run the collectives that read
it, whose outputs stage s+1 reads. Values cross from a sub-graph to any later one by name. Every rank of a
layout has the same sequence of collectives, so the ranks' steps pair up one to one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import onnx_ir as ir

from r1c.errors import BundleError
from r1c.passes.shard_lower_collectives_to_ort import collective_spec


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective step: `output = op(input)` over the named group."""

    op: str  # the r1c op name: AllReduce | AllGather
    group: str
    input: str
    output: str
    axis: int = -1  # AllGather only
    group_size: int = 0  # AllGather only: the ranks the node was sharded for


@dataclasses.dataclass
class Segment:
    """A standard-ONNX sub-graph: reads `inputs` (graph inputs or earlier values), writes `outputs`."""

    model: ir.Model
    inputs: list[str]
    outputs: list[str]


Step = Segment | Collective


def _attr(node: ir.Node, name: str, default: object) -> object:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _stages(graph: ir.Graph) -> tuple[dict[ir.Node, int], list[ir.Node]]:
    stage: dict[ir.Node, int] = {}
    collectives: list[ir.Node] = []
    value_stage: dict[ir.Value, int] = {}
    for node in graph:  # graphs are topologically sorted
        s = max((value_stage.get(v, 0) for v in node.inputs if v is not None), default=0)
        stage[node] = s
        is_collective = collective_spec(node) is not None
        if is_collective:
            collectives.append(node)
        for out in node.outputs:
            value_stage[out] = s + 1 if is_collective else s
    return stage, collectives


def split(model: ir.Model) -> list[Step]:
    """The rank's steps in execution order: Segment, Collective, Segment, ..., Segment."""
    graph = model.graph
    stage, collectives = _stages(graph)
    if not collectives:
        return [Segment(model, [str(v.name) for v in graph.inputs], [str(v.name) for v in graph.outputs])]
    last = max(stage.values())
    nodes_of: list[list[ir.Node]] = [[] for _ in range(last + 1)]
    for node, s in stage.items():
        if collective_spec(node) is None:
            nodes_of[s].append(node)
    produced_in: dict[str, int] = {}
    for s, nodes in enumerate(nodes_of):
        for node in nodes:
            for out in node.outputs:
                produced_in[out.name] = s  # type: ignore[index]
    graph_outputs = {str(v.name) for v in graph.outputs}
    # values each stage must hand on: read by a later stage or a collective, or a graph output
    needed_after: dict[int, set[str]] = {s: set() for s in range(last + 1)}
    for node, s in stage.items():
        for v in node.inputs:
            if v is None or v.name not in produced_in:
                continue
            src = produced_in[v.name]
            if collective_spec(node) is not None or src != s:
                needed_after[src].add(v.name)  # type: ignore[arg-type]
    for name in graph_outputs:
        if name in produced_in:
            needed_after[produced_in[name]].add(name)
    initializers = set(graph.initializers)
    steps: list[Step] = []
    for s, nodes in enumerate(nodes_of):
        if nodes:
            outputs = sorted(needed_after[s])
            inputs = _segment_inputs(nodes, produced_in, s, initializers)
            sub = ir.convenience.extract(graph, inputs, outputs)
            steps.append(Segment(ir.Model(sub, ir_version=model.ir_version, functions=list(model.functions.values())),
                                 inputs, outputs))
        for node in collectives:
            if stage[node] == s:
                spec = collective_spec(node)
                assert spec is not None and node.inputs[0] is not None
                steps.append(Collective(spec.name, str(_attr(node, "group", "")), str(node.inputs[0].name),
                                        str(node.outputs[0].name), int(_attr(node, "axis", -1)),  # type: ignore[call-overload]
                                        int(_attr(node, "group_size", 0))))  # type: ignore[call-overload]
    _check_outputs(steps, graph_outputs)
    return steps


def _segment_inputs(nodes: Iterable[ir.Node], produced_in: dict[str, int], s: int, initializers: set[str]) -> list[str]:
    inputs: dict[str, None] = {}
    for node in nodes:
        for v in node.inputs:
            if v is None or v.name in initializers or produced_in.get(v.name) == s:  # type: ignore[arg-type]
                continue
            inputs[v.name] = None  # type: ignore[index]
    return list(inputs)


def _check_outputs(steps: list[Step], graph_outputs: set[str]) -> None:
    made = {o for st in steps for o in (st.outputs if isinstance(st, Segment) else [st.output])}
    missing = graph_outputs - made
    if missing:
        raise BundleError(f"bundle: splitting the rank's model at its collectives lost outputs {sorted(missing)}")
