"""Small foreign causal-LM graphs (written with onnx.helper, no r1c op in them) whose every logit numpy computes
exactly, for the runtime's foreign-model adapter (runtime/foreign.py).

For a token sequence x_0..x_{T-1} (B = batch, S = new tokens, P = cached tokens, V = vocabulary):
    logits_t = (sum_{u<=t} E1[x_u]) @ W1 + (sum_{u<=t} E2[x_u]) @ W2 + Q[t]
a causal "model" in which the output at t depends on every earlier token and on the position t, so a wrong
cache, a wrong position or a lost value tensor changes the greedy tokens.
- `toy_model(cache=True)`: transformers-style cache, one layer: past_key_values.0.key [B, 1, P, D] holds E1 of
  the past tokens, .value [B, 1, P, D2] holds E2; present.0.key/value append the new tokens' rows; inputs
  input_ids [B, S], attention_mask [B, P + S] (multiplies the rows: all ones keeps them), position_ids [B, S].
- `toy_model(cache=False)`: input_ids [B, S] -> logits [B, S, V], positions 0..S-1 computed inside.
`toy_reference` gives the greedy continuation of a prompt in numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

V, D, D2, MAX_POS = 13, 4, 3, 64


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"E1": (0.15 * rng.standard_normal((V, D))).astype(np.float32),
            "E2": (0.15 * rng.standard_normal((V, D2))).astype(np.float32),
            "W1": rng.standard_normal((D, V)).astype(np.float32),
            "W2": rng.standard_normal((D2, V)).astype(np.float32),
            "Q": (4 * rng.standard_normal((MAX_POS, V))).astype(np.float32)}


def toy_reference(prompt: list[int], new_tokens: int, seed: int = 0) -> tuple[list[int], np.ndarray]:
    """(greedy new tokens, logits [len(prompt), V] of the prompt) computed in numpy."""
    w = _weights(seed)

    def logits(x: list[int]) -> np.ndarray:
        ids = np.asarray(x)
        t = np.arange(len(x))
        return (np.cumsum(w["E1"][ids], 0) @ w["W1"] + np.cumsum(w["E2"][ids], 0) @ w["W2"] + w["Q"][t])

    seq, out = list(prompt), []
    for _ in range(new_tokens):
        token = int(logits(seq)[-1].argmax())
        out.append(token)
        seq.append(token)
    return out, logits(list(prompt)).astype(np.float32)


def toy_model(path: Path, *, cache: bool, opset: int = 18, seed: int = 0) -> Path:
    """Write the toy graph (see the module docstring) to `path`; returns `path`."""
    w = _weights(seed)
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.array(a, dtype=np.int64), n)
              for n, a in (("ax1", [1]), ("ax2", [2]), ("zero", 0), ("one", 1), ("axes_s", [1]))]
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", V])
    n = helper.make_node
    nodes = [n("Gather", ["E1", "input_ids"], ["e1"]), n("Gather", ["E2", "input_ids"], ["e2"])]  # [B, S, D]
    if cache:
        mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])
        pos = helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])
        pk = helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, ["batch", 1, "past", D])
        pv = helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, ["batch", 1, "past", D2])
        ok = helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, ["batch", 1, "total", D])
        ov = helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, ["batch", 1, "total", D2])
        nodes += [
            n("Unsqueeze", ["e1", "ax1"], ["e1u"]), n("Unsqueeze", ["e2", "ax1"], ["e2u"]),  # [B, 1, S, D]
            n("Concat", ["past_key_values.0.key", "e1u"], ["present.0.key"], axis=2),
            n("Concat", ["past_key_values.0.value", "e2u"], ["present.0.value"], axis=2),
            n("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
            n("Unsqueeze", ["maskf", "ax1"], ["mask3"]), n("Unsqueeze", ["mask3", "axes_last"], ["mask4"]),
            n("Mul", ["present.0.key", "mask4"], ["k_masked"]), n("Mul", ["present.0.value", "mask4"], ["v_masked"]),
            n("CumSum", ["k_masked", "two"], ["k_sum"]), n("CumSum", ["v_masked", "two"], ["v_sum"]),
            n("Shape", ["past_key_values.0.key"], ["past_len"], start=2, end=3),
            n("Shape", ["present.0.key"], ["total_len"], start=2, end=3),
            n("Slice", ["k_sum", "past_len", "total_len", "ax2"], ["k_new"]),
            n("Slice", ["v_sum", "past_len", "total_len", "ax2"], ["v_new"]),
            n("Squeeze", ["k_new", "ax1"], ["k3"]), n("Squeeze", ["v_new", "ax1"], ["v3"]),
            n("MatMul", ["k3", "W1"], ["l1"]), n("MatMul", ["v3", "W2"], ["l2"]),
            n("Gather", ["Q", "position_ids"], ["lq"]),
            n("Add", ["l1", "l2"], ["l12"]), n("Add", ["l12", "lq"], ["logits"]),
        ]
        inits += [numpy_helper.from_array(np.array([3], dtype=np.int64), "axes_last"),
                  numpy_helper.from_array(np.array(2, dtype=np.int64), "two")]
        inputs, outputs = [ids, mask, pos, pk, pv], [logits, ok, ov]
    else:
        nodes += [
            n("CumSum", ["e1", "one"], ["k_sum"]), n("CumSum", ["e2", "one"], ["v_sum"]),
            n("MatMul", ["k_sum", "W1"], ["l1"]), n("MatMul", ["v_sum", "W2"], ["l2"]),
            n("Shape", ["input_ids"], ["seq_len1"], start=1, end=2), n("Squeeze", ["seq_len1"], ["seq_len"]),
            n("Range", ["zero", "seq_len", "one"], ["positions"]), n("Gather", ["Q", "positions"], ["lq"]),
            n("Add", ["l1", "l2"], ["l12"]), n("Add", ["l12", "lq"], ["logits"]),
        ]
        inputs, outputs = [ids], [logits]
    graph = helper.make_graph(nodes, "toy", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
