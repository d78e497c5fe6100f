"""`graph_io.json`: what a model's graph takes and gives, so that a runtime can serve it.

Two kinds:
- r1c's own export (no `kind`, or `kind: "r1c"`): written by `r1c export` (exporter/graph_io.py):
  input_ids, past_lengths, logits_index and the MLA latent cache in, logits and the new latents out.
- `kind: "foreign"`: described here from the graph itself (`describe_foreign`), for a model r1c did not
  export (e.g. the stock `torch.onnx` export of a transformers model) once `r1c optimize` has run on it:
    inputs   input_ids [B, S] int; optional attention_mask [B, P + S] int, position_ids [B, S] int;
             optional transformers-style cache past_key_values.{l}.key / .value [B, heads, P, head_dim]
    outputs  logits [B, S, V] float; with a cache, present.{l}.key / .value [B, heads, P + S, head_dim]
  (B = batch, S = new tokens, P = cached tokens, V = vocabulary, l < layers.) Without a cache the runtime
  serves `forward` and cache-less generation (the whole sequence each step); with one, it feeds each step's
  `present` back as the next `past`. Other graph outputs are ignored; another input is refused by name.

`check_graph_io` validates either kind as read from a file (a malformed one is one error line, not a crash).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from r1c.errors import R1CError

FILE = "graph_io.json"
SCHEMA = 1
# r1c's export: the input naming, per row, the positions (< S) whose logits the graph computes ([B, K] int64;
# logits come out [B, K, V]). Graphs exported before it have no such input and compute all S (the runtime copes).
LOGITS_INDEX = "logits_index"
FOREIGN = "foreign"
_PAST = re.compile(r"^(?:past_key_values|past)[._](\d+)[._](key|value)$")
_PRESENT = re.compile(r"^(?:present_key_values|present)[._](\d+)[._](key|value)$")
_INT_TYPES = ("int64", "int32")
_FLOAT_TYPES = ("float32", "float16", "bfloat16", "float64")


def _io(value: Any) -> dict[str, Any]:
    dims: list[int | str | None] | None = None
    if value.shape is not None:
        dims = [d if isinstance(d, int) else d.value for d in value.shape.dims]
    dtype = None if value.dtype is None else value.dtype.numpy().name  # numpy's names: float32, int64, bfloat16
    return {"name": value.name, "dtype": dtype, "shape": dims}


def _pairs(entries: dict[str, dict[str, Any]], pattern: re.Pattern[str], what: str,
           error: type[R1CError]) -> list[list[dict[str, Any]]]:
    """[[key, value] per layer] of the entries whose names match `pattern`; layers must be 0..L-1."""
    found: dict[int, dict[str, dict[str, Any]]] = {}
    for name, entry in entries.items():
        m = pattern.match(name)
        if m:
            found.setdefault(int(m.group(1)), {})[m.group(2)] = entry
    if sorted(found) != list(range(len(found))) or any(set(v) != {"key", "value"} for v in found.values()):
        raise error(f"graph: the {what} are not a key and a value for each of layers 0..{len(found) - 1} "
                    f"({', '.join(sorted(e['name'] for f in found.values() for e in f.values()))})")
    return [[found[i]["key"], found[i]["value"]] for i in range(len(found))]


def describe_foreign(model: Any, error: type[R1CError]) -> dict[str, Any]:
    """The graph_io description of a foreign causal-LM graph (an onnx_ir Model); `error` names what does not fit."""
    inputs = {v.name: _io(v) for v in model.graph.inputs}
    outputs = {v.name: _io(v) for v in model.graph.outputs}
    if "input_ids" not in inputs:
        raise error(f"graph: no input named input_ids (inputs: {', '.join(inputs) or 'none'}); r1c serves causal "
                    "language models that take token ids and give logits")
    roles: dict[str, str | None] = {"input_ids": "input_ids", "attention_mask": None, "position_ids": None}
    for name in ("attention_mask", "position_ids"):
        if name in inputs:
            roles[name] = name
    past = _pairs(inputs, _PAST, "past_key_values inputs", error)
    known = {*filter(None, roles.values()), *(e["name"] for layer in past for e in layer)}
    for name, entry in inputs.items():
        if name not in known:
            raise error(f"graph: input {name} ({entry['dtype']} {entry['shape']}) has no role r1c knows (input_ids, "
                        "attention_mask, position_ids, past_key_values.N.key/value)")
        if name in roles.values() and entry["dtype"] not in _INT_TYPES:
            raise error(f"graph: input {name} is {entry['dtype']}, expected an integer type")
    logits = "logits" if "logits" in outputs else next(iter(outputs), None)
    if logits is None or outputs[logits]["dtype"] not in _FLOAT_TYPES or len(outputs[logits]["shape"] or []) != 3:
        raise error("graph: no logits output [batch, seq, vocab] of a float type (name it logits)")
    present = _pairs(outputs, _PRESENT, "present outputs", error)
    if len(present) != len(past):
        raise error(f"graph: {len(past)} layers of past_key_values inputs but {len(present)} of present outputs")
    cache = None
    if past:
        for layer in past:
            for entry in layer:
                dims = entry["shape"] or []
                if len(dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3])):
                    raise error(f"graph: {entry['name']} must be [batch, heads, past_seq, head_dim] with static "
                                f"heads and head_dim, got {dims}")
        cache = {
            "kind": "past_key_values",
            "layers": len(past),
            "inputs": [[k["name"], v["name"]] for k, v in past],
            "outputs": [[k["name"], v["name"]] for k, v in present],
            "heads_head_dim": [[[k["shape"][1], k["shape"][3]], [v["shape"][1], v["shape"][3]]] for k, v in past],
            "dtype": past[0][0]["dtype"],
            "layout": "[batch, heads, seq, head_dim]; present holds past + new tokens",
        }
    vocab = outputs[logits]["shape"][-1]
    return {
        "schema": SCHEMA,
        "kind": FOREIGN,
        "inputs": list(inputs.values()),
        "outputs": list(outputs.values()),
        "roles": {**roles, "logits": logits},
        "token_dtype": inputs["input_ids"]["dtype"],
        "vocab_size": vocab if isinstance(vocab, int) else None,
        "kv_cache": cache,
        "weights_quant": "none",
    }


def is_foreign(graph_io: dict[str, Any]) -> bool:
    return graph_io.get("kind") == FOREIGN


def _require(d: dict[str, Any], key: str, types: type | tuple[type, ...], where: str,
             error: type[R1CError]) -> Any:
    value = d.get(key)
    kinds = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(t.__name__ for t in kinds)
        raise error(f"{where}: field {key!r} must be {names}, got {type(value).__name__} {str(value)[:60]!r}")
    return value


def check_graph_io(d: Any, error: type[R1CError], where: str) -> dict[str, Any]:
    """`d` (read from a graph_io.json or a manifest) if it is a well-formed description of either kind."""
    if not isinstance(d, dict):
        raise error(f"{where}: graph_io is {type(d).__name__}, expected an object")
    for key in ("inputs", "outputs"):
        for entry in _require(d, key, list, where, error):
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise error(f"{where}: every entry of {key!r} needs a name, got {str(entry)[:60]!r}")
    if not isinstance(d.get("weights_quant", "none"), str):
        raise error(f"{where}: field 'weights_quant' must be str")
    if is_foreign(d):
        roles = _require(d, "roles", dict, where, error)
        if not isinstance(roles.get("input_ids"), str) or not isinstance(roles.get("logits"), str):
            raise error(f"{where}: roles must name input_ids and logits")
        vocab = d.get("vocab_size")
        if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
            raise error(f"{where}: field 'vocab_size' must be a positive int, got {vocab!r}")
        cache = d.get("kv_cache")
        if cache is not None:
            layers = _require(cache, "layers", int, where, error)
            for key in ("inputs", "outputs", "heads_head_dim"):
                if len(_require(cache, key, list, where, error)) != layers:
                    raise error(f"{where}: kv_cache.{key} must have one entry per layer ({layers})")
    else:
        cache = _require(d, "kv_cache", dict, where, error)
        if cache.get("kind") != "mla_latent":
            raise error(f"{where}: kv_cache.kind {cache.get('kind')!r} is not one r1c serves (mla_latent)")
    return d


def foreign_hash(d: dict[str, Any]) -> str:
    """What a foreign bundle's manifest records as its config hash: the sha256 of its graph I/O description."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()
