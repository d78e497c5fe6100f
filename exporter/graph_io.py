"""The exported graph's inputs and outputs, and `graph_io.json`, their description for runtimes.

Legend: L layers, C kv_lora_rank, R qk_rope_head_dim, V vocab; batch B, seq S (new tokens per row), kept K
(positions per row whose logits are computed: `logits_index` [B, K], each < S; logits [B, K, V]).
The latent cache and `new_c`/`new_pe` are in the export dtype (float32 | bfloat16 | float16); `logits` are
float32 whatever the dtype (the head's MatMul runs in the export dtype, its result is widened once).
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import TensorProto, helper

from r1c.config import ModelConfig
from r1c.graph_io import LOGITS_INDEX

GRAPH_IO_FILE = "graph_io.json"
GRAPH_IO_SCHEMA = 1
DTYPE_NAMES = {TensorProto.FLOAT: "float32", TensorProto.BFLOAT16: "bfloat16", TensorProto.FLOAT16: "float16"}


def model_io(config: ModelConfig, dtype: int) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """The graph's inputs and outputs; `dtype` (ONNX) is the latent cache's."""
    c, L = config, config.num_hidden_layers
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("past_lengths", TensorProto.INT64, ["batch"]),
              helper.make_tensor_value_info(LOGITS_INDEX, TensorProto.INT64, ["batch", "kept"])]
    for i in range(L):
        inputs.append(helper.make_tensor_value_info(f"past_c.{i}", dtype, ["batch", c.kv_lora_rank, "capacity"]))
        inputs.append(helper.make_tensor_value_info(f"past_pe.{i}", dtype, ["batch", c.qk_rope_head_dim, "capacity"]))
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "kept", c.vocab_size]),
        helper.make_tensor_value_info("new_c", dtype, [L, "batch", "seq", c.kv_lora_rank]),
        helper.make_tensor_value_info("new_pe", dtype, [L, "batch", "seq", c.qk_rope_head_dim]),
    ]
    return inputs, outputs


def graph_io(config: ModelConfig, quant: str, dtype: str = "float32") -> dict[str, Any]:
    """The description of the graph's I/O and cache layout that the runtime reads (`dtype`: the cache's)."""
    L, C, R = config.num_hidden_layers, config.kv_lora_rank, config.qk_rope_head_dim
    return {
        "schema": GRAPH_IO_SCHEMA,
        "inputs": [
            {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
            {"name": "past_lengths", "dtype": "int64", "shape": ["batch"]},
            {"name": LOGITS_INDEX, "dtype": "int64", "shape": ["batch", "kept"]},
            *[{"name": f"past_c.{i}", "dtype": dtype, "shape": ["batch", C, "capacity"]} for i in range(L)],
            *[{"name": f"past_pe.{i}", "dtype": dtype, "shape": ["batch", R, "capacity"]} for i in range(L)],
        ],
        "outputs": [
            {"name": "logits", "dtype": "float32", "shape": ["batch", "kept", config.vocab_size]},
            {"name": "new_c", "dtype": dtype, "shape": [L, "batch", "seq", C]},
            {"name": "new_pe", "dtype": dtype, "shape": [L, "batch", "seq", R]},
        ],
        "kv_cache": {
            "kind": "mla_latent",
            "layers": L,
            "dtype": dtype,
            "tensors": {"c": {"input": "past_c.{layer}", "output": "new_c", "channels": C},
                        "pe": {"input": "past_pe.{layer}", "output": "new_pe", "channels": R}},
            "layout": "[batch, channels, capacity] per layer; outputs [layers, batch, seq, channels]",
            "values_per_token_per_layer": config.latent_dim,
        },
        "weights_quant": quant,
    }
